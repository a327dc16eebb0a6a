"""A drop-in ``torch.nn.MultiheadAttention`` that applies AtMan suppression.

:class:`MultiheadAttention` has torch's constructor, parameters (so the same ``state_dict``
keys) and ``forward`` signature, plus ``factors=`` and ``mode=``. Suppression factors come
from ``factors=`` or, when that is None, from the :func:`atman_kernels.suppression` context.

Which path runs:

- ``need_weights=False`` (what ``nn.TransformerEncoderLayer`` and most ViT/CLIP code pass):
  the fused :func:`atman_kernels.suppressed_attention`, with or without factors, whenever the
  masks are expressible as "causal and/or key padding"; other masks (a general ``attn_mask``,
  per-head 3D masks, float masks with non-zero biases) run an exact materialised fallback
  when factors are active, and torch's own implementation when they are not.
- ``need_weights=True`` (torch's default): without factors, torch's own implementation,
  unchanged (weights included). With factors, the exact materialised path, which returns the
  *suppressed* attention weights; it costs B * H * L * S floats, so pass ``need_weights=False``
  for speed.
- ``add_bias_kv`` / ``add_zero_attn``, or attention dropout in training mode: torch's own
  implementation without factors; with factors a ``NotImplementedError``.

A row whose keys are all masked returns zeros (torch returns NaN there).

Layer subsets: the module has no layer index of its own; :func:`swap_multihead_attention`
assigns ``layer_idx`` (the order of the swapped modules in ``model.modules()``), otherwise
``layers=`` in :func:`atman_kernels.suppression` raises a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._materialised import materialised_suppressed_attention
from .ops import suppressed_attention
from .ops._checks import MODES
from .ops.reference import visible_keys
from .suppression import current_backend, current_suppression

__all__ = ["MultiheadAttention", "swap_multihead_attention"]


def _keep_off_fused_encoder_fast_path(module: nn.Module, args: tuple) -> None:
    """No-op forward pre-hook.

    ``nn.TransformerEncoderLayer`` in eval mode runs a fused kernel that skips its
    ``self_attn.forward`` entirely, unless some submodule carries a hook. This hook keeps that
    fast path off so the AtMan attention actually runs.
    """
    return None


def _to_visible_and_bias(
    mask: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch convention (bool True = masked out; float additive) -> (visible, bias or None)."""
    if mask.dtype == torch.bool:
        return ~mask, None
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    visible = mask > torch.finfo(mask.dtype).min / 2
    bias = mask.masked_fill(~visible, 0.0)
    return visible, (None if bool((bias == 0).all()) else bias)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with AtMan suppression (see the module docstring).

    Constructor and ``state_dict`` are torch's; a torch module's ``state_dict`` loads as is.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_forward_pre_hook(_keep_off_fused_encoder_fast_path)

    # ------------------------------------------------------------------ factors
    def _resolve_factors(
        self, factors: torch.Tensor | None, mode: str | None, len_k: int
    ) -> tuple[torch.Tensor | None, str]:
        if factors is not None:
            mode = mode or "paper"
            if not isinstance(factors, torch.Tensor) or factors.dim() != 2:
                raise ValueError(
                    "factors must be a tensor of shape [variants, key length], got "
                    f"{getattr(factors, 'shape', type(factors).__name__)}"
                )
            if factors.shape[1] != len_k:
                raise ValueError(
                    f"factors must have one column per key ({len_k}), got {tuple(factors.shape)}"
                )
        else:
            state = current_suppression()
            if state is None or not state.applies_to(getattr(self, "layer_idx", None)):
                return None, mode or "paper"
            factors = state.factors_for_keys(len_k)
            mode = mode or state.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return factors, mode

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        factors: torch.Tensor | None = None,
        mode: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention with suppression factors.

        Args:
            query: [L, B, E] ([B, L, E] with ``batch_first``; [L, E] unbatched).
            key, value: [S, B, kdim/vdim] (likewise).
            key_padding_mask: [B, S] (unbatched [S]); bool True = ignore the key, or float
                added to the scores.
            need_weights: return the attention weights (see the module docstring).
            attn_mask: [L, S] or [B * num_heads, L, S]; bool True = not allowed, or float
                added to the scores.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (``attn_mask`` required,
                as in torch).
            factors: [V, S] suppression factor of every key for V variants (V = B, or V > 1
                with B = 1: the output then has V rows). None = from the suppression context.
            mode: "paper" or "log" (default: the context's mode, else "paper").

        Returns:
            (output shaped like ``query`` with E features, weights [B, L, S] or
            [B, H, L, S] or None).
        """
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True needs attn_mask (the causal mask itself), as in torch's "
                "MultiheadAttention"
            )
        if query.is_nested:
            raise NotImplementedError(
                "nested-tensor inputs are not supported; set use_nested_tensor=False on the "
                "nn.TransformerEncoder (swap_multihead_attention does)"
            )
        batched = query.dim() == 3
        if not batched:
            bsz, len_q, len_k = 1, query.shape[0], key.shape[0]
        elif self.batch_first:
            bsz, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        else:
            bsz, len_q, len_k = query.shape[1], query.shape[0], key.shape[0]
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        fac, mode = self._resolve_factors(factors, mode, len_k)
        unsupported = self.bias_k is not None or self.add_zero_attn or (
            self.training and self.dropout > 0
        )
        if fac is not None and unsupported:
            raise NotImplementedError(
                "suppression factors are not supported with add_bias_kv, add_zero_attn or "
                "attention dropout in training mode (call .eval())"
            )
        plan = None
        if not unsupported:
            plan = self._plan_masks(key_padding_mask, attn_mask, bsz, len_q, len_k, query.device)
        if fac is None and (need_weights or plan is None):
            # no suppression and nothing the fused op adds: torch's own implementation
            return super().forward(
                query, key, value,
                key_padding_mask=key_padding_mask if batched or key_padding_mask is None
                else key_padding_mask[0],
                need_weights=need_weights, attn_mask=attn_mask,
                average_attn_weights=average_attn_weights, is_causal=is_causal,
            )

        # to [B, N, E]
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        heads, head_dim = self.num_heads, self.head_dim

        # projections
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(bsz, len_q, heads, head_dim).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(key.shape[0], len_k, heads, head_dim).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(value.shape[0], len_k, heads, head_dim).transpose(1, 2)

        batch = bsz
        if fac is not None:
            fac = fac.to(q.device)
            if fac.shape[0] == 1 and bsz > 1:
                fac = fac.expand(bsz, len_k)
            elif fac.shape[0] != bsz and bsz != 1:
                raise ValueError(
                    f"factors hold {fac.shape[0]} variants but the input batch is {bsz}; "
                    "they must match (or one of them must be 1)"
                )
            batch = fac.shape[0]

        weights = None
        if plan is not None and not need_weights:
            causal, padding = plan
            out = suppressed_attention(
                q, k, v, fac, causal=causal, mode=mode, key_padding_mask=padding,
                backend=current_backend(),
            )
        else:
            visible, bias = self._full_mask(key_padding_mask, attn_mask, bsz, len_q, len_k, q)
            out, weights = materialised_suppressed_attention(
                q, k, v, fac, scale=head_dim**-0.5, mode=mode, visible=visible, bias=bias
            )
            out = out.expand(batch, *out.shape[1:])
            weights = weights.expand(batch, *weights.shape[1:]).to(q.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)

        out = out.transpose(1, 2).reshape(batch, len_q, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, (weights if need_weights else None)

    # ------------------------------------------------------------------ masks
    def _plan_masks(
        self, key_padding_mask, attn_mask, bsz: int, len_q: int, len_k: int, device
    ) -> tuple[bool, torch.Tensor | None] | None:
        """(causal, key padding [B or 1, S] True = real key) if the masks are expressible."""
        padding = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, len_k):
                raise ValueError(
                    f"key_padding_mask must have shape {(bsz, len_k)}, got "
                    f"{tuple(key_padding_mask.shape)}"
                )
            visible, bias = _to_visible_and_bias(key_padding_mask, "key_padding_mask")
            if bias is not None:
                return None
            padding = None if bool(visible.all()) else visible
        causal = False
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                return None
            if attn_mask.shape != (len_q, len_k):
                raise ValueError(
                    f"attn_mask must have shape {(len_q, len_k)} or "
                    f"{(bsz * self.num_heads, len_q, len_k)}, got {tuple(attn_mask.shape)}"
                )
            visible, bias = _to_visible_and_bias(attn_mask, "attn_mask")
            if bias is not None:
                return None
            if bool(visible.all()):
                causal = False
            elif torch.equal(visible, visible_keys(len_q, len_k, True, None, device)[0, 0]):
                causal = True  # bottom-right; the same as torch's top-left when L == S
            else:
                return None
        return causal, padding

    def _full_mask(self, key_padding_mask, attn_mask, bsz: int, len_q: int, len_k: int, q):
        """visible [B or 1, H or 1, L, S] bool and additive bias (or None) in torch semantics."""
        visible = torch.ones(1, 1, 1, len_k, dtype=torch.bool, device=q.device)
        bias = None
        if key_padding_mask is not None:
            vis, b = _to_visible_and_bias(key_padding_mask, "key_padding_mask")
            visible = visible & vis[:, None, None, :]
            bias = None if b is None else b[:, None, None, :]
        if attn_mask is not None:
            vis, b = _to_visible_and_bias(attn_mask, "attn_mask")
            if attn_mask.dim() == 2:
                vis, b = vis[None, None], (None if b is None else b[None, None])
            elif attn_mask.dim() == 3 and attn_mask.shape == (
                bsz * self.num_heads, len_q, len_k
            ):
                vis = vis.view(bsz, self.num_heads, len_q, len_k)
                b = None if b is None else b.view(bsz, self.num_heads, len_q, len_k)
            else:
                raise ValueError(
                    f"attn_mask must have shape {(len_q, len_k)} or "
                    f"{(bsz * self.num_heads, len_q, len_k)}, got {tuple(attn_mask.shape)}"
                )
            visible = visible & vis
            if b is not None:
                bias = b if bias is None else bias + b
        return visible, bias


def swap_multihead_attention(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.MultiheadAttention`` in ``model`` by :class:`MultiheadAttention`.

    In place; the new modules share the old ones' parameters (no copy), keep their training
    mode, and get ``layer_idx`` = their order among the model's attention modules. Every
    ``nn.TransformerEncoder`` gets ``use_nested_tensor = False`` (its nested-tensor fast path
    would bypass the attention modules). Returns ``model``.
    """
    if isinstance(model, nn.MultiheadAttention) and not isinstance(model, MultiheadAttention):
        raise TypeError(
            "swap_multihead_attention replaces attention modules inside a model; for a bare "
            "nn.MultiheadAttention build atman_kernels.nn.MultiheadAttention and load its "
            "state_dict"
        )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                setattr(parent, name, _converted(child))
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False
    index = 0
    for m in model.modules():
        if isinstance(m, MultiheadAttention):
            m.layer_idx = index
            index += 1
    return model


def _converted(old: nn.MultiheadAttention) -> MultiheadAttention:
    new = MultiheadAttention(
        old.embed_dim,
        old.num_heads,
        dropout=old.dropout,
        bias=old.in_proj_bias is not None,
        add_bias_kv=old.bias_k is not None,
        add_zero_attn=old.add_zero_attn,
        kdim=old.kdim,
        vdim=old.vdim,
        batch_first=old.batch_first,
        device="meta",
    )
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "in_proj_bias", "bias_k", "bias_v"):
        if getattr(old, name, None) is None and name in new._parameters:
            new._parameters[name] = None
    new.out_proj = old.out_proj
    new.train(old.training)
    return new
