"""AtMan attention for Hugging Face transformers (5.x) models, without editing model code.

Importing this module registers an attention implementation named ``"atman"`` with
transformers' ``AttentionInterface`` and a mask function of the same name with its
``AttentionMaskInterface`` (without the mask registration the causal mask silently arrives as
None). Any model whose attention routes through the interface can then use it::

    import atman_kernels
    from atman_kernels.hf import atman_attention

    with atman_attention(model), atman_kernels.suppression(factors, mode="paper"):
        logits = model(input_ids.expand(len(factors), -1)).logits

Where the suppression factors come from, first match wins:

1. forward keyword arguments ``atman_factors=`` ([B, N] tensor), ``atman_mode=`` and
   ``atman_layers=``, for models that pass ``**kwargs`` down to their attention (Llama, Qwen2,
   Mistral, GPT-2, BERT, ViT in transformers 5.23);
2. the :func:`atman_kernels.suppression` context.

Without factors the layer is plain attention and matches the ``"sdpa"`` implementation.

Masks. The registered mask function is transformers' own ``sdpa_mask``, so the attention
receives either None (plain causal or full attention, with sdpa's conventions) or a boolean
[B, 1, Nq, Nk] mask. The attention recognises the structure "bottom-right causal over the first
L keys, and key padding" (one check per mask tensor, shared by all layers of a forward) and runs
the fused :func:`atman_kernels.suppressed_attention`. Any other mask (sliding windows, packed
sequences, per-head masks, additive float masks, a ``position_bias``) runs an exact
materialised fallback (:mod:`atman_kernels._materialised`): slower, never wrong.

Layer indices (for ``layers=``): ``module.layer_idx`` where the model sets it (Llama, Qwen2,
Mistral, GPT-2, BERT). Models without it (ViT, CLIP) get ``module._atman_layer_idx`` assigned
by :func:`assign_layer_indices` (called by :func:`atman_attention`): the position of the module
among the model's interface-routed attention modules in ``model.modules()`` order.

Soft-capping and sinks. ``softcap=`` (Gemma 2, VaultGemma, T5Gemma; also accepted under the
config's name ``attn_logit_softcapping=``) caps the scaled scores to c * tanh(s / c) before the
mask and the suppression; ``s_aux=`` (GPT-OSS, Granite SWA, MiMo-V2-Flash, DeepSeek-V4) or
``sinks=`` adds per-head sink logits to the softmax denominator, never suppressed. Both go to
the fused op; sinks with one logit per head *and row* ([B, H, Nq, 1], Inkling 2) go to the
materialised fallback. Soft-capping together with a ``position_bias`` is refused (no model
does it, and where the bias would go relative to the cap is not defined).

Keys are matched to factors by absolute position: with a KV cache the key tensor covers
positions 0 .. Nk-1 and the queries are the last Nq positions, so factors given for the whole
sequence keep working when only a suffix is fed (docs/semantics.md, exact prefix reuse).

Windowed attention (Swin: batch = images x windows, keys = one window's tokens) cannot be
matched by position: a :func:`atman_kernels.suppression.key_layouts` context gives such a
module a :class:`atman_kernels.suppression.KeyLayout`, the factor column of every key of every
window (the factors then index whatever the caller's positions are, e.g. regions of an image)
and optionally the keys each window's queries may see, so that an additive mask's large
negative entries (Swin's shifted windows add -100) are excluded as a mask, not scored.

Exact or refused. Every call is checked before any work, and a refusal names the model (once
:func:`atman_attention` ran; else the module class and ``model_type``) and the argument:

- a keyword argument that is not None must be implemented here (``position_bias``,
  ``sliding_window`` when the mask encodes it, the ``atman_*`` ones) or listed in
  :data:`HARMLESS_ATTENTION_KWARGS` with the reason; :data:`REFUSED_ATTENTION_KWARGS` says why
  the known others (sparse ``indices``, flash varlen) are refused, and any unknown one is
  refused as well;
- a decoder's self-attention that declares ``is_causal=False`` while the mask function skipped
  the causal mask (bigbird_pegasus: future tokens would leak);
- a module that appends compressed summaries of token blocks to its keys (a ``compressor``,
  DeepSeek-V4): no factor reaches a token's share of a summary;
- a model class without ``_supports_attention_backend = True`` (and not of a family in
  :data:`VERIFIED_ATTENTION_ROUTING`, hybrids whose attention was read by hand):
  :func:`atman_attention` refuses it at once; a sub-model without it (an audio tower) at its
  first call.
  transformers 5.24 itself never reads the flag for a registered implementation
  (``get_correct_attn_implementation`` only checks that the name is registered;
  ``PreTrainedModel.is_backend_compatible()`` is called nowhere), and the attention function
  receives the module, not the model. So ``from_pretrained(..., attn_implementation="atman")``
  and ``set_attn_implementation("atman")`` cannot refuse such a model without patching
  transformers; instead the first call of its attention refuses it when no model class in
  the module's source file declares the flag.

A model whose decoder attention never calls the interface (git's text layers, bloom) never
reaches any of these checks: :func:`count_attention_calls` and :func:`check_layers_routed`
catch it after a forward (the explainer runs them after its first forward), with
:func:`decoder_attention_modules` listing what must be reached.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ._materialised import materialised_suppressed_attention
from .ops import suppressed_attention
from .ops.reference import visible_keys
from .suppression import (
    KeyLayout,
    Suppression,
    current_backend,
    current_key_layout,
    current_suppression,
    make_suppression,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HARMLESS_ATTENTION_KWARGS",
    "REFUSED_ATTENTION_KWARGS",
    "VERIFIED_ATTENTION_ROUTING",
    "AttentionCallCounts",
    "assign_layer_indices",
    "atman_attention",
    "atman_attention_forward",
    "atman_mask",
    "check_layers_routed",
    "count_attention_calls",
    "decoder_attention_modules",
    "interface_attention_modules",
]

ATTN_IMPLEMENTATION = "atman"
_KV_OFFSET_ATTR = "_atman_kv_offset"
_LAYER_ATTR = "_atman_layer_idx"
# set on interface-routed modules by atman_attention(): where the module sits (for errors),
# why its model may not use "atman" (None = it may), whether it is cross-attention, and whether
# it belongs to a decoder whose self-attention must be causal.
_WHERE_ATTR = "_atman_where"
_REFUSAL_ATTR = "_atman_refusal"
_CROSS_ATTR = "_atman_cross_attention"
_DECODER_ATTR = "_atman_in_decoder"


# --------------------------------------------------------------------------- mask function
def atman_mask(*args, **kwargs) -> torch.Tensor | None:
    """Mask function registered for "atman": transformers' ``sdpa_mask`` (same arguments).

    When the keys do not start at absolute position 0 (``kv_offset`` > 0: a sliding-window
    cache past its window) the mask is always materialised and carries the offset, so the
    attention can still match factors to absolute key positions.
    """
    kv_offset = kwargs.get("kv_offset", args[4] if len(args) > 4 else 0)
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    if not args and not kv_offset and _plain_causal_suffix(kwargs):
        return _causal_suffix_mask(kwargs)
    if kv_offset:
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    if kv_offset and isinstance(mask, torch.Tensor):
        setattr(mask, _KV_OFFSET_ATTR, int(kv_offset))
    return mask


def _plain_causal_suffix(kwargs: dict) -> bool:
    """Whether a mask request is the plain causal mask of queries that are the last positions
    of the keys (Nq < Nk), without padding: a chunk of queries on top of a cached prefix
    (prefix reuse). sdpa_mask builds it with several [B, 1, Nq, Nk] temporaries and the
    attention would analyse it with several more; :func:`_causal_suffix_mask` builds it once
    with its plan attached."""
    from transformers.masking_utils import causal_mask_function

    if (not kwargs.get("allow_is_causal_skip", True) or kwargs.get("local_size") is not None
            or kwargs.get("mask_function", causal_mask_function) is not causal_mask_function
            or torch.compiler.is_compiling()):
        return False
    kv_length = kwargs.get("kv_length")
    if "q_length" in kwargs:  # transformers >= 5.x: q_offset, q_length
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
        if isinstance(q_offset, torch.Tensor):
            q_offset = int(q_offset)
        first = q_offset
    else:  # 5.0: cache_position [q_length]
        positions = kwargs.get("cache_position")
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or not len(positions):
            return False
        q_length, first = len(positions), int(positions[0])
        if int(positions[-1]) != first + q_length - 1:
            return False
    if not isinstance(kv_length, int) or not isinstance(q_length, int) or (
            first + q_length != kv_length):
        return False
    padding = kwargs.get("attention_mask")
    return q_length < kv_length and (padding is None or bool(padding.all()))


_PLAN_ATTR = "_atman_plan"


def _causal_suffix_mask(kwargs: dict) -> torch.Tensor:
    """The bottom-right causal bool mask [B, 1, Nq, Nk] (one [Nq, Nk] tensor, expanded over
    the batch) with its plan attached: the attention reads the plan, not the values. The
    values are the true mask, so any other reader (model code that slices or records masks)
    sees the right pattern."""
    kv_length = kwargs["kv_length"]
    q_length = kwargs["q_length"] if "q_length" in kwargs else len(kwargs["cache_position"])
    device = kwargs.get("device")
    if device is None and isinstance(kwargs.get("cache_position"), torch.Tensor):
        device = kwargs["cache_position"].device
    mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=device).tril(
        kv_length - q_length)[None, None].expand(kwargs["batch_size"], 1, -1, -1)
    setattr(mask, _PLAN_ATTR, _MaskPlan(fused=True, causal=True, key_len=kv_length))
    return mask


# --------------------------------------------------------------------------- mask analysis
@dataclass(frozen=True)
class _MaskPlan:
    """How to run one attention call.

    fused: run the op with ``causal`` over the first ``key_len`` keys and ``key_padding``
    ([1 or B, key_len] bool, True = real key, None = all real). Otherwise the materialised
    fallback with ``visible`` (bool, broadcastable to [B, H, Nq, Nk]) and ``bias``.
    """

    fused: bool
    causal: bool = False
    key_len: int = 0
    key_padding: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _plan_from_bool(mask: torch.Tensor) -> _MaskPlan:
    """Decompose a bool [b, h, Nq, Nk] mask into (causal, key length, key padding) if it can."""
    len_q, len_k = mask.shape[-2], mask.shape[-1]
    general = _MaskPlan(fused=False, visible=mask)
    m = mask[:, 0]
    if mask.shape[1] != 1 and not bool((mask == mask[:, :1]).all()):
        return general
    last = m[:, -1, :]  # the last row sees every key in both patterns below
    if bool((m == last[:, None, :]).all()):
        padding = None if bool(last.all()) else last
        return _MaskPlan(fused=True, causal=False, key_len=len_k, key_padding=padding)
    seen = last.any(dim=0)
    if not bool(seen.any()):
        return general
    key_len = int(seen.nonzero().max()) + 1
    if key_len < len_k and bool(m[:, :, key_len:].any()):
        return general
    tri = visible_keys(len_q, key_len, True, None, mask.device)[0, 0]
    padding = last[:, :key_len]
    if bool((m[:, :, :key_len] == (tri[None] & padding[:, None, :])).all()):
        return _MaskPlan(
            fused=True,
            causal=True,
            key_len=key_len,
            key_padding=None if bool(padding.all()) else padding,
        )
    return general


def _plan_from_tensor(mask: torch.Tensor) -> _MaskPlan:
    if mask.dim() != 4:
        raise ValueError(
            "atman attention expects a 4D attention mask [batch, heads, q_len, kv_len], got "
            f"shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return _plan_from_bool(mask)
    if not mask.is_floating_point():
        raise TypeError(f"attention mask must be bool or float, got {mask.dtype}")
    visible = mask > torch.finfo(mask.dtype).min / 2
    bias = mask.masked_fill(~visible, 0.0)
    if bool((bias == 0).all()):
        return _plan_from_bool(visible)
    return _MaskPlan(fused=False, visible=visible, bias=bias)


class _PlanCache:
    """One-slot cache: every layer of a forward receives the same mask tensor."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self._plan: _MaskPlan | None = None

    def get(self, mask: torch.Tensor) -> _MaskPlan:
        # inference-mode tensors track no version: identity alone decides there
        version = -2 if mask.is_inference() else mask._version
        if self._ref is not None and self._ref() is mask and version == self._version:
            return self._plan
        plan = _plan_from_tensor(mask)
        self._ref, self._version, self._plan = weakref.ref(mask), version, plan
        return plan


_PLANS = _PlanCache()


def _materialised_plan(plan: _MaskPlan, len_q: int, len_k: int, device) -> _MaskPlan:
    """The same visibility as ``plan``, as an explicit mask for the materialised fallback."""
    if not plan.fused:
        return plan
    visible = visible_keys(len_q, plan.key_len, plan.causal, plan.key_padding, device)
    visible = torch.nn.functional.pad(visible, (0, len_k - plan.key_len), value=False)
    return _MaskPlan(fused=False, visible=visible, bias=plan.bias)


def _plan_without_mask(len_q: int, len_k: int, is_causal: bool, device) -> _MaskPlan:
    """sdpa's conventions for a None mask: causal only when Nq > 1, aligned top-left."""
    causal = len_q > 1 and is_causal
    if not causal:
        return _MaskPlan(fused=True, causal=False, key_len=len_k)
    if len_k >= len_q:
        # top-left causal over Nk >= Nq keys never reaches keys >= Nq (static-cache prefill)
        return _MaskPlan(fused=True, causal=True, key_len=len_q)
    rows = torch.arange(len_q, device=device)[:, None]
    return _MaskPlan(fused=False, visible=(torch.arange(len_k, device=device)[None] <= rows))


# --------------------------------------------------------------------------- factors
def _suppression_from_kwargs(kwargs: dict) -> Suppression | None:
    factors = kwargs.get("atman_factors")
    if factors is None:
        return None
    return make_suppression(
        factors,
        kwargs.get("atman_mode") or "paper",
        kwargs.get("atman_layers"),
        prefix="atman_",
        check_values=False,
    )


def _layer_index(module: torch.nn.Module) -> int | None:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        idx = getattr(module, _LAYER_ATTR, None)
    return idx


def _factors_for_call(
    state: Suppression,
    module: torch.nn.Module,
    len_k: int,
    key_offset: int,
    batch: int,
    device,
    layout: KeyLayout | None = None,
) -> torch.Tensor | None:
    if not state.applies_to(_layer_index(module)):
        return None
    if layout is not None:
        return _layout_factors(state, layout, batch, device)
    factors = state.factors_for_keys(len_k, key_offset).to(device)
    variants = factors.shape[0]
    if variants == batch:
        return factors
    if variants == 1:
        return factors.expand(batch, len_k)
    if batch == 1:
        raise ValueError(
            f"the suppression factors hold {variants} variants but the model's batch is 1; "
            f"feed the input once per variant (e.g. input_ids.expand({variants}, -1))"
        )
    raise ValueError(
        f"the suppression factors hold {variants} variants but the model's batch is {batch}; "
        "they must match (or factors must have 1 row)"
    )


def _layout_factors(
    state: Suppression, layout: KeyLayout, batch: int, device
) -> torch.Tensor:
    """Factors [batch, Nk] of a grouped call: row b * G + g holds input b's factors of the
    columns ``layout.positions[g]`` (1 where the position is -1)."""
    positions = layout.positions.to(device)
    groups, len_k = positions.shape
    f = state.factors.to(device)
    variants, n = f.shape
    bad = positions[(positions < -1) | (positions >= n)]
    if bad.numel():
        raise ValueError(
            f"the key layout names factor column {int(bad[0])} but the suppression factors "
            f"have {n} columns"
        )
    padded = torch.cat([f, f.new_ones(variants, 1)], dim=1)  # column n: factor 1
    rows = padded[:, positions.masked_fill(positions < 0, n)]  # [V, G, Nk]
    inputs = batch // groups
    if variants == inputs:
        return rows.reshape(batch, len_k)
    if variants == 1:
        return rows.expand(inputs, groups, len_k).reshape(batch, len_k)
    raise ValueError(
        f"the suppression factors hold {variants} variants but the model's batch holds "
        f"{inputs} inputs ({batch} rows of {groups} key groups); they must match (or factors "
        "must have 1 row)"
    )


def _check_layout(module, layout: KeyLayout, batch: int, len_q: int, len_k: int,
                  key_offset: int) -> None:
    """The call must have the shape its layout describes (else factors would land on the
    wrong keys)."""
    groups, keys = layout.positions.shape
    vis = layout.visible
    if (keys != len_k or batch % groups or key_offset
            or (vis is not None and vis.shape[1] != len_q)):
        raise ValueError(
            f"{_where(module)}: its key layout describes {groups} groups of {keys} keys"
            + ("" if vis is None else f" and {vis.shape[1]} queries")
            + f", but the attention call has batch {batch}, {len_q} queries and {len_k} keys"
            + (f" from position {key_offset}" if key_offset else "")
            + "; the layout was made for another input size"
        )


def _layout_visible(layout: KeyLayout, batch: int, device) -> torch.Tensor:
    """``layout.visible`` [G, Nq, Nk] as [batch, 1, Nq, Nk] (input-major rows)."""
    vis = layout.visible.to(device)
    groups = vis.shape[0]
    return vis[None].expand(batch // groups, *vis.shape).reshape(batch, 1, *vis.shape[1:])


# Attention modules whose calls hold one window of a feature map per batch row (Swin and the
# families that copy its attention): suppressed calls need a KeyLayout to place the factors.
# Both the outer and the inner class names: which one calls the interface varies by release.
WINDOWED_ATTENTION = frozenset(
    f"{family}{part}" for family in ("Swin", "Swinv2", "DonutSwin", "MaskFormerSwin", "ClapAudio")
    for part in ("Attention", "SelfAttention"))


# --------------------------------------------------------------------------- call guards
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


def _where(module: torch.nn.Module) -> str:
    """'Model (path: Class)' for errors; the model is known once atman_attention() ran."""
    where = getattr(module, _WHERE_ATTR, None)
    if where is not None:
        return where
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    suffix = f" (model_type {model_type!r})" if model_type else ""
    return f"{type(module).__name__}{suffix}"


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


def _short(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


def _is_cross_attention(module: torch.nn.Module) -> bool:
    return bool(
        getattr(module, _CROSS_ATTR, False)
        or getattr(module, "is_cross_attention", False)
        or "Cross" in type(module).__name__
    )


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


# Model classes that do not set _supports_attention_backend but whose every softmax attention
# was read in transformers 5.24's modeling file and calls the attention interface with the
# standard arguments (q, k, v, the mask from the mask function, dropout, scaling, **kwargs of
# the decoder layer): plain decoders and encoders that never set the flag, and
# hybrids whose other layers are state-space or linear-attention mixers
# (they hold no softmax attention to suppress; AtMan suppresses the attention layers only, as
# in LFM2). Each entry is the family's PreTrainedModel base class name (matched in the MRO,
# within transformers.models) and what was checked. The per-call argument checks and the
# routed-layer count (check_layers_routed) still run for them; tests/test_zoo.py compares each
# with a brute force. Their caches hold recurrent state, so the explainer runs them without
# prefix reuse (settings["prefix_reuse"] is False).
VERIFIED_ATTENTION_ROUTING: Mapping[str, str] = MappingProxyType(
    {
        "FalconH1PreTrainedModel": "Falcon-H1: FalconH1Attention (keys scaled by "
        "key_multiplier before the call) beside a Mamba-2 mixer in every layer",
        "JambaPreTrainedModel": "Jamba: JambaAttention layers between Mamba layers",
        "NemotronHPreTrainedModel": "Nemotron-H: NemotronHAttention layers between Mamba-2 "
        "and MLP layers",
        "Qwen3NextPreTrainedModel": "Qwen3-Next: gated Qwen3NextAttention (output gate "
        "after the call) between gated-delta-net layers",
        "KimiLinearPreTrainedModel": "Kimi Linear: multi-head latent attention layers "
        "between KimiDeltaAttention (linear attention) layers",
        "Qwen3_5PreTrainedModel": "Qwen3.5: gated Qwen3_5Attention (as Qwen3-Next) between "
        "gated-delta-net layers; its vision tower's varlen calls stay refused per call",
        "Qwen3_5MoePreTrainedModel": "Qwen3.5-MoE: as Qwen3.5",
        "LaraMiniPreTrainedModel": "Lara mini: LaraMiniAttention (sliding_window= as the "
        "mask encodes it) between recurrent layers",
        "OlmoHybridPreTrainedModel": "OLMo hybrid: OlmoHybridAttention (q/k norms, RoPE or "
        "none) layers between gated-delta-net layers",
        # plain softmax attention that calls the interface as Llama does, the flag unset
        "StableLmPreTrainedModel": "StableLM: StableLmAttention (partial rotary, optional "
        "per-head q/k layer norms before the call), causal mask from create_causal_mask",
        "BioGptPreTrainedModel": "BioGPT: BioGptAttention, is_causal=True, causal mask from "
        "create_causal_mask",
        # decoder-only *ForCausalLM of encoder-decoder families: the decoder layer's self
        # attention is causal; its cross-attention runs only with encoder states (the explainer
        # never passes them; a non-causal call is refused per call)
        "BartPreTrainedModel": "BART: BartAttention self-attention, is_causal=True",
        "MBartPreTrainedModel": "mBART: as BART",
        "MarianPreTrainedModel": "Marian: as BART",
        "PegasusPreTrainedModel": "Pegasus: as BART",
        "PLBartPreTrainedModel": "PLBart: as BART",
        "BlenderbotPreTrainedModel": "Blenderbot: as BART",
        "BlenderbotSmallPreTrainedModel": "Blenderbot small: as BART",
        "WhisperPreTrainedModel": "Whisper: WhisperAttention decoder self-attention, as BART",
        # BERT-style encoders with extra position inputs (boxes, XPaths)
        "LayoutLMPreTrainedModel": "LayoutLM: BERT self-attention with the extended mask",
        "MarkupLMPreTrainedModel": "MarkupLM: BERT self-attention with the extended mask",
    }
)


def _declares_attention_backend(cls: type) -> bool:
    """Whether model class ``cls`` sets ``_supports_attention_backend`` or belongs to a family
    of :data:`VERIFIED_ATTENTION_ROUTING`."""
    if getattr(cls, "_supports_attention_backend", False):
        return True
    return any(
        c.__name__ in VERIFIED_ATTENTION_ROUTING and c.__module__.startswith("transformers.")
        for c in getattr(cls, "__mro__", ())
    )


_FILE_MODEL_CLASSES: dict[str, tuple[type, ...]] = {}


def _backend_refusal(module: torch.nn.Module) -> str | None:
    """Why the model owning ``module`` may not use "atman", or None.

    atman_attention() records it per module (from the owning model class). For a model set
    to "atman" some other way (``from_pretrained(attn_implementation="atman")``,
    ``set_attn_implementation``) the model class is not known at the call: the model classes
    defined in the module's own source file decide, refusing when none of them declares
    ``_supports_attention_backend``.
    """
    if hasattr(module, _REFUSAL_ATTR):
        return getattr(module, _REFUSAL_ATTR)
    file = type(module).__module__
    classes = _FILE_MODEL_CLASSES.get(file)
    if classes is None:
        classes = tuple(
            c
            for c in vars(sys.modules.get(file, object())).values()
            if isinstance(c, type) and issubclass(c, PreTrainedModel) and c.__module__ == file
        )
        _FILE_MODEL_CLASSES[file] = classes
    if not classes or any(_declares_attention_backend(c) for c in classes):
        return None
    names = ", ".join(sorted(c.__name__ for c in classes)[:3])
    return _unsupported_backend_message(
        f"none of the model classes of {file} ({names}, ...) sets"
    )


def _unsupported_backend_message(subject: str) -> str:
    """``subject`` ends with its verb: "GitForCausalLM does not set"."""
    return (
        f"{subject} _supports_attention_backend = True, i.e. transformers does not "
        "promise that its attention goes through the attention interface with the standard "
        "arguments (models like git and bigbird_pegasus route only part of it, or call it "
        "non-causally), so 'atman' could return silently wrong explanations; a model class "
        "of your own that routes every attention through the interface can declare "
        "_supports_attention_backend = True"
    )


# --------------------------------------------------------------------------- call counting
class AttentionCallCounts:
    """Calls the "atman" attention received inside :func:`count_attention_calls`, per module.

    ``calls(module)``: every call; ``suppressed_calls(module)``: calls in which suppression
    factors were applied (a suppression active and covering the module's layer).
    """

    def __init__(self) -> None:
        self._calls: dict[torch.nn.Module, int] = {}
        self._suppressed: dict[torch.nn.Module, int] = {}

    def _record(self, module: torch.nn.Module, suppressed: bool) -> None:
        self._calls[module] = self._calls.get(module, 0) + 1
        if suppressed:
            self._suppressed[module] = self._suppressed.get(module, 0) + 1

    def calls(self, module: torch.nn.Module) -> int:
        """Calls of ``module`` through "atman"."""
        return self._calls.get(module, 0)

    def suppressed_calls(self, module: torch.nn.Module) -> int:
        """Calls of ``module`` through "atman" with factors applied."""
        return self._suppressed.get(module, 0)

    @property
    def total(self) -> int:
        """All calls recorded."""
        return sum(self._calls.values())

    def modules(self) -> list[torch.nn.Module]:
        """The modules that made at least one call, in first-call order."""
        return list(self._calls)

    def __repr__(self) -> str:
        return (
            f"AttentionCallCounts(modules={len(self._calls)}, calls={self.total}, "
            f"suppressed={sum(self._suppressed.values())})"
        )


_COUNTERS: contextvars.ContextVar[tuple[AttentionCallCounts, ...]] = contextvars.ContextVar(
    "atman_attention_counters", default=()
)


@contextlib.contextmanager
def count_attention_calls() -> Iterator[AttentionCallCounts]:
    """Count, per attention module, the calls that reach the "atman" attention in the block.

    Nests (each active counter sees every call). Use with :func:`check_layers_routed`::

        with count_attention_calls() as counts:
            model(**inputs)
        check_layers_routed(model, counts)
    """
    counts = AttentionCallCounts()
    token = _COUNTERS.set(_COUNTERS.get() + (counts,))
    try:
        yield counts
    finally:
        _COUNTERS.reset(token)


def _record_call(module: torch.nn.Module, suppressed: bool) -> None:
    for counts in _COUNTERS.get():
        counts._record(module, suppressed)


# --------------------------------------------------------------------------- attention
def atman_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "atman" attention function (transformers' attention interface signature).

    Args:
        module: the calling attention module (``is_causal``, ``layer_idx`` are read from it).
        query: [B, Hq, Nq, D]; key, value: [B, Hkv, Nk, D] (GQA/MQA: Hq a multiple of Hkv).
        attention_mask: None, or a 4D bool (True = attend) or additive float mask
            [B or 1, 1 or Hq, Nq, Nk] as made by the registered mask function.
        dropout: must be 0 (inference only).
        scaling: score multiplier (default D ** -0.5).
        is_causal: overrides ``module.is_causal`` when the mask is None.
        kwargs: ``atman_factors`` / ``atman_mode`` / ``atman_layers`` (see module docstring),
            ``position_bias`` (additive), ``sliding_window`` (only as encoded by the mask),
            ``softcap`` / ``attn_logit_softcapping`` and ``s_aux`` / ``sinks`` (module
            docstring), the arguments in :data:`HARMLESS_ATTENTION_KWARGS`; any other
            argument that is not None is refused (:data:`REFUSED_ATTENTION_KWARGS` says why
            for the known ones).

    Returns:
        (attn_output [B, Nq, Hq, D] contiguous, None).

    Raises:
        NotImplementedError: at the first call of a module the attention cannot compute
            exactly: an unimplemented argument (sparse ``indices``, varlen, ...),
            a model class without ``_supports_attention_backend``, a decoder self-attention
            that declares ``is_causal=False`` while the mask function skipped the causal
            mask, or a sliding window the mask does not encode. The message names the model
            (once :func:`atman_attention` ran; else the module class) and the argument.
    """
    refusal = _backend_refusal(module)
    if refusal is not None:
        raise NotImplementedError(f"{_where(module)}: {refusal}")
    _check_kwargs(module, kwargs)
    _check_compressed_keys(module)
    if dropout:
        raise NotImplementedError(
            f"atman attention runs inference only, got attention dropout {dropout} in "
            f"{type(module).__name__}; call model.eval() first"
        )
    if query.shape[0] != key.shape[0] and key.shape[0] != 1:
        raise ValueError(
            f"query batch {query.shape[0]} and key batch {key.shape[0]} differ "
            f"in {type(module).__name__}"
        )
    len_q, len_k = query.shape[2], key.shape[2]
    _check_window(module, kwargs.get("sliding_window"), attention_mask, len_k)
    _check_causal(module, attention_mask, len_q, is_causal)
    position_bias = kwargs.get("position_bias")
    softcap = _softcap_from_kwargs(module, kwargs, position_bias)
    sinks = _sinks_from_kwargs(module, kwargs, query, key)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    head_v = value.shape[-1]
    if head_v != query.shape[-1]:
        # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): values have a head size of
        # their own. Zero columns change no score (q . k) and no output column: pad q, k, v to
        # one size (the scale was fixed above) and cut the output back.
        width = max(head_v, query.shape[-1])
        query, key, value = (torch.nn.functional.pad(t, (0, width - t.shape[-1]))
                             for t in (query, key, value))

    if attention_mask is None:
        plan = _plan_without_mask(len_q, len_k, bool(is_causal), query.device)
        key_offset = 0
    else:
        plan = getattr(attention_mask, _PLAN_ATTR, None) or _PLANS.get(attention_mask)
        key_offset = getattr(attention_mask, _KV_OFFSET_ATTR, 0)
    if position_bias is not None:
        plan = _materialised_plan(plan, len_q, len_k, query.device)
        bias = position_bias if plan.bias is None else plan.bias + position_bias
        plan = _MaskPlan(fused=False, visible=plan.visible, bias=bias)
    if sinks is not None and sinks.dim() != 1:  # one sink per head and row: materialised
        plan = _materialised_plan(plan, len_q, len_k, query.device)
    batch = max(query.shape[0], key.shape[0])
    layout = current_key_layout(module)
    if layout is not None:
        _check_layout(module, layout, batch, len_q, len_k, key_offset)
        if layout.visible is not None:  # the mask's entries outside it are a mask, not scores
            plan = _materialised_plan(plan, len_q, len_k, query.device)
            visible = _layout_visible(layout, batch, query.device)
            if plan.visible is not None:
                visible = visible & plan.visible
            plan = _MaskPlan(fused=False, visible=visible, bias=plan.bias)

    state = _suppression_from_kwargs(kwargs) or current_suppression()
    if state is not None and layout is None and type(module).__name__ in WINDOWED_ATTENTION:
        raise NotImplementedError(
            f"{_where(module)} attends within windows (batch = inputs x windows, keys = one "
            "window's tokens), so factors over sequence positions cannot be matched to its "
            "keys; give it a KeyLayout (atman_kernels.suppression.key_layouts), as "
            "AtManExplainer does for Swin")
    if state is not None and _is_cross_attention(module):
        raise NotImplementedError(
            f"suppression in cross-attention ({type(module).__name__}) is not supported: its "
            "keys are another sequence's positions, which the factors do not index"
        )
    if plan.fused:
        n = plan.key_len
        factors = mode = None
        if state is not None:
            factors = _factors_for_call(state, module, n, key_offset, batch, query.device,
                                        layout)
            mode = state.mode
        _record_call(module, factors is not None)
        k, v = (key, value) if n == len_k else (key[:, :, :n], value[:, :, :n])
        out = suppressed_attention(
            query,
            k,
            v,
            factors,
            causal=plan.causal,
            scale=float(scaling),
            mode=mode or "paper",
            key_padding_mask=plan.key_padding,
            backend=current_backend(),
            softcap=softcap,
            sinks=sinks,
        )
    else:
        factors = mode = None
        if state is not None:
            factors = _factors_for_call(state, module, len_k, key_offset, batch, query.device,
                                        layout)
            mode = state.mode
        _record_call(module, factors is not None)
        out, _ = materialised_suppressed_attention(
            query,
            key,
            value,
            factors,
            scale=float(scaling),
            mode=mode or "paper",
            visible=plan.visible,
            bias=plan.bias,
            softcap=softcap,
            sinks=sinks,
        )
        out = out.expand(batch, *out.shape[1:])
    return out[..., :head_v].transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, atman_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, atman_mask)


# --------------------------------------------------------------------------- model switching
_ROUTES_CACHE: dict[type, bool] = {}


def _routes_through_interface(cls: type) -> bool:
    """Whether ``cls.forward`` calls transformers' attention interface (source inspection)."""
    if cls not in _ROUTES_CACHE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _ROUTES_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in src
    return _ROUTES_CACHE[cls]


def interface_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` that call transformers' attention interface,
    in ``model.modules()`` order."""
    return [
        m
        for m in model.modules()
        if not isinstance(m, PreTrainedModel) and _routes_through_interface(type(m))
    ]


def assign_layer_indices(model: torch.nn.Module) -> int:
    """Give every interface-routed attention module without a ``layer_idx`` the attribute
    ``_atman_layer_idx`` = its position among those modules. Returns the number of modules."""
    modules = interface_attention_modules(model)
    for i, m in enumerate(modules):
        if getattr(m, "layer_idx", None) is None:
            setattr(m, _LAYER_ATTR, i)
    return len(modules)


# --------------------------------------------------------------------------- decoder layers
def _walk(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(qualified name, module, nearest PreTrainedModel at or above it), depth first."""
    stack: list[tuple[str, torch.nn.Module, torch.nn.Module]] = [("", model, model)]
    while stack:
        name, module, owner = stack.pop()
        if isinstance(module, PreTrainedModel):
            owner = module
        yield name, module, owner
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child, owner))


def _cross_by_name(name: str) -> bool:
    low = name.lower()
    return "cross" in low or "encoder_attn" in low or "encdecattention" in low


def _looks_like_attention(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or "Attn" in name


def _layer_attention(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of one decoder layer that suppression must reach.

    Interface-routed modules, plus the innermost modules named like an attention
    (``*Attention*`` / ``*Attn*``) that neither contain nor sit inside a routed one (an attention
    computed by hand: AtMan cannot reach it). Cross-attention is left out (its keys are
    another sequence).
    """
    found = [
        (name, m)
        for name, m in layer.named_modules()
        if name
        and not isinstance(m, PreTrainedModel)
        and not _cross_by_name(name)
        and not _is_cross_attention(m)
    ]
    routed = [(name, m) for name, m in found if _routes_through_interface(type(m))]

    def related_to_routed(name: str) -> bool:  # inside a routed module, or around one
        return any(
            name == r or name.startswith(r + ".") or r.startswith(name + ".") for r, _ in routed
        )

    named = [
        (name, m) for name, m in found if _looks_like_attention(m) and not related_to_routed(name)
    ]
    innermost = [
        m for name, m in named if not any(other.startswith(name + ".") for other, _ in named)
    ]
    return [m for _, m in routed] + innermost


def _decoder_root(model: torch.nn.Module) -> torch.nn.Module:
    """``model.get_decoder()`` where that is a sub-model holding layers, else ``model``.

    transformers' ``get_decoder`` returns the ``decoder`` attribute when there is one, which is
    the LM head's projection in some models (ModernBERT-decoder: an ``nn.Linear``): a module
    without any ``nn.ModuleList`` is no decoder, and the model itself is searched instead.
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            root = get_decoder()
        except Exception:  # noqa: BLE001  (a few models raise: then the model is the root)
            root = None
        if isinstance(root, torch.nn.Module) and any(
            isinstance(m, torch.nn.ModuleList) for m in root.modules()
        ):
            return root
    return model


def _same_model_configs(root: torch.nn.Module) -> tuple[object, ...]:
    """The configs that make a nested ``PreTrainedModel`` part of ``root``'s own stack: the
    root's config and its text config. Llama 4's and Mllama's ``*ForCausalLM`` hold a
    ``*TextModel`` with the same config; DINOv2's encoder is itself a ``PreTrainedModel``.
    A vision or audio tower has a config of its own and stays out."""
    config = getattr(root, "config", None)
    if config is None:
        return ()
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            configs.append(get_text_config())
        except Exception:  # noqa: BLE001  (a config that cannot say: the root's own only)
            pass
    return tuple(configs)


def decoder_attention_modules(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Per decoder layer of ``model``, the self-attention modules AtMan suppresses.

    The decoder is ``model.get_decoder()`` (the language model of a multimodal model, the
    decoder stack of an encoder-decoder, the model itself for Llama or BERT; the model when
    that is no module holding layers, as ModernBERT-decoder's LM-head ``decoder``). Its layers
    are its ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks that hold attention,
    searched in the decoder and in nested pretrained sub-models sharing its config or text
    config (Llama 4's ``*TextModel``, DINOv2's encoder), not in those with a config of their
    own (a vision tower); without one of that length, the longest such list. Per layer see
    :func:`_layer_attention`: interface-routed modules and attention modules computed by hand
    (which :func:`check_layers_routed` then reports).
    A layer without attention (a state-space layer of a hybrid model) gives an empty list.

    Returns:
        ``result[i]`` = the modules of decoder layer ``i``; ``[]`` when no layer list is found.
    """
    root = _decoder_root(model)
    configs = _same_model_configs(root)
    candidates = [
        m
        for _, m, owner in _walk(root)
        if (owner is root or any(getattr(owner, "config", None) is c for c in configs))
        and isinstance(m, torch.nn.ModuleList)
        and len(m) > 0
    ]
    per_list = [[_layer_attention(layer) for layer in lst] for lst in candidates]
    with_attention = [
        (lst, mods) for lst, mods in zip(candidates, per_list, strict=True) if any(mods)
    ]
    if not with_attention:
        return []
    config = getattr(root, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    for lst, mods in with_attention:
        if len(lst) == n_layers:
            return mods
    return max(with_attention, key=lambda pair: len(pair[0]))[1]


def check_layers_routed(
    model: torch.nn.Module,
    counts: AttentionCallCounts,
    layers: Iterable[int] | None = None,
    *,
    suppressed: bool = False,
) -> None:
    """Raise unless every decoder layer in ``layers`` had its attention go through "atman".

    Call it after a forward run inside :func:`count_attention_calls`. A model whose decoder
    attention bypasses the interface (git: only its vision tower routes) would otherwise
    return explanations of all zeros.

    Args:
        model: the model that ran.
        counts: what :func:`count_attention_calls` recorded during the forward.
        layers: decoder layer indices the explanation suppresses (0 .. L-1); None = every
            layer that has attention. With explicit indices each listed layer must have
            attention, and the layer index the "atman" attention reads from each module
            (``layer_idx``) must equal its position, or ``layers=`` would hit other modules.
        suppressed: also require that factors were applied in those calls (a forward under
            an active suppression).

    Raises:
        ValueError: a layer index out of range, or a listed layer without attention.
        NotImplementedError: a layer whose attention never reached "atman" (the message
            names the model, the layers and the module classes), or a layer-index mismatch.
    """
    name = type(model).__name__
    per_layer = decoder_attention_modules(model)
    if not per_layer:
        raise NotImplementedError(
            f"{name}: no decoder layers with attention were found (model.get_decoder() has "
            "no nn.ModuleList of attention blocks), so it cannot be checked that suppression "
            "reaches every layer; this model is not supported"
        )
    n = len(per_layer)
    if layers is None:
        chosen = [i for i in range(n) if per_layer[i]]
        explicit = False
    else:
        chosen = list(layers)
        explicit = True
        bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < n]
        if bad:
            raise ValueError(
                f"layers must be decoder layer indices in 0..{n - 1} ({name} has {n} "
                f"decoder layers), got {bad}"
            )
        empty = [i for i in chosen if not per_layer[i]]
        if empty:
            raise ValueError(
                f"{name}: decoder layer(s) {empty} have no attention module (state-space or "
                "other non-attention layers), so suppressing them does nothing"
            )
    missing: dict[int, list[str]] = {}
    for i in chosen:
        for m in per_layer[i]:
            got = counts.suppressed_calls(m) if suppressed else counts.calls(m)
            if got == 0:
                missing.setdefault(i, []).append(type(m).__name__)
    if missing:
        classes = sorted({c for cs in missing.values() for c in cs})
        what = "with suppression factors applied" if suppressed else "at all"
        raise NotImplementedError(
            f"{name}: the attention of decoder layer(s) {_ranges(missing)} "
            f"({', '.join(classes)}) never went through the 'atman' attention {what}, so "
            "suppressing them changes nothing and the explanation would be silently wrong "
            "(this model computes that attention outside transformers' attention interface)"
        )
    if explicit:
        wrong = [
            (i, _layer_index(m))
            for i in chosen
            for m in per_layer[i]
            if _layer_index(m) != i
        ]
        if wrong:
            raise NotImplementedError(
                f"{name}: decoder layer(s) {[i for i, _ in wrong]} report layer indices "
                f"{[j for _, j in wrong]} to the suppression (layer_idx), so layers= would "
                "suppress other modules than the ones asked for; use layers=None"
            )


def _ranges(indices: Iterable[int]) -> str:
    """'0-3, 5' for [0, 1, 2, 3, 5]."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _configs_of(model: PreTrainedModel) -> list:
    """Every config (and sub-config) whose ``_attn_implementation`` a switch may change."""
    seen: dict[int, object] = {}
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None:
                stack.append(sub)
    return list(seen.values())


def check_supported(model: torch.nn.Module) -> None:
    """Raise (naming the model and the reason) unless "atman" can be switched into ``model``:
    what :func:`atman_attention` checks first, for callers that want the refusal before any
    other work."""
    _check_supported(model)


def _check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"atman_attention needs a transformers PreTrainedModel, got {name}; for torch "
            "models built on torch.nn.MultiheadAttention use "
            "atman_kernels.nn.swap_multihead_attention(model)"
        )
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and not type(m)._can_set_attn_implementation():
            raise NotImplementedError(
                f"{type(m).__name__} does not route its attention through transformers' "
                "AttentionInterface, so the 'atman' attention cannot be switched in; use a model "
                "class that does (most transformers>=5 models), or for torch.nn."
                "MultiheadAttention-based code atman_kernels.nn.swap_multihead_attention(model)"
            )
    if not interface_attention_modules(model):
        raise NotImplementedError(
            f"{name} has no attention module that calls transformers' AttentionInterface "
            "(ALL_ATTENTION_FUNCTIONS), so suppression would silently do nothing; use a model "
            "class that routes through it, or for torch.nn.MultiheadAttention-based code "
            "atman_kernels.nn.swap_multihead_attention(model)"
        )
    if not _declares_attention_backend(type(model)):
        raise NotImplementedError(_unsupported_backend_message(f"{name} does not set"))


def _is_causal_lm(model: torch.nn.Module) -> bool:
    name = type(model).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(
        "ForCausalLM"
    )


def _tag_modules(model: PreTrainedModel, decoder_of: PreTrainedModel | None = None) -> None:
    """Record on every interface-routed module what its attention calls need to know: where it
    sits (errors name the model), whether its owning model class may use "atman", whether it
    is cross-attention (by its path), and whether it is a causal LM's decoder self-attention
    (``decoder_of``: the causal language model of a composite model, e.g. a VLM's)."""
    top = type(model).__name__
    decoder = set()
    if decoder_of is not None or _is_causal_lm(model):
        # get_decoder() of a composite model is its language model's decoder
        decoder = {id(m) for layer in decoder_attention_modules(model) for m in layer}
    for name, m, owner in _walk(model):
        if isinstance(m, PreTrainedModel) or not _routes_through_interface(type(m)):
            continue
        setattr(m, _WHERE_ATTR, f"{top} ({name}: {type(m).__name__})")
        refusal = None
        if not _declares_attention_backend(type(owner)):
            refusal = _unsupported_backend_message(f"{type(owner).__name__} does not set")
        setattr(m, _REFUSAL_ATTR, refusal)
        setattr(m, _CROSS_ATTR, _cross_by_name(name))
        setattr(m, _DECODER_ATTR, top if id(m) in decoder else None)


@contextlib.contextmanager
def atman_attention(
    model: PreTrainedModel, *, only: PreTrainedModel | None = None
) -> Iterator[PreTrainedModel]:
    """Switch ``model`` (and its sub-models) to the "atman" attention inside the block.

    Restores every config's previous attention implementation on exit, also on error.
    Assigns layer indices where the model has none (:func:`assign_layer_indices`).

    Args:
        model: the model.
        only: switch only this sub-model (and its own sub-models), e.g. the language model of
            a vision-language model, whose vision tower keeps its attention implementation
            (suppression factors index the language model's sequence, not the patches of one
            image).

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``, or ``only`` is not one
            of its sub-models.
        NotImplementedError: the model's attention does not route through the interface, or
            its class does not set ``_supports_attention_backend = True``.
    """
    target = model if only is None else only
    if only is not None and not (
        isinstance(only, PreTrainedModel) and any(m is only for m in model.modules())
    ):
        raise TypeError(f"only= must be a PreTrainedModel inside {type(model).__name__}, got "
                        f"{type(only).__name__}")
    _check_supported(target)
    assign_layer_indices(target)
    _tag_modules(model, decoder_of=None if only is None else only)
    configs = _configs_of(target)
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    try:
        target.set_attn_implementation(ATTN_IMPLEMENTATION)
        for m in target.modules():
            if (
                isinstance(m, PreTrainedModel)
                and m.config._attn_implementation != ATTN_IMPLEMENTATION
            ):
                raise RuntimeError(
                    f"could not switch {type(m).__name__} to the 'atman' attention "
                    f"(it stayed {m.config._attn_implementation!r})"
                )
        yield model
    finally:
        for cfg, impl in previous:
            cfg._attn_implementation_internal = impl
