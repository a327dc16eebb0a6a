"""The "atman" attention refuses what it cannot compute exactly, and the call counter proves
that suppression reached every decoder layer.

Each refusal is shown on a real transformers model where one exists (DeepSeek-V3.2's sparse
``indices``, bigbird_pegasus's non-causal decoder, git's hand-computed text attention) and on a
direct call of the attention function for the arguments no small model reaches. Soft-capping
and sinks, refused until the op computed them, are now taken (their checks are here; the
models against eager are in test_hf.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AttentionInterface,
    BertConfig,
    BertModel,
    BigBirdPegasusConfig,
    BigBirdPegasusForCausalLM,
    GitConfig,
    GitForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bigbird_pegasus import modeling_bigbird_pegasus
from transformers.models.git import modeling_git

import atman_kernels
import atman_kernels.hf as atman_hf
import atman_kernels.hf.attention as hf_attention  # where the attention looks its guards up
from atman_kernels.hf import (
    HARMLESS_ATTENTION_KWARGS,
    REFUSED_ATTENTION_KWARGS,
    atman_attention,
    atman_attention_forward,
    check_layers_routed,
    count_attention_calls,
    decoder_attention_modules,
)

VOCAB = 61


def _ids(batch=2, seq=8, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _llama(layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    ).eval()


def _logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# ----------------------------------------------------------------------------- direct calls
class _Attn(nn.Module):
    """Stands in for a model's attention module in direct calls of the attention function."""

    def __init__(self, is_causal=True, is_decoder=None):
        super().__init__()
        self.is_causal = is_causal
        if is_decoder is not None:
            self.is_decoder = is_decoder


def _qkv(nq=5, nk=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, n, 8, generator=g) for n in (nq, nk, nk))


def _call(module=None, mask=None, nq=5, nk=5, **kwargs):
    q, k, v = _qkv(nq, nk)
    return atman_attention_forward(module or _Attn(), q, k, v, mask, scaling=0.3, **kwargs)[0]


@pytest.mark.parametrize("name", sorted(REFUSED_ATTENTION_KWARGS))
def test_refused_kwarg_is_an_error_naming_module_and_argument(name):
    with pytest.raises(NotImplementedError, match=rf"_Attn.*passes {name}=.*does not implement"):
        _call(**{name: torch.ones(2)})
    # the same keyword set to None (what most models pass) is no error, and changes nothing
    torch.testing.assert_close(_call(**{name: None}), _call(), rtol=0, atol=0)


def test_softcap_and_sinks_are_taken_not_refused():
    """Soft-capping (softcap= or the config's name attn_logit_softcapping=) and sinks (s_aux=
    or sinks=) reach the op: the result equals the op's reference with them."""
    assert not {"softcap", "attn_logit_softcapping", "s_aux", "sinks"} & set(
        REFUSED_ATTENTION_KWARGS
    )
    q, k, v = _qkv()
    sinks = torch.tensor([0.5, -1.0])

    def expected(**kw):
        out = atman_kernels.suppressed_attention(q, k, v, causal=True, scale=0.3,
                                                 backend="reference", **kw)  # fmt: skip
        return out.transpose(1, 2)

    torch.testing.assert_close(_call(softcap=0.7), expected(softcap=0.7))
    torch.testing.assert_close(_call(attn_logit_softcapping=0.7), expected(softcap=0.7))
    torch.testing.assert_close(_call(s_aux=sinks), expected(sinks=sinks))
    torch.testing.assert_close(_call(sinks=sinks), expected(sinks=sinks))
    torch.testing.assert_close(_call(softcap=0.7, s_aux=sinks), expected(softcap=0.7, sinks=sinks))
    assert float((_call(softcap=0.7) - _call()).abs().max()) > 1e-3
    # per head and row ([B, H, Nq, 1]): the materialised fallback, against the op per row
    rows = torch.linspace(-2, 2, 5)
    per_row = sinks[None, :, None, None] + rows[None, None, :, None]
    got = _call(sinks=per_row)
    for i in range(5):
        row = expected(sinks=sinks + rows[i])[:, i]
        torch.testing.assert_close(got[:, i], row)


def test_bad_softcap_and_sinks_arguments_are_errors_naming_the_module():
    with pytest.raises(ValueError, match=r"_Attn passes softcap= and attn_logit_softcapping= "
                       r"with different values"):  # fmt: skip
        _call(softcap=0.7, attn_logit_softcapping=0.8)
    torch.testing.assert_close(_call(softcap=0.7, attn_logit_softcapping=0.7),
                               _call(softcap=0.7))  # fmt: skip
    with pytest.raises(ValueError, match="_Attn passes both s_aux= and sinks="):
        _call(s_aux=torch.zeros(2), sinks=torch.zeros(2))
    with pytest.raises(NotImplementedError, match=r"_Attn passes s_aux=<tensor \(3,\).*shape "
                       r"\[2\]"):  # fmt: skip
        _call(s_aux=torch.zeros(3))
    with pytest.raises(NotImplementedError, match=r"_Attn passes sinks=<tensor \(1, 2, 5, 2\)"):
        _call(sinks=torch.zeros(1, 2, 5, 2))
    with pytest.raises(NotImplementedError, match="_Attn passes s_aux=.*floating tensor"):
        _call(s_aux=torch.zeros(2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="_Attn passes softcap='50'.*one number > 0"):
        _call(softcap="50")
    with pytest.raises(NotImplementedError, match="both softcap= and position_bias="):
        _call(softcap=0.7, position_bias=torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="softcap must be finite and > 0"):
        _call(softcap=-1.0)
    with pytest.raises(ValueError, match="sinks must be finite"):
        _call(s_aux=torch.tensor([0.0, float("nan")]))


def test_compressed_keys_are_refused():
    """DeepSeek-V4's compressed layers append summaries of token blocks to the keys (its
    sinks alone would now be taken): no factor reaches a token inside a summary."""
    module = _Attn()
    module.compressor = nn.Identity()
    with pytest.raises(NotImplementedError, match=r"_Attn appends compressed keys \(Identity"):
        _call(module, s_aux=torch.zeros(2))
    module.compressor = None  # a sliding-only layer of the same model: no compressed keys
    _call(module, s_aux=torch.zeros(2))


def test_unknown_kwarg_is_an_error():
    with pytest.raises(NotImplementedError, match=r"_Attn passes alibi=<tensor \(2, 5\).*"
                       r"does not know"):
        _call(alibi=torch.zeros(2, 5))
    with pytest.raises(NotImplementedError, match=r"head_scale=0.5"):
        _call(head_scale=0.5)


@pytest.mark.parametrize("name", sorted(HARMLESS_ATTENTION_KWARGS))
def test_allowlisted_kwarg_leaves_the_output_unchanged(name):
    plain = _call()
    value = torch.arange(5)[None] if name.endswith("ids") or name.endswith("position") else 1
    torch.testing.assert_close(_call(**{name: value}), plain, rtol=0, atol=0)


def test_output_attentions_true_is_refused_false_is_not():
    torch.testing.assert_close(_call(output_attentions=False), _call(), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        _call(output_attentions=True)


def test_sliding_window_without_a_mask_is_refused_only_when_it_would_cut_keys():
    # mask None: transformers skipped it, legitimate only while every key is in the window
    torch.testing.assert_close(_call(sliding_window=5), _call(), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="sliding window of 4 keys but received no"):
        _call(sliding_window=4)
    # with a mask the window is in the mask: no error
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    _call(mask=mask, sliding_window=4)


def test_non_causal_decoder_self_attention_without_mask_is_refused():
    leaky = _Attn(is_causal=False, is_decoder=True)
    with pytest.raises(NotImplementedError, match="is_causal=False although it is a decoder"):
        _call(leaky)
    # not refused: one query (nothing to leak), an explicit is_causal from the caller, a mask,
    # cross-attention, or a module that is no decoder (an encoder is bidirectional)
    _call(leaky, nq=1)
    _call(leaky, is_causal=False)
    _call(leaky, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
    cross = _Attn(is_causal=False, is_decoder=True)
    cross.is_cross_attention = True
    _call(cross)
    _call(_Attn(is_causal=False))


# ----------------------------------------------------------------------------- real models
def _deepseek_v32():
    import transformers

    if not hasattr(transformers, "DeepseekV32ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V3.2 (its sparse "
                    "`indices` attention argument arrived later)")
    torch.manual_seed(0)
    return transformers.DeepseekV32ForCausalLM(
        transformers.DeepseekV32Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
            topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_n_heads=2,
            index_head_dim=16, index_topk=4, max_position_embeddings=64,
        )
    ).eval()


@pytest.mark.parametrize(
    "build, model_name, arg", [(_deepseek_v32, "DeepseekV32ForCausalLM", "indices")]
)
def test_model_with_unimplemented_argument_fails_at_its_first_attention_call(
    build, model_name, arg
):
    model = build()
    with atman_attention(model), count_attention_calls() as counts:
        with pytest.raises(
            NotImplementedError,
            match=rf"{model_name} \(model\.layers\.0\.self_attn: \w+Attention\) passes {arg}=",
        ):
            with torch.no_grad():
                model(input_ids=_ids())
    assert counts.total == 0  # not one attention call completed
    # the same holds when "atman" is set without atman_attention (the module class is named)
    model = build()
    model.set_attn_implementation("atman")
    with pytest.raises(NotImplementedError, match=rf"Attention \(model_type '\w+'\) passes {arg}="):
        with torch.no_grad():
            model(input_ids=_ids())


def _bigbird():
    torch.manual_seed(0)
    return BigBirdPegasusForCausalLM(
        BigBirdPegasusConfig(
            vocab_size=VOCAB, d_model=32, decoder_layers=2, encoder_layers=2,
            decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=64,
            encoder_ffn_dim=64, max_position_embeddings=64, attention_type="original_full",
        )
    ).eval()


def test_skipped_mask_leaks_the_future_in_bigbird_pegasus_decoder():
    """Why the causal guard exists: with sdpa's mask function (which "atman" uses) the causal
    mask is skipped, and an attention that trusts the module's is_causal=False lets the first
    position see the last token; eager (always a materialised mask) does not."""
    AttentionInterface.register("plain_fn_test", sdpa_attention_forward)
    AttentionMaskInterface.register("plain_fn_test", sdpa_mask)
    model = _bigbird()
    ids = _ids(1, 8)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    for impl, leaks in (("plain_fn_test", True), ("eager", False)):
        first = _logits(model, impl, ids)[0, 0]
        first_changed = _logits(model, impl, changed)[0, 0]
        assert bool((first - first_changed).abs().max() > 1e-4) == leaks, impl


def test_bigbird_pegasus_is_refused(monkeypatch):
    model = _bigbird()
    # at once: the class does not promise standard attention routing
    with pytest.raises(NotImplementedError, match=r"BigBirdPegasusForCausalLM does not set "
                       r"_supports_attention_backend"):
        with atman_attention(model):
            pass
    # loaded or switched to "atman" directly: at the first attention call
    model.set_attn_implementation("atman")
    with pytest.raises(NotImplementedError, match=r"none of the model classes of "
                       r"transformers\.models\.bigbird_pegasus.*_supports_attention_backend"):
        with torch.no_grad():
            model(input_ids=_ids())
    # were the class to claim support, the leak itself is caught at the first call
    monkeypatch.setattr(
        modeling_bigbird_pegasus.BigBirdPegasusPreTrainedModel, "_supports_attention_backend",
        True,
    )
    model = _bigbird()
    with atman_attention(model), pytest.raises(
        NotImplementedError,
        match=r"BigBirdPegasusForCausalLM \(model\.decoder\.layers\.0\.self_attn: .*"
        r"is_causal=False although it is a decoder",
    ):
        with torch.no_grad():
            model(input_ids=_ids())


def _git():
    torch.manual_seed(0)
    return GitForCausalLM(
        GitConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, image_size=16, patch_size=8,
            ),
        )
    ).eval()


def test_git_is_refused_and_its_text_layers_are_reported_unrouted(monkeypatch):
    model = _git()
    with pytest.raises(NotImplementedError, match="GitForCausalLM does not set"):
        with atman_attention(model):
            pass
    # Were the class to claim support, its text attention would still bypass "atman" (only the
    # vision tower routes): suppression would change nothing. The routing check says so.
    monkeypatch.setattr(modeling_git.GitPreTrainedModel, "_supports_attention_backend", True)
    layers = decoder_attention_modules(model)
    assert [[type(m).__name__ for m in layer] for layer in layers] == [["GitSelfAttention"]] * 2
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with atman_attention(model), torch.no_grad(), count_attention_calls() as counts:
        with atman_kernels.suppression(torch.rand(2, 8 + 5)):
            model(input_ids=_ids(), pixel_values=pixels)
    assert counts.total > 0  # the vision tower did go through "atman"
    with pytest.raises(
        NotImplementedError,
        match=r"GitForCausalLM: the attention of decoder layer\(s\) 0-1 \(GitSelfAttention\) "
        r"never went through the 'atman' attention",
    ):
        check_layers_routed(model, counts)


# ----------------------------------------------------------------------------- counting
def test_counts_and_routing_check_on_llama():
    model = _llama(layers=3)
    ids = _ids(3, 8)
    per_layer = decoder_attention_modules(model)
    assert [layer for layer in per_layer] == [[blk.self_attn] for blk in model.model.layers]
    with atman_attention(model), torch.no_grad():
        with count_attention_calls() as plain:
            model(input_ids=ids)
        check_layers_routed(model, plain)
        assert [plain.calls(m[0]) for m in per_layer] == [1, 1, 1]
        with pytest.raises(NotImplementedError, match="with suppression factors applied"):
            check_layers_routed(model, plain, suppressed=True)

        factors = torch.rand(3, 8, generator=torch.Generator().manual_seed(1))
        with count_attention_calls() as outer, atman_kernels.suppression(factors, layers=[1]):
            with count_attention_calls() as inner:
                model(input_ids=ids)
            model(input_ids=ids)
    assert [inner.suppressed_calls(m[0]) for m in per_layer] == [0, 1, 0]
    assert [outer.calls(m[0]) for m in per_layer] == [2, 2, 2]
    assert [outer.suppressed_calls(m[0]) for m in per_layer] == [0, 2, 0]
    check_layers_routed(model, inner, layers=[1], suppressed=True)
    with pytest.raises(NotImplementedError, match=r"decoder layer\(s\) 0, 2 \(LlamaAttention\)"):
        check_layers_routed(model, inner, suppressed=True)
    # calls outside the block are not counted
    with torch.no_grad(), atman_attention(model):
        model(input_ids=ids)
    assert outer.total == 6


@pytest.mark.parametrize("layers", [[99], [-1], [0, 3], [True]])
def test_routing_check_rejects_layer_indices_out_of_range(layers):
    model = _llama(layers=3)
    with atman_attention(model), torch.no_grad(), count_attention_calls() as counts:
        model(input_ids=_ids())
    with pytest.raises(ValueError, match=r"layers must be decoder layer indices in 0\.\.2 "
                       r"\(LlamaForCausalLM has 3 decoder layers\)"):
        check_layers_routed(model, counts, layers=layers)


def test_decoder_layers_of_encoder_models_are_found():
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64),
        add_pooling_layer=False,
    ).eval()
    assert decoder_attention_modules(bert) == [[blk.attention.self] for blk in bert.encoder.layer]
    with atman_attention(bert), torch.no_grad(), count_attention_calls() as counts:
        bert(input_ids=_ids())
    check_layers_routed(bert, counts, layers=[0, 1])


# --- custom models: one layer computes its attention by hand, sub-model without the flag -----
class TinyConfig(PretrainedConfig):
    model_type = "atman_guard_test"

    def __init__(self, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 hand_rolled=(), **kwargs):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hand_rolled = tuple(hand_rolled)
        super().__init__(**kwargs)


def eager_attention_forward(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
    w = torch.softmax((q @ k.transpose(-1, -2)) * scaling, dim=-1)
    return (w @ v).transpose(1, 2).contiguous(), None


class TinyRoutedAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        # the patterns transformers' model files use: each release recognises routing model
        # classes by its own (5.24: get_interface; 5.0: indexing the interface by the name)
        fn = eager_attention_forward
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward)
        elif self.config._attn_implementation != "eager":
            fn = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = fn(self, q, k, v, None, scaling=q.shape[-1] ** -0.5)
        return out.reshape(b, n, -1)


class TinyHandRolledAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


class TinyLayer(nn.Module):
    def __init__(self, config, i):
        super().__init__()
        cls = TinyHandRolledAttention if i in config.hand_rolled else TinyRoutedAttention
        self.self_attn = cls(config, i)

    def forward(self, x):
        return x + self.self_attn(x)


class TinyModel(PreTrainedModel):
    config_class = TinyConfig
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(TinyLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TinyTowerWithoutFlag(TinyModel):
    _supports_attention_backend = False


class TinyWithTower(TinyModel):
    def __init__(self, config):
        super().__init__(config)
        self.tower = TinyTowerWithoutFlag(config)

    def forward(self, x, use_tower=False):
        return self.tower(x) if use_tower else super().forward(x)


def test_hand_rolled_layer_is_reported_by_index():
    torch.manual_seed(0)
    model = TinyModel(TinyConfig(num_hidden_layers=3, hand_rolled=[1])).eval()
    x = torch.randn(2, 5, 16)
    with atman_attention(model), torch.no_grad(), count_attention_calls() as counts:
        model(x)
    assert [type(m[0]).__name__ for m in decoder_attention_modules(model)] == [
        "TinyRoutedAttention", "TinyHandRolledAttention", "TinyRoutedAttention"
    ]
    with pytest.raises(NotImplementedError, match=r"TinyModel: the attention of decoder "
                       r"layer\(s\) 1 \(TinyHandRolledAttention\) never went through"):
        check_layers_routed(model, counts)
    check_layers_routed(model, counts, layers=[0, 2])


def test_layer_index_that_disagrees_with_the_position_is_reported():
    torch.manual_seed(0)
    model = TinyModel(TinyConfig(num_hidden_layers=2)).eval()
    model.layers[0].self_attn.layer_idx, model.layers[1].self_attn.layer_idx = 1, 0
    with atman_attention(model), torch.no_grad(), count_attention_calls() as counts:
        model(torch.randn(1, 4, 16))
    check_layers_routed(model, counts)  # all layers: numbering does not matter
    with pytest.raises(NotImplementedError, match=r"report layer indices \[1\] to the "
                       r"suppression"):
        check_layers_routed(model, counts, layers=[0])


def test_sub_model_without_the_flag_fails_at_its_first_call_only():
    torch.manual_seed(0)
    model = TinyWithTower(TinyConfig()).eval()
    x = torch.randn(1, 4, 16)
    with atman_attention(model), torch.no_grad():
        model(x)  # the main layers: fine
        with pytest.raises(NotImplementedError, match=r"TinyWithTower \(tower\.layers\.0\."
                           r"self_attn: TinyRoutedAttention\): TinyTowerWithoutFlag does not set"):
            model(x, use_tower=True)


def test_model_class_without_flag_is_refused_at_once():
    class TinyNoFlag(TinyModel):
        _supports_attention_backend = False

    with pytest.raises(NotImplementedError, match="TinyNoFlag does not set "
                       "_supports_attention_backend = True"):
        with atman_attention(TinyNoFlag(TinyConfig())):
            pass


def test_routed_non_causal_encoder_is_no_decoder():
    """TinyModel attends bidirectionally with no mask; it is no causal LM: no refusal, and
    atman equals the plain attention it stands in for."""
    torch.manual_seed(0)
    model = TinyModel(TinyConfig()).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(x)
        with atman_attention(model):
            got = model(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_every_call_is_checked(monkeypatch):
    """The argument check runs on every call, and Llama passes only allowlisted arguments."""
    model = _llama(layers=2)
    seen = []
    real = hf_attention._check_kwargs

    def spy(module, kwargs):
        seen.append(sorted(k for k, v in kwargs.items() if v is not None))
        return real(module, kwargs)

    monkeypatch.setattr(hf_attention, "_check_kwargs", spy)
    with atman_attention(model), torch.no_grad():
        model(input_ids=_ids())
    assert len(seen) == 2
    assert set(seen[0]) <= set(HARMLESS_ATTENTION_KWARGS) | {"output_attentions"}


# --- decoder layers that sit where get_decoder() does not point -------------------------------
def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(**kw)).eval()


def test_decoder_layers_inside_a_nested_model_with_the_same_config_are_found():
    """Llama 4's ForCausalLM is its own get_decoder() and holds its layers in a nested
    PreTrainedModel (Llama4TextModel, same config); ModernBERT-decoder's get_decoder() is its
    LM head's nn.Linear; DINOv2's encoder is itself a PreTrainedModel. Each layer's attention
    is found and every one is reached by "atman"."""
    from transformers import (
        Dinov2Config,
        Dinov2ForImageClassification,
        Llama4ForCausalLM,
        Llama4TextConfig,
        ModernBertDecoderConfig,
        ModernBertDecoderForCausalLM,
    )

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    llama4 = _tiny(Llama4TextConfig, Llama4ForCausalLM, vocab_size=VOCAB, num_key_value_heads=2,
                   head_dim=8, intermediate_size_mlp=64, num_local_experts=2, **small)
    modernbert = _tiny(ModernBertDecoderConfig, ModernBertDecoderForCausalLM, vocab_size=VOCAB,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                       sep_token_id=2, **small)
    dinov2 = _tiny(Dinov2Config, Dinov2ForImageClassification, image_size=16, patch_size=8,
                   mlp_ratio=2, **{k: v for k, v in small.items() if k != "intermediate_size"})
    cases = [
        (llama4, [layer.self_attn for layer in llama4.model.layers], {"input_ids": _ids()}),
        (modernbert, [layer.attn for layer in modernbert.model.layers], {"input_ids": _ids()}),
        # the module that calls the interface: the layer's attention, or (transformers 5.0)
        # the self-attention inside it
        (dinov2, [getattr(layer.attention, "attention", layer.attention)
                  for layer in dinov2.dinov2.encoder.layer],
         {"pixel_values": torch.randn(2, 3, 16, 16)}),
    ]
    for model, attention, inputs in cases:
        assert decoder_attention_modules(model) == [[m] for m in attention], type(model)
        with atman_attention(model), torch.no_grad(), count_attention_calls() as counts:
            model(**inputs)
        check_layers_routed(model, counts, layers=[0, 1])


def test_a_vision_tower_is_not_taken_for_the_decoder():
    """A nested PreTrainedModel with a config of its own (git's vision tower: 2 routed layers)
    is not the decoder's stack; the text layers are (and are reported as unrouted)."""
    layers = decoder_attention_modules(_git())
    assert [[type(m).__name__ for m in layer] for layer in layers] == [["GitSelfAttention"]] * 2


def test_hybrid_family_read_by_hand_is_accepted_others_without_the_flag_are_not():
    """Falcon-H1 sets no _supports_attention_backend, but its attention calls the interface with
    the standard arguments (read in transformers' modeling file): it is in
    VERIFIED_ATTENTION_ROUTING and switches to "atman"; its Mamba mixer is no attention."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    assert not FalconH1ForCausalLM._supports_attention_backend
    assert "FalconH1PreTrainedModel" in atman_hf.VERIFIED_ATTENTION_ROUTING
    model = _tiny(FalconH1Config, FalconH1ForCausalLM, vocab_size=VOCAB, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, mamba_d_ssm=64, mamba_n_heads=4,
                  mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)
    layers = decoder_attention_modules(model)
    assert [[type(m).__name__ for m in layer] for layer in layers] == [["FalconH1Attention"]] * 2
    with atman_attention(model), torch.no_grad(), count_attention_calls() as counts:
        model(input_ids=_ids(1))
    check_layers_routed(model, counts)
    # a model class outside the list that does not set the flag is still refused at once
    with pytest.raises(NotImplementedError, match="BigBirdPegasusForCausalLM does not set"):
        with atman_attention(_bigbird()):
            pass
