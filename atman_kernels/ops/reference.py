"""Plain PyTorch reference of suppressed attention: the ground truth for every test.

Materialises the [B, Hq, Nq, Nk] score matrix, so it is short and obviously right, and costs
B * Hq * Nq * Nk floats of memory. Semantics (``docs/semantics.md``, suppression formulas):

- visible set V_i: keys j that row i may see (causal, bottom-right aligned: query row i sits at
  absolute position Nk - Nq + i; and ``key_padding_mask``);
- scores s_ij = scale * q_i . k_j, soft-capped when ``call.softcap`` = c is set:
  s_ij <- c * tanh(s_ij / c) (Gemma 2's order: after the scale, before the mask and before the
  suppression, so paper mode's minimum is taken over the capped scores);
- ``paper`` mode: m_i = min_{j in V_i} s_ij, s'_ij = m_i + f_bj * (s_ij - m_i);
- ``log`` mode: s'_ij = s_ij + log f_bj (f = 0 removes the key);
- softmax over V_i, plus, with ``sinks``, one more logit z_h per query head h that joins the
  denominator only (GPT-OSS: an extra column dropped after the softmax); the sink is never
  suppressed and is no part of the row minimum;
- a row with no visible key (or, in log mode, only removed keys) gives zeros, sinks or not.
"""

from __future__ import annotations

import torch

from ._checks import AttentionCall


def visible_keys(
    len_q: int, len_k: int, causal: bool, key_padding_mask: torch.Tensor | None, device
) -> torch.Tensor:
    """Bool mask of the keys each query row may see, broadcastable to [B, 1, Nq, Nk]."""
    visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
        visible = torch.arange(len_k, device=device)[None, :] <= rows
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    factors: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    call: AttentionCall,
    *,
    sinks: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Suppressed attention from materialised scores. Returns [B, Hq, Nq, D] in q's dtype.

    ``sinks``: [Hq] sink logits (the call says whether there must be some); soft-capping is
    read from ``call.softcap``.

    ``upcast=True`` computes in float32 (float64 for float64 inputs); ``upcast=False`` computes
    in the input dtype throughout, which tests use as the error yardstick of a low precision.
    """
    out_dtype = q.dtype
    if upcast:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    else:
        dtype = q.dtype
    group = call.heads_q // call.heads_kv
    qc = q.to(dtype)
    kc = k.to(dtype).repeat_interleave(group, dim=1)
    vc = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * call.scale  # [B or 1, Hq, Nq, Nk]
    if call.softcap is not None:
        scores = call.softcap * torch.tanh(scores / call.softcap)
    visible = visible_keys(call.len_q, call.len_k, call.causal, key_padding_mask, q.device)
    if factors is not None:
        f = factors.to(dtype)[:, None, None, :]
        if call.mode == "paper":
            row_min = scores.masked_fill(~visible, float("inf")).amin(dim=-1, keepdim=True)
            row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
            scores = row_min + f * (scores - row_min)
        else:
            scores = scores + torch.log(f)
    if call.has_sinks != (sinks is not None):
        raise ValueError("sinks must be given exactly when the validated call has sinks")
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None]  # [1, Hq, 1, 1]
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sink - row_max)
    out = torch.matmul(weights, vc) / torch.where(denom > 0, denom, torch.ones_like(denom))
    batch_shape = (call.batch, call.heads_q, call.len_q, call.head_dim)
    return out.expand(batch_shape).to(out_dtype).contiguous()
