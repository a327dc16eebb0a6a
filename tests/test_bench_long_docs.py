"""Smoke tests of benchmarks/bench_long_docs.py on a tiny random Llama, so the script can't rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("captum", reason="captum (bench extra) runs the attribution baselines")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_long_docs as bl  # noqa: E402

from atman_kernels.explain import Span  # noqa: E402

N = 48


def row(method: str) -> dict:
    return {"model": "tiny", "method": method, "n": N, "threads": 1, "seed": 0}


@pytest.mark.parametrize("method", bl.METHODS)
def test_every_method_completes_a_row(method):
    res = bl.measure_one(row(method))
    assert res["status"] == "ok", res
    assert float(res["seconds"]) > 0 and float(res["peak_mib"]) >= 0
    assert float(res["cpu_s"]) > 0
    assert res["n_tokens"] >= N and res["n_units"] >= 3
    if method == "forward":
        assert "evidence_rank" not in res
    else:
        assert 1 <= res["evidence_rank"] <= res["n_doc_sentences"] < res["n_units"]
        assert res["top1"] == int(res["evidence_rank"] == 1)
    if method.startswith("atman"):
        assert res["atman_forwards"] >= 1 and res["atman_token_forwards"] >= res["n_tokens"]
        assert res["atman_prefix_reuse"]
        assert method == "atman" or res["atman_chunk_size"] == 1


def test_document_is_seed_fixed_long_enough_and_names_the_answer_once():
    tok = bl.tiny_tokenizer()
    a, b = bl.build_document(tok, 200, seed=3), bl.build_document(tok, 200, seed=3)
    assert a == b and a != bl.build_document(tok, 200, seed=4)
    assert a["n_tokens"] >= 200
    assert a["prompt"].count(bl.ANSWER_CITY) == 1
    s, e = a["evidence"]
    assert bl.ANSWER_CITY in a["prompt"][s:e] and e <= a["doc_end"]
    assert a["prompt"].endswith("grew up in") and a["target"] == " " + bl.ANSWER_CITY


def test_feature_ablation_scores_are_the_drop_when_each_sentence_is_replaced():
    model, tok = bl.load("tiny")
    doc = bl.build_document(tok, N, seed=0)
    prompt_ids, spans, target_ids = bl.sentence_units(tok, doc)
    scores = bl.make_runner("feature-ablation", model, tok, doc)()
    f = bl.target_log_prob_fn(model, torch.tensor(target_ids))
    ids = torch.tensor([prompt_ids + target_ids[:-1]])
    with torch.no_grad():
        full = f(ids)[0]
        for span, got in zip(spans, scores, strict=True):
            cut = ids.clone()
            cut[0, list(span.positions)] = 0
            assert got == pytest.approx(float(full - f(cut)[0]), abs=1e-5)


def test_atman_units_are_the_benchmark_sentences():
    model, tok = bl.load("tiny")
    doc = bl.build_document(tok, N, seed=0)
    _, spans, _ = bl.sentence_units(tok, doc)
    assert len(bl.make_runner("atman", model, tok, doc)()) == len(spans)
    texts = [s.text.strip() for s in spans]
    assert any(bl.ANSWER_CITY in t for t in texts) and texts[-1].startswith("Answer:")


def test_answered_seed_is_the_first_document_the_model_answers():
    tok = bl.tiny_tokenizer()
    answer = tok(" " + bl.ANSWER_CITY, add_special_tokens=False)["input_ids"][0]
    wanted = bl.sentence_units(tok, bl.build_document(tok, N, seed=3))[0]

    class Fake:  # answers (top-1 = the city, p = 0.5) only the document of seed 3
        def __init__(self, answers):
            self.answers = answers

        def __call__(self, ids, logits_to_keep):
            logits = torch.zeros(1, 1, len(tok))
            if self.answers and ids[0].tolist() == wanted:
                logits[0, 0, answer] = torch.log(torch.tensor(0.5 * (len(tok) - 1) / 0.5))
            return type("Out", (), {"logits": logits})()

    doc_seed, p, answered = bl.answered_seed(Fake(True), tok, N, seed=1)
    assert (doc_seed, answered) == (3, True) and p == pytest.approx(0.5)
    doc_seed, p, answered = bl.answered_seed(Fake(False), tok, N, seed=1, tries=4)
    assert (doc_seed, answered) == (1, False) and p == pytest.approx(1 / len(tok))


def test_evidence_rank_counts_ties_against_the_evidence_and_skips_the_question():
    doc = {"evidence": (10, 20), "doc_end": 30}
    spans = [Span("a", 0, 10, (0,)), Span("b", 10, 20, (1,)), Span("c", 21, 30, (2,)),
             Span("q", 31, 40, (3,))]
    assert bl.evidence_rank([0.1, 0.5, 0.2, 9.0], spans, doc) == (1, 3)
    assert bl.evidence_rank([0.5, 0.5, 0.2, 9.0], spans, doc) == (2, 3)
    with pytest.raises(ValueError, match="scores"):
        bl.evidence_rank([0.1], spans, doc)


def test_bad_sizes_are_refused_before_any_work():
    with pytest.raises(ValueError, match="n_tokens"):
        bl.build_document(bl.tiny_tokenizer(), 4)
    with pytest.raises(ValueError, match="n_sentences"):
        bl.document_sentences(1)
    with pytest.raises(ValueError, match="--stop-at"):
        bl.stop_time("noon")


def test_past_deadline_writes_not_run_rows_and_plots(tmp_path):
    out = tmp_path / "ld.csv"
    bl.main(["--model", "tiny", "--lengths", "32", "--stop-at", "00:00", "--csv", str(out)])
    rows = bl.read_csv(out)
    assert {r["method"] for r in rows} == set(bl.METHODS)
    assert all(r["status"] == "not run (deadline)" and not r.get("seconds") for r in rows)
    ok = [{**row(m), "n": 32, "status": "ok", "n_tokens": "50", "seconds": "1.5", "peak_mib": "3",
           "load_before": "1.0", "load_after": "2.0"} for m in bl.METHODS]
    bl.write_csv(out, bl.merge_rows(rows, ok))
    bl.main(["--plot", "--csv", str(out)])
    assert out.with_suffix(".png").stat().st_size > 0
    assert len(bl.read_csv(out)) == len(bl.METHODS)
