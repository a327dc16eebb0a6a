"""The per-call guards of the "atman" attention: exact or refused, before any work.

Every keyword argument an attention call carries is implemented, harmless (with the reason,
:data:`HARMLESS_ATTENTION_KWARGS`) or refused (:data:`REFUSED_ATTENTION_KWARGS`; an unknown one
too); soft-capping and sink logits are read and checked here; a sliding window the mask does
not encode, a non-causal decoder self-attention without a mask and compressed keys are
refused. Each error names the module (:func:`._tags._where`) and the argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from ._tags import _DECODER_ATTR, _is_cross_attention, _short, _where

# Attention modules whose calls hold one window of a feature map per batch row (Swin and the
# families that copy its attention): suppressed calls need a KeyLayout to place the factors.
# Both the outer and the inner class names: which one calls the interface varies by release.
WINDOWED_ATTENTION = frozenset(
    f"{family}{part}" for family in ("Swin", "Swinv2", "DonutSwin", "MaskFormerSwin", "ClapAudio")
    for part in ("Attention", "SelfAttention"))


# What an attention call may carry besides q, k, v, the mask, dropout, scaling and is_causal.
# transformers' model code passes extra keywords to the attention function (literally or
# through **kwargs from the model's forward); "eager" and "sdpa" ignore most of them. The
# "atman" attention must never ignore one that changes the result, so every keyword whose
# value is not None must be implemented here, or listed below as harmless with the reason,
# or the call is an error naming the model, the module and the keyword.

# Implemented by atman_attention_forward itself.
_IMPLEMENTED_KWARGS = frozenset(
    {
        "atman_factors",  # the suppression (module docstring)
        "atman_mode",
        "atman_layers",
        "position_bias",  # additive score bias (T5-style): joins the scores exactly
        "sliding_window",  # checked per call: the mask must encode the window (_check_window)
        "output_attentions",  # False is harmless; True is refused (no weights are returned)
        "softcap",  # soft-capping c * tanh(s / c) of the scaled scores (Gemma 2): in the op
        "attn_logit_softcapping",  # the same under the config's name
        "s_aux",  # per-head sink logits (GPT-OSS): in the op
        "sinks",  # the same under another name; per-row sinks run the materialised fallback
    }
)


HARMLESS_ATTENTION_KWARGS: Mapping[str, str] = MappingProxyType(
    {
        "position_ids": "positions are applied before attention (rotary or absolute "
        "embeddings), and the mask function builds any packed-sequence mask from them",
        "cache_position": "query positions in the cache; already applied to keys/values and "
        "to the mask",
        "use_cache": "the module has already read and written its KV cache: the keys and "
        "values passed in are complete",
        "past_key_values": "the cache object; the module already merged cached keys/values",
        "past_key_value": "the cache object (older name); already merged by the module",
        "encoder_hidden_states": "already projected to keys/values by the module",
        "encoder_attention_mask": "a cross-attention module passes it as attention_mask",
        "output_hidden_states": "a model-level output flag",
        "output_router_logits": "a mixture-of-experts output flag",
        "return_dict": "a model-level output flag",
        "logits_to_keep": "slices the LM head's input, after every attention layer",
        "num_items_in_batch": "loss normalisation",
        "seq_idx": "packed-sequence index read by the state-space layers of hybrid models; "
        "attention gets the packing through the mask",
        "deterministic": "flash-attention's switch for a deterministic backward (ModernBERT); "
        "no effect on a forward",
    }
)


REFUSED_ATTENTION_KWARGS: Mapping[str, str] = MappingProxyType(
    {
        "indices": "sparse attention (each query attends only to the indexed keys, "
        "DeepSeek-V3.2 style); 'atman' computes dense attention",
        "block_indices": "block-sparse attention (each query block attends only to the "
        "indexed key blocks); 'atman' computes dense attention",
        "cu_seq_lens_q": "flash-attention packed sequences (varlen); 'atman' reads the "
        "attention mask instead: pass position_ids so the mask separates the sequences",
        "cu_seq_lens_k": "flash-attention packed sequences (varlen); 'atman' reads the "
        "attention mask instead: pass position_ids so the mask separates the sequences",
        "max_length_q": "flash-attention packed sequences (varlen)",
        "max_length_k": "flash-attention packed sequences (varlen)",
    }
)


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    for name, value in kwargs.items():
        if value is None or name in _IMPLEMENTED_KWARGS or name in HARMLESS_ATTENTION_KWARGS:
            continue
        if name in REFUSED_ATTENTION_KWARGS:
            raise NotImplementedError(
                f"{_where(module)} passes {name}= to its attention: "
                f"{REFUSED_ATTENTION_KWARGS[name]}, which the 'atman' attention does not "
                "implement, so its result would be wrong; this model cannot be explained "
                "exactly (use attn_implementation='eager' to run it without AtMan)"
            )
        raise NotImplementedError(
            f"{_where(module)} passes {name}={_short(value)} to its attention, an argument "
            "the 'atman' attention does not know, so it cannot tell whether ignoring it "
            "keeps the result exact; refusing rather than returning possibly wrong numbers "
            "(known harmless arguments: atman_kernels.hf.HARMLESS_ATTENTION_KWARGS)"
        )
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            f"{_where(module)}: output_attentions=True asks for attention weights, which the "
            "'atman' attention does not return; call the model without output_attentions"
        )


def _softcap_from_kwargs(module, kwargs: dict, position_bias) -> float | None:
    """The soft-capping value from ``softcap=`` or ``attn_logit_softcapping=``, or None."""
    given = {
        name: kwargs[name]
        for name in ("softcap", "attn_logit_softcapping")
        if kwargs.get(name) is not None
    }
    if not given:
        return None
    values = {float(v) if isinstance(v, (int, float)) else v for v in given.values()}
    if len(values) > 1:
        raise ValueError(
            f"{_where(module)} passes softcap= and attn_logit_softcapping= with different "
            f"values ({given}); expected one soft-capping value"
        )
    name, value = next(iter(given.items()))
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NotImplementedError(
            f"{_where(module)} passes {name}={_short(value)}; the 'atman' attention takes a "
            "soft-capping value that is one number > 0"
        )
    if position_bias is not None:
        raise NotImplementedError(
            f"{_where(module)} passes both {name}= and position_bias= to its attention: "
            "whether the bias is added before or after the soft cap is not defined, so the "
            "'atman' attention refuses rather than guess"
        )
    return float(value)


def _sinks_from_kwargs(module, kwargs: dict, query: torch.Tensor, key) -> torch.Tensor | None:
    """Sink logits from ``s_aux=`` or ``sinks=``: [Hq] (per head: the fused op takes them) or
    broadcastable to [B, Hq, Nq, 1] (per head and row: the materialised fallback); None."""
    given = {name: kwargs[name] for name in ("s_aux", "sinks") if kwargs.get(name) is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(
            f"{_where(module)} passes both s_aux= and sinks=; expected one set of sink logits"
        )
    name, sinks = next(iter(given.items()))
    batch, heads, len_q = max(query.shape[0], key.shape[0]), query.shape[1], query.shape[2]
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise NotImplementedError(
            f"{_where(module)} passes {name}={_short(sinks)}; the 'atman' attention takes sink "
            "logits as a floating tensor"
        )
    per_head = sinks.dim() == 1 and sinks.shape[0] == heads
    per_row = (
        sinks.dim() == 4
        and sinks.shape[0] in (1, batch)
        and sinks.shape[1] == heads
        and sinks.shape[2] in (1, len_q)
        and sinks.shape[3] == 1
    )
    if not (per_head or per_row):
        raise NotImplementedError(
            f"{_where(module)} passes {name}={_short(sinks)}; the 'atman' attention takes sink "
            f"logits of shape [{heads}] (one per query head) or [1 or {batch}, {heads}, 1 or "
            f"{len_q}, 1] (per head and row)"
        )
    if sinks.device != query.device:
        sinks = sinks.to(query.device)
    return sinks.detach()


def _check_compressed_keys(module: torch.nn.Module) -> None:
    """Keys that summarise blocks of tokens (DeepSeek-V4's CSA/HCA ``compressor``: compressed
    entries appended to the key axis) are no token position, so no factor can suppress a token
    inside them: the token would leak back through its block's summary."""
    if getattr(module, "compressor", None) is not None:
        raise NotImplementedError(
            f"{_where(module)} appends compressed keys ({type(module.compressor).__name__}: "
            "summaries of blocks of tokens) to its attention's key axis; suppressing a token "
            "cannot reach its share of those summaries, so the 'atman' attention cannot "
            "compute the suppression exactly and refuses"
        )


def _check_window(module, sliding_window, attention_mask, len_k: int) -> None:
    """A sliding window is exact only through the mask: transformers' mask function skips the
    mask only when every key fits in the window, so a None mask with more keys is wrong."""
    if sliding_window is None or attention_mask is not None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        raise NotImplementedError(
            f"{_where(module)} passes sliding_window={_short(sliding_window)}; the 'atman' "
            "attention understands an int window encoded in the attention mask only"
        )
    if len_k > sliding_window:
        raise NotImplementedError(
            f"{_where(module)} uses a sliding window of {sliding_window} keys but received no "
            f"attention mask for {len_k} keys, so the window would be ignored; build the model "
            "so that its mask function makes the sliding-window mask (transformers' "
            "create_sliding_window_causal_mask)"
        )


def _declares_decoder(module: torch.nn.Module) -> str | None:
    """Why ``module`` must attend causally, or None when nothing says so."""
    if getattr(module, "is_decoder", False) is True:
        return "the module sets is_decoder=True"
    if getattr(getattr(module, "config", None), "is_decoder", False) is True:
        return "its config sets is_decoder=True"
    causal_lm = getattr(module, _DECODER_ATTR, None)
    if causal_lm:
        return f"it is a decoder layer's self-attention of {causal_lm}, a causal LM"
    return None


def _check_causal(module, attention_mask, len_q: int, is_causal_arg) -> None:
    """A decoder's self-attention that calls itself non-causal, with no mask, leaks the future.

    transformers skips a plain causal mask (None) and lets the attention's ``is_causal`` say
    it; a module that says False (bigbird_pegasus's decoder) then sees future keys.
    """
    if attention_mask is not None or len_q < 2 or is_causal_arg is not None:
        return
    if getattr(module, "is_causal", True) or _is_cross_attention(module):
        return
    why = _declares_decoder(module)
    if why is not None:
        raise NotImplementedError(
            f"{_where(module)} says is_causal=False although it is a decoder's self-attention "
            f"({why}), and the mask function returned no mask (transformers skips a plain "
            "causal mask), so every query would see future keys; this model cannot be "
            "explained exactly with 'atman' (its 'eager' attention materialises the mask)"
        )
