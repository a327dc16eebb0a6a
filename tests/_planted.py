"""Deliberately wrong backends, planted by tests (monkeypatch) to prove their checks can fail.

Each has a backend's ``run`` signature (``triton_backend.run`` / ``cpp_backend.run``):
``(q, k, v, factors, key_padding_mask, call, *, sinks=None, out=None)`` with q [Bq, Hq, Nq, D],
k / v [Bk, Hkv, Nk, D], factors [B, Nk] or None; it returns [B, Hq, Nq, D] in q's dtype, written
into ``out`` when one is given. ``correct`` is the float32 reference, a stand-in that must pass.
"""

from __future__ import annotations

import torch

from atman_kernels.ops.reference import reference_attention, visible_keys


def _deliver(result: torch.Tensor, q: torch.Tensor, call, out: torch.Tensor | None):
    """``result`` in q's dtype, expanded to [B, ...], written into ``out`` if given."""
    result = result.to(q.dtype).expand(call.batch, *result.shape[1:])
    if out is None:
        return result.contiguous()
    out.copy_(result)
    return out


def correct(q, k, v, factors, key_padding_mask, call, *, sinks=None, out=None):
    """The reference (fp32 math for half inputs): what a right backend returns."""
    return _deliver(reference_attention(q, k, v, factors, key_padding_mask, call, sinks=sinks),
                    q, call, out)  # fmt: skip


def zeros(q, k, v, factors, key_padding_mask, call, *, sinks=None, out=None):
    """A kernel that writes zeros everywhere."""
    shape = (call.batch, call.heads_q, call.len_q, call.head_dim)
    return _deliver(torch.zeros(shape, dtype=q.dtype, device=q.device), q, call, out)


def ignoring_factors(q, k, v, factors, key_padding_mask, call, *, sinks=None, out=None):
    """A kernel that drops the suppression: plain attention for every variant."""
    plain = reference_attention(q, k, v, None, key_padding_mask, call, sinks=sinks)
    return _deliver(plain, q, call, out)


def low_precision(q, k, v, factors, key_padding_mask, call, *, sinks=None, out=None):
    """A kernel doing its math in q's dtype (float16 / bfloat16): scores, suppression and
    softmax in q's dtype, and the sums over keys (P @ V, the denominator) accumulated over key
    blocks of 16 in q's dtype, as a flash kernel with low-precision accumulators would."""
    result = _blocked(q, k, v, factors, key_padding_mask, call, sinks, math=q.dtype,
                      p_dtype=q.dtype, tf32=False)  # fmt: skip
    return _deliver(result, q, call, out)


def kernel_like(q, k, v, factors, key_padding_mask, call, *, sinks=None, out=None):
    """A right kernel's rounding, a stand-in that must pass: fp32 math, the probabilities
    rounded to q's dtype before P @ V (flash kernels' tensor-core product), and for float32
    inputs q, k, v and P cut to TF32 (10-bit mantissa: what CUDA's fp32 dots read)."""
    tf32 = q.dtype == torch.float32
    result = _blocked(q, k, v, factors, key_padding_mask, call, sinks, math=torch.float32,
                      p_dtype=q.dtype, tf32=tf32)  # fmt: skip
    return _deliver(result, q, call, out)


def _to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 cut to TF32's 10-bit mantissa by truncation (what tensor cores do with fp32
    registers: about 1e-3 relative error, twice rounding's)."""
    bits = t.contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def _blocked(q, k, v, factors, key_padding_mask, call, sinks, *, math, p_dtype, tf32,
             block: int = 16):  # fmt: skip
    """Attention computed in ``math``, P rounded to ``p_dtype``, key sums over blocks."""
    group = call.heads_q // call.heads_kv
    qc = q.to(math)
    kc = k.to(math).repeat_interleave(group, dim=1)
    vc = v.to(math).repeat_interleave(group, dim=1)
    if tf32:
        qc, kc, vc = _to_tf32(qc), _to_tf32(kc), _to_tf32(vc)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * call.scale
    if call.softcap is not None:
        s = call.softcap * torch.tanh(s / call.softcap)
    visible = visible_keys(call.len_q, call.len_k, call.causal, key_padding_mask, q.device)
    if factors is not None:
        f = factors.to(math)[:, None, None, :]
        if call.mode == "paper":
            m = s.masked_fill(~visible, float("inf")).amin(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            s = m + f * (s - m)
        else:
            s = s + torch.log(f)
    s = s.masked_fill(~visible, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    sink = None if sinks is None else sinks.to(math)[None, :, None, None]
    if sink is not None:
        top = torch.maximum(top, sink)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(s - top)
    pv = p.to(p_dtype).to(math)
    if tf32:
        pv = _to_tf32(pv)
    acc = torch.zeros(*p.shape[:-1], call.head_dim, dtype=math, device=q.device)
    den = torch.zeros(*p.shape[:-1], 1, dtype=math, device=q.device)
    if sink is not None:
        den = den + torch.exp(sink - top)
    for j in range(0, call.len_k, block):
        acc = acc + torch.matmul(pv[..., j : j + block], vc[..., j : j + block, :])
        den = den + p[..., j : j + block].sum(dim=-1, keepdim=True)
    return torch.where(den > 0, acc / den.clamp_min(torch.finfo(math).tiny), torch.zeros_like(acc))
