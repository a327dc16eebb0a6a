"""The attributes the "atman" attention sets on attention modules and masks, and reading them.

Bottom of :mod:`atman_kernels.hf` (imports nothing of it): the attribute names, and what a
module says about itself through them: its name in errors (:func:`_where`), its layer index
(:func:`_layer_index`), whether it is cross-attention (:func:`_is_cross_attention`).
"""

from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "atman"
# set on a mask tensor by atman_mask: the absolute position of its first key (kv_offset > 0)
_KV_OFFSET_ATTR = "_atman_kv_offset"
# set on a mask tensor by atman_mask: its _MaskPlan, so the attention reads no mask values
_PLAN_ATTR = "_atman_plan"
# set by assign_layer_indices on modules without a layer_idx
_LAYER_ATTR = "_atman_layer_idx"
# set on interface-routed modules by atman_attention(): where the module sits (for errors),
# why its model may not use "atman" (None = it may), whether it is cross-attention, and whether
# it belongs to a decoder whose self-attention must be causal.
_WHERE_ATTR = "_atman_where"
_REFUSAL_ATTR = "_atman_refusal"
_CROSS_ATTR = "_atman_cross_attention"
_DECODER_ATTR = "_atman_in_decoder"


def _layer_index(module: torch.nn.Module) -> int | None:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        idx = getattr(module, _LAYER_ATTR, None)
    return idx


def _where(module: torch.nn.Module) -> str:
    """'Model (path: Class)' for errors; the model is known once atman_attention() ran."""
    where = getattr(module, _WHERE_ATTR, None)
    if where is not None:
        return where
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    suffix = f" (model_type {model_type!r})" if model_type else ""
    return f"{type(module).__name__}{suffix}"


def _short(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_cross_attention(module: torch.nn.Module) -> bool:
    return bool(
        getattr(module, _CROSS_ATTR, False)
        or getattr(module, "is_cross_attention", False)
        or "Cross" in type(module).__name__
    )
