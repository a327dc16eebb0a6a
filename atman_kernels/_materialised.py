"""Suppressed attention under an arbitrary visibility mask and additive bias (materialised).

The fused op takes the masks that AtMan needs in practice (bottom-right causal and key padding).
Model code sometimes hands the attention a mask that is neither (sliding windows, packed
sequences, per-head masks, additive float biases) or asks for the attention weights. The
integration layers (:mod:`atman_kernels.hf`, :mod:`atman_kernels.nn`) then fall back to this
helper: it materialises the [B, Hq, Nq, Nk] scores, so it is exact but costs N^2 memory.

Semantics are those of :func:`atman_kernels.ops.reference.reference_attention` with the
visible set V_i given explicitly (docs/semantics.md): scores are scale * q . k, soft-capped
to c * tanh(s / c) when ``softcap`` is given (Gemma 2: after the scale, before any mask or
bias), then the additive ``bias`` joins them (a position bias, an additive float mask), paper
mode shifts by the minimum over V_i, log mode adds log f, and the softmax runs over V_i plus,
with ``sinks``, one sink logit per row that joins the denominator only (never suppressed, no
part of the minimum). A row with no visible key gives zeros.
"""

from __future__ import annotations

import torch


def materialised_suppressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    factors: torch.Tensor | None,
    *,
    scale: float,
    mode: str = "paper",
    visible: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Suppressed attention from materialised scores, with any mask.

    Args:
        q: [Bq, Hq, Nq, D]; k, v: [Bk, Hkv, Nk, D] with Hq a multiple of Hkv.
        factors: [B, Nk] or None; B broadcasts against Bq and Bk.
        scale: multiplier of q . k.
        mode: "paper" or "log".
        visible: bool, broadcastable to [B, Hq, Nq, Nk]; True = key may be attended.
            None = every key visible.
        bias: float, broadcastable to [B, Hq, Nq, Nk], added to the scores (entries where
            ``visible`` is False are ignored).
        softcap: c > 0: scores become c * tanh(scale * q . k / c) before ``bias``; None = none.
        sinks: sink logits, [Hq] (one per head, GPT-OSS) or broadcastable to [B, Hq, Nq, 1]
            (one per head and row, computed from the hidden states); None = no sinks.

    Returns:
        (output [B, Hq, Nq, D] in q's dtype, weights [B, Hq, Nq, Nk] float32/float64).
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    qc = q.to(dtype)
    kc = k.to(dtype).repeat_interleave(group, dim=1)
    vc = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(dtype)
    if visible is None:
        visible = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device)
    if factors is not None:
        f = factors.to(dtype)[:, None, None, :]
        if mode == "paper":
            row_min = scores.masked_fill(~visible, float("inf")).amin(dim=-1, keepdim=True)
            row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
            scores = row_min + f * (scores - row_min)
        elif mode == "log":
            scores = scores + torch.log(f)
        else:
            raise ValueError(f"mode must be 'paper' or 'log', got {mode!r}")
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(dtype)
        sink = sink[None, :, None, None] if sink.dim() == 1 else sink
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - row_max)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(weights, vc)
    return out.to(q.dtype), weights
