"""The "atman" attention on models whose layers are placed by a device_map (accelerate hooks).

On a CPU-only machine the placements that exercise accelerate's machinery are "cpu" plus
"disk" offload: offloaded layers keep their weights on the meta device and an
``AlignDevicesHook`` loads them for each call. Suppressed logits and explanations must equal
those of the same model without any dispatch.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate (test extra) places models by device_map")

from accelerate import dispatch_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import atman_kernels  # noqa: E402
from atman_kernels.explain import AtManExplainer  # noqa: E402
from atman_kernels.hf import atman_attention  # noqa: E402

N = 12


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (1, N), generator=g)
    factors = torch.ones(3, N)
    factors[0, 2] = 0.1
    factors[1, 5] = 0.1
    factors[2, 7] = 0.0
    return ids, factors


def suppressed_logits(model, ids: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """[V, N, vocab] logits of ``ids`` with one variant per row of ``factors``."""
    with torch.no_grad(), atman_attention(model), atman_kernels.suppression(factors):
        return model(ids.expand(factors.shape[0], -1)).logits


def test_dispatch_model_with_disk_offload_matches_undispatched(tiny_llama, inputs, tmp_path):
    ids, factors = inputs
    expected = suppressed_logits(tiny_llama, ids, factors)
    plain = suppressed_logits(tiny_llama, ids, torch.ones_like(factors))
    assert (expected - plain).abs().amax() > 1e-4, "the factors must change the logits"

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = dispatch_model(copy.deepcopy(tiny_llama), device_map=device_map,
                                offload_dir=str(tmp_path / "offload"))
    offloaded = dispatched.model.layers[1]
    assert hasattr(offloaded, "_hf_hook"), "accelerate did not attach its hook"
    assert offloaded.self_attn.q_proj.weight.device.type == "meta"

    got = suppressed_logits(dispatched, ids, factors)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_from_pretrained_device_map_auto_offload_explains_like_undispatched(
    tiny_llama, inputs, tmp_path
):
    ids, factors = inputs
    tiny_llama.save_pretrained(tmp_path / "model")
    placed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "60KB"},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(placed.hf_device_map.values()), placed.hf_device_map

    torch.testing.assert_close(suppressed_logits(placed, ids, factors),
                               suppressed_logits(tiny_llama, ids, factors),
                               rtol=1e-5, atol=1e-6)

    prompt, target = ids[0, :10].tolist(), ids[0, 10:].tolist()
    expected = AtManExplainer(tiny_llama, batch_size=4, progress=False).explain(prompt, target)
    explainer = AtManExplainer(placed, batch_size=4, progress=False)
    got = explainer.explain(prompt, target)
    assert explainer.last_stats["prefix_reuse"], "prefix reuse should survive accelerate hooks"
    assert expected.scores.abs().amax() > 0
    # scores are differences of cross-entropies of a few nats: one fp32 ulp there is 4.8e-7
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=2e-6)
