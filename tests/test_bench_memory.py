"""Smoke tests of benchmarks/bench_memory.py on a tiny random Llama, so the script can't rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("captum", reason="captum (bench extra) runs the attribution baselines")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _baselines  # noqa: E402
import bench_memory as bm  # noqa: E402

from atman_kernels.explain import AtManExplainer  # noqa: E402

N = 24


def row(method: str, full: bool) -> dict:
    return {"model": "tiny", "method": method, "n": N, "batch": 4, "threads": 1,
            "full": int(full), "mem_budget_gib": 2.0}


@pytest.mark.parametrize("method", bm.TEXT_METHODS)
def test_every_method_completes_a_full_row(method):
    res = bm.measure_one(row(method, True), mem_cap=False)
    assert res["status"] == "ok", res
    assert float(res["measured_s"]) > 0 and float(res["peak_mib"]) >= 0
    assert res["seq_len"] == N and "est_s" not in res
    assert res["calls"] >= 1


@pytest.mark.parametrize("method", ["atman", "ig-10", "feature-ablation"])
def test_partial_row_stops_early_and_estimates_time_separately(method):
    res = bm.measure_one(row(method, False), mem_cap=False)
    assert res["status"] == "partial", res
    assert res["calls"] == bm.PARTIAL_CALLS[method] < res["calls_total"]
    assert "measured_s" not in res, "a partial run must not report a measured time"
    assert float(res["est_s"]) > 0 and res["est_how"]


def test_ig50_row_from_ig10_partial_keeps_peak_and_scales_estimate():
    ig10 = bm.measure_one(row("ig-10", False), mem_cap=False)
    ig50 = bm.ig_from_partial(ig10, 50, 4)
    assert ig50["method"] == "ig-50" and ig50["peak_mib"] == ig10["peak_mib"]
    assert ig50["calls_total"] == 2 + 13
    batch_s = float(ig10["ig_batch_s"])
    assert float(ig50["est_s"]) == pytest.approx(float(ig10["ig_prelim_s"]) + 13 * batch_s,
                                                 abs=0.1)


@pytest.mark.slow
def test_run_isolated_row_with_memory_budget():
    res = bm.run_isolated(Path(bm.__file__), row("forward", True), timeout=300)
    assert res["status"] == "ok", res
    assert float(res["peak_mib"]) >= 0


@pytest.mark.slow
def test_row_over_the_memory_budget_is_recorded_as_oom():
    res = bm.run_isolated(Path(bm.__file__), {**row("ig-10", True), "n": 512,
                                             "mem_budget_gib": 0.002}, timeout=300)
    assert res["status"].startswith("oom (over the 0.002 GiB budget)"), res
    assert "measured_s" not in res and "est_s" not in res


def test_atman_plan_counts_the_explainers_token_forwards():
    model, tokenizer = bm.load_model("tiny")
    case = bm.build_case(tokenizer, N)
    explainer = AtManExplainer(model, tokenizer, batch_size=4, progress=False)
    store: dict = {}
    with bm.capture_first_positions(store):
        explainer.explain(case["prompt_ids"], case["target_ids"])
    plan = bm.atman_plan_tokens(store["first"], len(case["seq"]), 4)
    assert len(plan) == explainer.last_stats["forwards"]
    assert sum(plan) == explainer.last_stats["token_forwards"]


def test_reference_backend_switch_routes_every_call_and_keeps_scores():
    sa = sys.modules["atman_kernels.ops.suppressed_attention"]  # the module, not the function
    model, tokenizer = bm.load_model("tiny")
    case = bm.build_case(tokenizer, N)
    explainer = AtManExplainer(model, tokenizer, batch_size=4, progress=False)
    fused = explainer.explain(case["prompt_ids"], case["target_ids"]).scores
    calls = []
    original = sa.reference_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sa.reference_attention = counting
    try:
        reference = AtManExplainer(model, tokenizer, batch_size=4, progress=False,
                                   backend="reference")
        ref = reference.explain(case["prompt_ids"], case["target_ids"]).scores
    finally:
        sa.reference_attention = original
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * explainer.last_stats["forwards"]
    torch.testing.assert_close(ref, fused, rtol=1e-4, atol=1e-6)


def test_baselines_score_every_position_and_agree_on_a_linear_check():
    model, tokenizer = bm.load_model("tiny")
    case = bm.build_case(tokenizer, N)
    ids = torch.tensor(case["seq"])[None]
    target = torch.tensor(case["target_ids"])
    ig = _baselines.integrated_gradients(model, ids, target, n_steps=20, internal_batch_size=8)
    ixg = _baselines.input_x_gradient(model, ids, target)
    model.set_attn_implementation("eager")
    chefer = _baselines.attention_x_gradient(model, ids, target)
    for scores in (ig, ixg, chefer):
        assert scores.shape == (N,) and torch.isfinite(scores).all()
    # completeness of IG: attributions sum to f(input) - f(baseline)
    f = _baselines.target_log_prob_fn(model, target)
    with torch.no_grad():
        gap = (f(ids) - f(torch.zeros_like(ids))).item()
    assert ig.sum().item() == pytest.approx(gap, rel=0.05, abs=1e-3)
    assert (chefer >= 0).all(), "Chefer relevance is built from relu'd terms"


def test_report_and_plot_from_rows(tmp_path):
    rows = [
        {"model": "tiny", "method": "forward", "n": "16", "status": "ok", "peak_mib": "10",
         "measured_s": "1.0", "batch": "4", "params_m": "0"},
        {"model": "tiny", "method": "atman", "n": "16", "status": "partial", "peak_mib": "12",
         "est_s": "9.0", "batch": "4", "params_m": "0"},
        {"model": "tiny", "method": "ig-10", "n": "16", "status": "oom (over the 1 GiB budget)",
         "batch": "4", "params_m": "0"},
    ]
    table = bm.markdown_report(rows)
    assert "| atman | 12 / ~9.00 s (partial) |" in table
    assert "oom (over the 1 GiB budget)" in table
    assert "| 16 | 1.20 |" in table
    md = tmp_path / "MEMORY.md"
    md.write_text(f"intro\n{bm.TABLE_BEGIN}\nold\n{bm.TABLE_END}\nreading\n")
    bm.write_report(md, table)
    text = md.read_text()
    assert text.startswith("intro\n") and text.endswith("reading\n") and "old" not in text
    bm.plot(rows, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    merged = bm.merge_rows(rows, [{**rows[0], "peak_mib": "11"}])
    assert len(merged) == 3 and merged[0]["peak_mib"] == "11"


# ------------------------------------------------------------------ vision-language rows
def image_text_row(method: str, full: bool, batch: int = 4) -> dict:
    processor = bm.image_text_processor("llava-tiny")
    n = len(bm.build_image_text_case(processor)["prompt_ids"])
    return {"model": "llava-tiny", "method": method, "n": n, "batch": batch, "threads": 1,
            "full": int(full), "mem_budget_gib": 2.0}


@pytest.mark.parametrize("method", bm.IMAGE_TEXT_METHODS)
def test_every_image_text_method_completes_a_full_row(method):
    res = bm.measure_one(image_text_row(method, True), mem_cap=False)
    assert res["status"] == "ok", res
    assert float(res["measured_s"]) > 0 and float(res["peak_mib"]) >= 0
    assert res["image_tokens"] == 64 and res["seq_len"] == res["n"]
    if method == "atman-region4":  # 8 x 8 patches in 2 x 2 regions of 4 x 4
        full = bm.measure_one(image_text_row("atman", True), mem_cap=False)
        assert full["units"] - res["units"] == 64 - 4


@pytest.mark.parametrize("method", ["atman", "atman-region4", "ig-10"])
def test_image_text_partial_row_stops_early_and_estimates_time(method):
    res = bm.measure_one(image_text_row(method, False, batch=1), mem_cap=False)
    assert res["status"] == "partial", res
    assert res["calls"] == bm.IMAGE_TEXT_PARTIAL_CALLS[method] < res["calls_total"]
    assert "measured_s" not in res and float(res["est_s"]) > 0 and res["est_how"]


def test_merged_embeddings_are_what_the_language_model_receives():
    model, processor = bm.load_model("llava-tiny")
    case = bm.build_image_text_case(processor)
    ids = torch.tensor(case["seq"])[None]
    seen = {}
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=case["inputs"]["pixel_values"])
            merged = bm.merged_embeddings(model, case["inputs"], ids)
    finally:
        hook.remove()
    torch.testing.assert_close(merged, seen["inputs_embeds"], rtol=0, atol=0)


def test_image_text_integrated_gradients_is_complete():
    """IG's attributions sum to f(input) - f(baseline) (completeness), up to the Riemann
    error of n_steps: it is IG over the merged embeddings, through the language model."""
    model, processor = bm.load_model("llava-tiny")
    model.requires_grad_(False)
    case = bm.build_image_text_case(processor)
    ids = torch.tensor(case["seq"])[None]
    target = torch.tensor(case["target_ids"])
    pad = processor.tokenizer.pad_token_id
    scores = bm.image_text_integrated_gradients(model, case["inputs"], ids, target,
                                                n_steps=64, internal_batch_size=16,
                                                baseline_id=pad)
    assert scores.shape == (ids.shape[1],)
    f = _baselines.target_log_prob_fn(model, target)
    with torch.no_grad():
        merged = bm.merged_embeddings(model, case["inputs"], ids)
        base = model.get_input_embeddings().weight[pad].expand_as(merged)
        gap = float(f(merged) - f(base))
    assert abs(gap) > 1e-3, "degenerate test: the input and baseline predict alike"
    assert float(scores.sum()) == pytest.approx(gap, rel=0.05, abs=1e-3)
