"""The "atman" transformers attention on small random models of several families.

Ground truth for suppressed runs is an independent eager attention defined here: it takes
transformers' *eager* masks (additive float, always materialised for causal models), builds the
scores itself and applies docs/semantics.md with factors looked up by absolute key position.
It soft-caps the scaled scores before the mask (``softcap=``, Gemma 2's order) and appends sink
logits (``s_aux=`` / ``sinks=``, GPT-OSS) as one more softmax column that it drops after.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from transformers import (
    AttentionInterface,
    BertConfig,
    BertModel,
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    VaultGemmaConfig,
    VaultGemmaForCausalLM,
    ViTConfig,
    ViTModel,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import atman_kernels
import atman_kernels.hf as atman_hf
import atman_kernels.hf.attention as hf_attention  # where the attention looks its ops up
from atman_kernels.hf import atman_attention

VOCAB = 61
CHECK = "independent_eager"


# ----------------------------------------------------------------------------- ground truth
_TEST_LAYER_INDEX: dict[int, int] = {}


def _expected_factors(module, n_keys: int, batch: int, kwargs) -> tuple[torch.Tensor, str] | None:
    if kwargs.get("atman_factors") is not None:
        factors, mode, layers = (
            kwargs["atman_factors"],
            kwargs.get("atman_mode") or "paper",
            kwargs.get("atman_layers"),
        )
    else:
        state = atman_kernels.current_suppression()
        if state is None:
            return None
        factors, mode, layers = state.factors, state.mode, state.layers
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        idx = _TEST_LAYER_INDEX.get(id(module))
    if layers is not None and idx not in set(layers):
        return None
    full = torch.ones(factors.shape[0], n_keys, dtype=torch.float64)
    n = min(n_keys, factors.shape[1])
    full[:, :n] = factors[:, :n].double()
    return full.expand(batch, n_keys), mode


def independent_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention with AtMan suppression, written out from the paper's definition."""
    b, hq, nq, d = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    q = query.double()
    k = key.double().repeat_interleave(hq // hkv, dim=1)
    v = value.double().repeat_interleave(hq // hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    cap = kw.get("softcap")
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if attention_mask is None:
        visible = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    else:
        visible = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        s = s + attention_mask.double().masked_fill(~visible, 0.0)
    got = _expected_factors(module, nk, b, kw)
    if got is not None:
        f, mode = got
        f = f[:, None, None, :]
        if mode == "paper":
            m = torch.where(visible, s, torch.full_like(s, float("inf"))).amin(-1, keepdim=True)
            s = m + f * (s - m)
        else:
            s = s + torch.log(f)
    s = s.masked_fill(~visible, float("-inf"))
    sinks = kw.get("s_aux") if kw.get("s_aux") is not None else kw.get("sinks")
    if sinks is None:
        w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    else:  # one more column per row, dropped after the softmax
        column = sinks.double().reshape(1, hq, 1, 1) if sinks.dim() == 1 else sinks.double()
        column = column.expand(s.shape[0], hq, nq, 1)
        w = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
    out = (w @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CHECK, independent_eager)
AttentionMaskInterface.register(CHECK, eager_mask)


# ----------------------------------------------------------------------------- tiny models
def _llama():
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        )
    )


def _qwen2():
    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        )
    )


def _mistral_sliding():
    # window 4 < sequence length: the mask is no causal/padding pattern -> exact fallback path
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            sliding_window=4,
        )
    )


def _gpt2():
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            initializer_range=0.2,
        )
    )


def _bert():
    return BertModel(
        BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
        ),
        add_pooling_layer=False,
    )


def _vit():
    return ViTModel(
        ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, initializer_range=0.2,
        ),
        add_pooling_layer=False,
    )


FAMILIES = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral_sliding": _mistral_sliding,
    "gpt2": _gpt2,
    "bert": _bert,
    "vit": _vit,
}
CAUSAL = {"llama", "qwen2", "mistral_sliding", "gpt2"}


def build(family: str) -> PreTrainedModel:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    if family == "vit":
        _TEST_LAYER_INDEX.update(
            # transformers 5.0: encoder.layer[i].attention.attention; 5.24: layers[i].attention
            {id(getattr(layer.attention, "attention", layer.attention)): i
             for i, layer in enumerate(
                model.layers if hasattr(model, "layers") else model.encoder.layer)}
        )
    return model


def make_inputs(family: str, batch: int, seq: int = 10, pad: bool = True) -> dict:
    """Inputs of ``batch`` rows; with ``pad``, rows have different amounts of padding."""
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for r in range(1, batch):
            n = min(r + 1, seq - 2)
            if family == "bert":
                mask[r, seq - n :] = 0  # right padding
            else:
                mask[r, :n] = 0  # left padding, as for generation
    return {"input_ids": ids, "attention_mask": mask}


def run(model, inputs, impl: str, **kwargs) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def valid_positions(inputs) -> torch.Tensor:
    """[B, N] bool of positions whose outputs are defined (not padding queries)."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].bool()
    return torch.ones(inputs["pixel_values"].shape[0], 17, dtype=torch.bool)


def assert_close(a, b, valid, atol):
    diff = (a - b).abs().amax(dim=-1)[valid]
    assert torch.isfinite(a[valid]).all()
    assert float(diff.max()) <= atol, f"max diff {float(diff.max()):.3g} > {atol}"


def random_factors(batch: int, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(batch, n, generator=g) * 2.0
    f[f < 0.3] = 0.0  # exact zeros: fully suppressed keys
    f[0] = 1.0  # one untouched variant
    return f


def seq_len(inputs) -> int:
    return 17 if "pixel_values" in inputs else inputs["input_ids"].shape[1]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", list(FAMILIES))
def test_without_factors_matches_sdpa(family):
    model = build(family)
    inputs = make_inputs(family, batch=3)
    ref = run(model, inputs, "sdpa")
    got = run(model, inputs, "atman")
    assert_close(got, ref, valid_positions(inputs), atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_allowlisted_arguments_only_and_every_layer_routed(family):
    """These families pass the per-call argument guard (only implemented or allowlisted
    keywords) and every decoder layer's attention reaches "atman", with factors applied."""
    model = build(family)
    inputs = make_inputs(family, batch=3)
    with atman_attention(model), torch.no_grad():
        with atman_hf.count_attention_calls() as counts, atman_kernels.suppression(
            random_factors(3, seq_len(inputs))
        ):
            model(**inputs)
    n_layers = len(atman_hf.decoder_attention_modules(model))
    assert n_layers == 2
    atman_hf.check_layers_routed(model, counts, layers=range(n_layers), suppressed=True)


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_with_factors_matches_independent_eager(family, mode):
    check_factors_against_independent_eager(build(family), family, mode, plain_impl="sdpa")


def check_factors_against_independent_eager(model, family, mode, plain_impl):
    """"atman" under random factors equals the test's own eager attention; the suppression
    changes rows 1.. and leaves the factor-1 variant (row 0) equal to ``plain_impl``."""
    inputs = make_inputs(family, batch=4)
    factors = random_factors(4, seq_len(inputs))
    plain = run(model, inputs, plain_impl)
    with atman_kernels.suppression(factors, mode=mode):
        expected = run(model, inputs, CHECK)
        with atman_attention(model):
            got = run(model, inputs, "atman")
    valid = valid_positions(inputs)
    assert_close(got, expected, valid, atol=1e-4)
    # the suppression did something (rows 1.. have factors != 1 on keys they see)
    assert float((got - plain).abs().amax(dim=-1)[1:][valid[1:]].max()) > 1e-3
    assert_close(got[:1], plain[:1], valid[:1], atol=1e-5)  # factor-1 variant untouched


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_layer_subset(family):
    model = build(family)
    inputs = make_inputs(family, batch=3, pad=False)
    factors = random_factors(3, seq_len(inputs))
    with atman_attention(model):
        with atman_kernels.suppression(factors, layers=[1]):
            got = run(model, inputs, "atman")
            expected = run(model, inputs, CHECK)
            model.set_attn_implementation("atman")
        with atman_kernels.suppression(factors):
            all_layers = run(model, inputs, "atman")
    valid = valid_positions(inputs)
    assert_close(got, expected, valid, atol=1e-4)
    assert float((got - all_layers)[1:].abs().max()) > 1e-3


def test_forward_kwargs_route_and_precedence():
    model = build("llama")
    inputs = make_inputs("llama", batch=3, pad=False)
    factors = random_factors(3, 10)
    other = random_factors(3, 10, seed=7)
    with atman_attention(model):
        via_kwargs = run(model, inputs, "atman", atman_factors=factors, atman_mode="log")
        with atman_kernels.suppression(factors, mode="log"):
            via_context = run(model, inputs, "atman")
        with atman_kernels.suppression(other):
            kwargs_win = run(model, inputs, "atman", atman_factors=factors, atman_mode="log")
        layer0 = run(model, inputs, "atman", atman_factors=factors, atman_layers=[0])
        with atman_kernels.suppression(factors, layers=[0]):
            layer0_ctx = run(model, inputs, "atman")
    valid = valid_positions(inputs)
    assert_close(via_kwargs, via_context, valid, atol=0)
    assert_close(kwargs_win, via_context, valid, atol=0)
    assert_close(layer0, layer0_ctx, valid, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generation_matches_sdpa(family):
    model = build(family)
    inputs = make_inputs(family, batch=2, seq=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    ref = model.generate(**inputs, **kw)
    with atman_attention(model):
        got = model.generate(**inputs, **kw)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(got, ref)


@pytest.mark.parametrize("factor_len", ["prompt", "whole"])
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_decoding_with_factors_equals_full_recompute(family, mode, factor_len):
    """Prefill + token-by-token decode through a KV cache under suppression equals
    recomputing the whole sequence at every step. Factors cover the prompt (keys past their
    end are untouched) or the whole sequence (keys are matched by absolute position)."""
    model = build(family)
    batch, prompt = 3, 7
    ids = torch.randint(0, VOCAB, (batch, prompt + 4), generator=torch.Generator().manual_seed(3))
    factors = random_factors(batch, prompt if factor_len == "prompt" else ids.shape[1])
    with torch.no_grad(), atman_attention(model), atman_kernels.suppression(factors, mode=mode):
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :prompt], **_cache_kw(model, cache), use_cache=True)
        for step in range(prompt, ids.shape[1]):
            full = model(ids[:, : step + 1]).logits[:, -1]
            out = model(ids[:, step : step + 1], **_cache_kw(model, cache))
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def _cache_kw(model, cache):
    """The cache argument under the name this transformers takes (5.24 renamed
    past_key_values to cache; the old name warns)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")
    return {name: cache}


@pytest.mark.parametrize("mode", ["paper", "log"])
def test_prefix_reuse_equals_full_recompute(mode):
    """docs/semantics.md: a variant whose first suppressed position is p can reuse the
    unsuppressed cache of positions < p; feeding only positions >= p gives the same logits."""
    model = build("llama")
    batch, n, p = 3, 12, 5
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(4))
    ids = ids.expand(batch, n)
    factors = random_factors(batch, n)
    factors[:, :p] = 1.0
    with torch.no_grad(), atman_attention(model):
        cache = DynamicCache(config=model.config)
        model(ids[:, :p], **_cache_kw(model, cache), use_cache=True)
        with atman_kernels.suppression(factors, mode=mode):
            suffix = model(ids[:, p:], **_cache_kw(model, cache)).logits
            full = model(ids).logits[:, p:]
    torch.testing.assert_close(suffix, full, atol=1e-5, rtol=1e-5)


def test_common_masks_take_the_fused_op(monkeypatch):
    """Causal, padding and cached-suffix masks run the fused op, not the N^2 fallback."""

    def forbidden(*args, **kwargs):
        raise AssertionError("materialised fallback used for a mask the op can express")

    monkeypatch.setattr(hf_attention, "materialised_suppressed_attention", forbidden)
    calls = []
    real_op = hf_attention.suppressed_attention

    def counting_op(*args, **kwargs):
        calls.append(kwargs["causal"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "suppressed_attention", counting_op)
    for family in ("llama", "bert", "gpt2"):
        model = build(family)
        inputs = make_inputs(family, batch=3)
        with atman_kernels.suppression(random_factors(3, 10)):
            run(model, inputs, "atman")
    model = build("llama")
    with torch.no_grad(), atman_attention(model):
        model.generate(**make_inputs("llama", 2, 6), max_new_tokens=3, do_sample=False)
    assert calls and any(calls) and not all(calls)


def test_inference_mode_with_padding():
    model = build("llama")
    inputs = make_inputs("llama", batch=3)
    ref = run(model, inputs, "sdpa")
    model.set_attn_implementation("atman")
    with torch.inference_mode():
        got = model(**inputs).logits
    assert_close(got, ref, valid_positions(inputs), atol=1e-5)


def test_custom_4d_float_mask_with_bias_runs_the_exact_fallback():
    """A user 4D additive mask with a non-zero bias is neither causal nor padding."""
    model = build("llama")
    n = 8
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    bias = torch.randn(2, 1, n, n, generator=g) * 0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = bias.masked_fill(~causal, torch.finfo(torch.float32).min)
    factors = random_factors(2, n)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with atman_kernels.suppression(factors):
        expected = run(model, inputs, CHECK)
        got = run(model, inputs, "atman")
    assert_close(got, expected, torch.ones(2, n, dtype=torch.bool), atol=1e-4)


def test_built_with_atman_implementation():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="atman").eval()
    assert model.config._attn_implementation == "atman"
    inputs = make_inputs("gpt2", batch=2)
    got = run(model, inputs, "atman")
    ref = run(model, inputs, "sdpa")
    assert_close(got, ref, valid_positions(inputs), atol=1e-5)


def test_switch_is_restored_on_error():
    model = build("bert")
    model.set_attn_implementation("eager")
    with pytest.raises(KeyError, match="boom"), atman_attention(model):
        assert model.config._attn_implementation == "atman"
        raise KeyError("boom")
    assert model.config._attn_implementation == "eager"


def test_factor_batch_must_match_model_batch():
    model = build("llama")
    inputs = make_inputs("llama", batch=1, pad=False)
    with atman_kernels.suppression(random_factors(3, 10)), pytest.raises(
        ValueError, match=r"3 variants but the model's batch is 1.*expand"
    ):
        run(model, inputs, "atman")
    inputs = make_inputs("llama", batch=2, pad=False)
    with atman_kernels.suppression(random_factors(3, 10)), pytest.raises(
        ValueError, match="3 variants but the model's batch is 2"
    ):
        run(model, inputs, "atman")


def test_layer_subset_without_layer_index_is_an_error():
    model = build("vit")
    model.set_attn_implementation("atman")  # no atman_attention(): indices never assigned
    with atman_kernels.suppression(random_factors(2, 17), layers=[0]), pytest.raises(
        ValueError, match="layer index"
    ):
        run(model, make_inputs("vit", 2), "atman")


# --- a model whose attention ignores the interface ------------------------------------------
class HandRolledConfig(PretrainedConfig):
    model_type = "hand_rolled_test"

    def __init__(self, hidden_size=16, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class HandRolledSelfAttn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return w @ v


class HandRolledModel(PreTrainedModel):
    config_class = HandRolledConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = HandRolledSelfAttn(config.hidden_size)

    def forward(self, x):
        return self.attn(x)


def test_model_not_routing_through_interface_is_a_clear_error():
    model = HandRolledModel(HandRolledConfig())
    with pytest.raises(NotImplementedError, match="HandRolledModel.*AttentionInterface"):
        with atman_attention(model):
            pass
    with pytest.raises(TypeError, match="Sequential.*swap_multihead_attention"):
        with atman_attention(nn.Sequential(nn.Linear(2, 2))):
            pass


def test_attention_backend_context_reaches_every_layer(monkeypatch):
    """attention_backend("reference") routes every fused call to the reference op, same output."""
    backends = []
    real_op = hf_attention.suppressed_attention

    def recording_op(*args, **kwargs):
        backends.append(kwargs["backend"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "suppressed_attention", recording_op)
    model = build("llama")
    inputs = make_inputs("llama", batch=3)
    with atman_kernels.suppression(random_factors(3, 10)):
        fused = run(model, inputs, "atman")
        assert set(backends) == {"auto"}
        backends.clear()
        with atman_kernels.attention_backend("reference"):
            reference = run(model, inputs, "atman")
    assert backends and set(backends) == {"reference"}
    assert_close(fused, reference, valid_positions(inputs), atol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        with atman_kernels.attention_backend("cuda"):
            pass


# ----------------------------------------------------------------------------- soft-capping
# and sinks: Gemma 2 and VaultGemma pass softcap= (and have sliding-window layers), GPT-OSS
# passes s_aux= (and has sliding-window layers). Small configs where the cap and the sinks bite:
# a cap of 2 on scores of a few units (query_pre_attn_scalar = head dim), sinks of a few units.
def _gemma2_softcap(cap=2.0):
    return Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
            max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=cap,
            initializer_range=0.5,
        )
    )


def _vaultgemma_softcap(cap=2.0):
    return VaultGemmaForCausalLM(
        VaultGemmaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
            max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=cap,
            initializer_range=0.5,
        )
    )


def _gpt_oss_sinks():
    model = GptOssForCausalLM(
        GptOssConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4,
            initializer_range=0.5,
            # YaRN as GPT-OSS ships it, scaled to 64 positions (no mismatch warning)
            rope_parameters=dict(rope_type="yarn", factor=2.0, beta_fast=32.0, beta_slow=1.0,
                                 truncate=False, original_max_position_embeddings=32,
                                 rope_theta=150000.0),
        )
    )
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(4, generator=g) * 2.0)
    return model


CAPPED = {"gemma2": _gemma2_softcap, "vaultgemma": _vaultgemma_softcap, "gpt_oss": _gpt_oss_sinks}
# The argument each family's attention receives, and a build of the same weights without it.
CAPPED_ARG = {"gemma2": "softcap", "vaultgemma": "softcap", "gpt_oss": "s_aux"}
WITHOUT_FEATURE = {
    "gemma2": lambda: _gemma2_softcap(cap=None),
    "vaultgemma": lambda: _vaultgemma_softcap(cap=None),
    "gpt_oss": _gpt_oss_sinks,  # sinks set to -1e4 (no weight) by build_capped
}


def build_capped(family: str, without_feature: bool = False) -> PreTrainedModel:
    torch.manual_seed(0)
    model = (WITHOUT_FEATURE if without_feature else CAPPED)[family]().eval()
    if without_feature and family == "gpt_oss":
        with torch.no_grad():  # sinks far below every score: no weight
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
    return model


@pytest.mark.parametrize("family", list(CAPPED))
def test_softcap_and_sink_models_without_factors_match_eager(family):
    """transformers' own eager attention against "atman",
    with no suppression and with factors all 1; sliding-window layers included (seq 10 >
    window 4)."""
    model = build_capped(family)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    inputs = make_inputs(family, batch=3)
    valid = valid_positions(inputs)
    eager = run(model, inputs, "eager")
    with atman_attention(model):
        got = run(model, inputs, "atman")
        with atman_kernels.suppression(torch.ones(3, 10)):
            ones = run(model, inputs, "atman")
    assert_close(got, eager, valid, atol=1e-5)
    assert_close(ones, eager, valid, atol=1e-5)
    # no sdpa comparison: sdpa cannot soft-cap or take sinks (transformers 5.0 still offers
    # sdpa for Gemma 2 and computes without the cap: 5.7 away from its own eager there)
    # the cap / the sinks change the model's output: ignoring them would fail above
    other = run(build_capped(family, without_feature=True), inputs, "eager")
    assert float((other - eager).abs().amax(-1)[valid].max()) > 1e-2


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", list(CAPPED))
def test_softcap_and_sink_models_with_factors_match_independent_eager(family, mode):
    check_factors_against_independent_eager(build_capped(family), family, mode,
                                            plain_impl="eager")


@pytest.mark.parametrize("family", list(CAPPED))
def test_softcap_and_sinks_reach_the_fused_op_and_the_window_fallback(family, monkeypatch):
    """Full-attention layers run the fused op with the cap / sinks, sliding-window layers (a
    mask that is no causal/padding pattern) the materialised fallback with them; every layer
    is reached and suppressed."""
    seen = []
    real_op = hf_attention.suppressed_attention
    real_fallback = hf_attention.materialised_suppressed_attention

    def op(*args, **kwargs):
        seen.append(("fused", kwargs["softcap"], kwargs["sinks"]))
        return real_op(*args, **kwargs)

    def fallback(*args, **kwargs):
        seen.append(("materialised", kwargs["softcap"], kwargs["sinks"]))
        return real_fallback(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "suppressed_attention", op)
    monkeypatch.setattr(hf_attention, "materialised_suppressed_attention", fallback)
    model = build_capped(family)
    inputs = make_inputs(family, batch=3)
    with atman_attention(model), torch.no_grad(), atman_hf.count_attention_calls() as counts:
        with atman_kernels.suppression(random_factors(3, seq_len(inputs))):
            model(**inputs)
    atman_hf.check_layers_routed(model, counts, layers=range(2), suppressed=True)
    assert [path for path, _, _ in seen] == ["materialised", "fused"]  # sliding, then full
    for _, cap, sinks in seen:
        if CAPPED_ARG[family] == "softcap":
            assert cap == model.config.attn_logit_softcapping and sinks is None
        else:
            assert cap is None and sinks is not None and tuple(sinks.shape) == (4,)


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_softcap_and_sink_models_cached_decoding_equals_full_recompute(family, mode):
    """Prefill + decode through the model's cache (sliding-window layers keep only their
    window) under suppression equals recomputing the whole sequence at every step."""
    model = build_capped(family)
    batch, prompt = 3, 7
    ids = torch.randint(0, VOCAB, (batch, prompt + 4), generator=torch.Generator().manual_seed(3))
    factors = random_factors(batch, ids.shape[1])
    with torch.no_grad(), atman_attention(model), atman_kernels.suppression(factors, mode=mode):
        cache = DynamicCache(config=model.config)
        model(ids[:, :prompt], **_cache_kw(model, cache), use_cache=True)
        for step in range(prompt, ids.shape[1]):
            full = model(ids[:, : step + 1]).logits[:, -1]
            out = model(ids[:, step : step + 1], **_cache_kw(model, cache))
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_causal_suffix_mask_is_built_once_with_its_plan_and_equals_sdpas():
    """A chunk of queries on top of a cached prefix (prefix reuse) gets the true bottom-right
    causal mask with its plan attached (the attention skips analysing Nq x Nk bools); padding,
    a gap before the queries or another mask function go the general way."""
    import inspect

    from transformers.masking_utils import causal_mask_function, sdpa_mask

    from atman_kernels.hf import atman_mask

    new_api = "q_length" in inspect.signature(sdpa_mask).parameters

    def request(q_len, kv_len, first, padding=None, function=causal_mask_function):
        kw = dict(batch_size=2, kv_length=kv_len, kv_offset=0, mask_function=function,
                  attention_mask=padding, allow_is_causal_skip=True)
        if new_api:
            kw.update(q_length=q_len, q_offset=first, device="cpu")
        else:
            kw.update(cache_position=torch.arange(first, first + q_len))
        return kw

    def reference(kw):
        mask = sdpa_mask(**{**kw, "allow_is_causal_skip": False})
        return mask.expand(2, 1, -1, -1) if mask.shape[0] == 1 else mask

    suffix = request(3, 7, 4)
    mask = atman_mask(**suffix)
    assert mask.shape == (2, 1, 3, 7) and torch.equal(mask, reference(suffix))
    assert mask._atman_plan.fused and mask._atman_plan.causal and mask._atman_plan.key_len == 7
    padded = request(3, 7, 4, padding=torch.tensor([[0, 1, 1, 1, 1, 1, 1]] * 2).bool())
    gap = request(3, 7, 2)  # queries 2..4 of 7 keys: not the last positions
    for kw in (padded, gap):
        mask = atman_mask(**kw)
        assert not hasattr(mask, "_atman_plan") and torch.equal(
            mask.expand(2, 1, -1, -1), reference(kw))
