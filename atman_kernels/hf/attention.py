"""The "atman" attention function, registered with transformers' attention interface.

:func:`atman_attention_forward` checks the call (:mod:`.guards`, :mod:`.routing`), plans it
from the mask (:mod:`.masks`), finds the factors of its keys (:mod:`.factors`), records it
(:mod:`.layers`) and runs the fused :func:`atman_kernels.suppressed_attention` or the
materialised fallback. Importing this module registers it and :func:`.masks.atman_mask` under
the name "atman".
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .._materialised import materialised_suppressed_attention
from ..ops import suppressed_attention
from ..suppression import current_backend, current_key_layout, current_suppression
from ._tags import _KV_OFFSET_ATTR, _PLAN_ATTR, ATTN_IMPLEMENTATION, _is_cross_attention, _where
from .factors import _check_layout, _factors_for_call, _layout_visible, _suppression_from_kwargs
from .guards import (
    WINDOWED_ATTENTION,
    _check_causal,
    _check_compressed_keys,
    _check_kwargs,
    _check_window,
    _sinks_from_kwargs,
    _softcap_from_kwargs,
)
from .layers import _record_call
from .masks import _PLANS, _MaskPlan, _materialised_plan, _plan_without_mask, atman_mask
from .routing import _backend_refusal


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
