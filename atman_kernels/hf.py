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

Keys are matched to factors by absolute position: with a KV cache the key tensor covers
positions 0 .. Nk-1 and the queries are the last Nq positions, so factors given for the whole
sequence keep working when only a suffix is fed (ATMAN.md section 5).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ._materialised import materialised_suppressed_attention
from .ops import suppressed_attention
from .ops.reference import visible_keys
from .suppression import Suppression, current_backend, current_suppression, make_suppression

__all__ = [
    "ATTN_IMPLEMENTATION",
    "assign_layer_indices",
    "atman_attention",
    "atman_attention_forward",
    "atman_mask",
    "interface_attention_modules",
]

ATTN_IMPLEMENTATION = "atman"
_KV_OFFSET_ATTR = "_atman_kv_offset"
_LAYER_ATTR = "_atman_layer_idx"


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
    if kv_offset:
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    if kv_offset and isinstance(mask, torch.Tensor):
        setattr(mask, _KV_OFFSET_ATTR, int(kv_offset))
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
    state: Suppression, module: torch.nn.Module, len_k: int, key_offset: int, batch: int, device
) -> torch.Tensor | None:
    if not state.applies_to(_layer_index(module)):
        return None
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
            ``position_bias`` (additive); ``softcap`` and ``s_aux`` are not supported.

    Returns:
        (attn_output [B, Nq, Hq, D] contiguous, None).
    """
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"atman attention does not support attention logit soft-capping "
            f"({type(module).__name__}); load this model with attn_implementation='eager'"
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            f"atman attention does not support attention sinks (s_aux) ({type(module).__name__})"
        )
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
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    if attention_mask is None:
        plan = _plan_without_mask(len_q, len_k, bool(is_causal), query.device)
        key_offset = 0
    else:
        plan = _PLANS.get(attention_mask)
        key_offset = getattr(attention_mask, _KV_OFFSET_ATTR, 0)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        visible = plan.visible
        if plan.fused:
            visible = visible_keys(
                len_q, plan.key_len, plan.causal, plan.key_padding, query.device
            )
            visible = torch.nn.functional.pad(visible, (0, len_k - plan.key_len), value=False)
        bias = position_bias if plan.bias is None else plan.bias + position_bias
        plan = _MaskPlan(fused=False, visible=visible, bias=bias)

    state = _suppression_from_kwargs(kwargs) or current_suppression()
    if state is not None and (
        getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__
    ):
        raise NotImplementedError(
            f"suppression in cross-attention ({type(module).__name__}) is not supported: its "
            "keys are another sequence's positions, which the factors do not index"
        )
    batch = max(query.shape[0], key.shape[0])
    if plan.fused:
        n = plan.key_len
        factors = mode = None
        if state is not None:
            factors = _factors_for_call(state, module, n, key_offset, batch, query.device)
            mode = state.mode
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
        )
    else:
        factors = mode = None
        if state is not None:
            factors = _factors_for_call(state, module, len_k, key_offset, batch, query.device)
            mode = state.mode
        out, _ = materialised_suppressed_attention(
            query,
            key,
            value,
            factors,
            scale=float(scaling),
            mode=mode or "paper",
            visible=plan.visible,
            bias=plan.bias,
        )
        out = out.expand(batch, *out.shape[1:])
    return out.transpose(1, 2).contiguous(), None


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


@contextlib.contextmanager
def atman_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Switch ``model`` (and its sub-models) to the "atman" attention inside the block.

    Restores every config's previous attention implementation on exit, also on error.
    Assigns layer indices where the model has none (:func:`assign_layer_indices`).

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        NotImplementedError: the model's attention does not route through the interface.
    """
    _check_supported(model)
    assign_layer_indices(model)
    configs = _configs_of(model)
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for m in model.modules():
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
