"""``AtManExplainer`` on the bundled SmolLM2-135M (fp32, CPU), timed by pytest-benchmark:
token and sentence units, prefix reuse on and off, on one short fixed prompt (two sentences,
13 tokens; target " Paris"), default settings otherwise (paper mode, factor 0.1, no
conceptual suppression, batch size "auto"). One benchmark group, four cases; the last timed
explanation's scores are checked against a full-recompute explanation of the same units.
"""

from __future__ import annotations

import pytest
import torch

PROMPT = "Paris is a large city in France. The capital of France is"
TARGET = " Paris"
ROUNDS, WARMUP = 3, 1
UNITS = ("token", "sentence")
REUSE = {"reuse": True, "recompute": False}


@pytest.fixture(scope="module")
def smollm2(threads):
    from atman_kernels.models import load_smollm2

    return load_smollm2(dtype=torch.float32)


@pytest.fixture(scope="module")
def recomputed(smollm2):
    """units -> the full-recompute explanation (computed once per unit kind)."""
    from atman_kernels import AtManExplainer

    model, tokenizer = smollm2
    explainer = AtManExplainer(model, tokenizer, prefix_reuse=False, progress=False)
    cache = {}

    def get(units: str):
        if units not in cache:
            cache[units] = explainer.explain(PROMPT, TARGET, granularity=units)
        return cache[units]

    return get


@pytest.mark.parametrize("reuse", list(REUSE))
@pytest.mark.parametrize("units", UNITS)
def test_explain(benchmark, smollm2, recomputed, units: str, reuse: str) -> None:
    from atman_kernels import AtManExplainer

    model, tokenizer = smollm2
    want = recomputed(units)
    explainer = AtManExplainer(model, tokenizer, prefix_reuse=REUSE[reuse], progress=False)
    benchmark.group = "explain SmolLM2-135M fp32: 13-token prompt, target ' Paris'"
    got = benchmark.pedantic(explainer.explain, args=(PROMPT, TARGET),
                             kwargs={"granularity": units}, rounds=ROUNDS,
                             warmup_rounds=WARMUP, iterations=1)
    benchmark.extra_info.update(units=units, prefix_reuse=REUSE[reuse], n_units=len(got.spans),
                                forwards=explainer.last_stats.get("forwards"),
                                token_forwards=explainer.last_stats.get("token_forwards"))
    assert len(got.spans) == len(want.spans) >= 2
    peak = float(want.per_target.abs().max())
    diff = float((got.per_target - want.per_target).abs().max())
    assert diff <= 1e-4 * max(peak, 1e-6), f"{units}/{reuse}: relative diff {diff / peak:.2e}"
