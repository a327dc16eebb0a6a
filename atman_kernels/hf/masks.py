"""The registered "atman" mask function and the mask plans: how one attention call runs.

:func:`atman_mask` is transformers' ``sdpa_mask`` (plus the key offset of a sliding-window
cache, and a causal suffix built once with its plan attached). A mask the attention receives
becomes a :class:`_MaskPlan`: the fused op (causal or not over the first L keys, with key
padding) when the mask has that structure, else the materialised fallback with an explicit
visibility [B or 1, 1 or H, Nq, Nk] and additive bias. One plan per mask tensor, shared by all
layers of a forward (:data:`_PLANS`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.masking_utils import sdpa_mask

from ..ops.reference import visible_keys
from ._tags import _KV_OFFSET_ATTR, _PLAN_ATTR


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
