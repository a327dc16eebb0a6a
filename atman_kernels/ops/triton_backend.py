"""Triton backend: suppressed attention for every variant and head in one fused launch (two in
paper mode).

Kernel (``_suppressed_attention_fwd``), flash-attention style: each program owns BLOCK_M query
rows of one (variant b, query head h) pair and walks the key tiles of its visible range with an
online softmax in fp32; no [Nq, Nk] buffer exists anywhere. Grid: one axis of
``cdiv(Nq, BLOCK_M) * B * Hq`` programs (query block fastest, so neighbouring programs share
K/V; a single axis has no 65535 limit on B * Hq). Tensors:

- q [Bq, Hq, Nq, D], k/v [Bk, Hkv, Nk, D], Bq and Bk in {1, B}: a batch of 1 is read with
  batch stride 0 (shared by every variant, never copied); kv head = h // (Hq // Hkv) (GQA/MQA).
- per-variant key vectors [B or 1, Nk] fp32, made once per call by the launcher (O(B Nk)):
  ``bias`` = log2 f in log mode (f = 0 -> -inf removes the key) with -inf on padded keys, or
  0 / -inf from the padding mask alone; in paper mode the factors themselves. The kernel takes
  no logarithm and builds no padding mask per score (flash-attn's vector ``BIAS_TYPE``).
- out [B, Hq, Nq, D] in q's dtype.

Two constexpr stages per row block (``_key_ranges``): stage 1 walks the key tiles that every
row of the block sees whole (left of the causal diagonal, inside Nk): no mask at all; stage 2
the diagonal and ragged tiles, with the causal / bounds mask. Causal masking is bottom-right
aligned (query row i at absolute key position Nk - Nq + i); a row with no visible key, or in log
mode only removed keys, gives zeros, never NaN.

Modes (constexpr):

- ``log``: s' = s + log f: a per-key additive bias; one launch, the FLOPs of plain attention.
- ``paper``: s' = m + f (s - m) with m the row minimum over *visible* keys. m is needed before
  the first exponential: ``_row_min_fwd`` computes it first (QK^T and a masked minimum: no
  exp, no PV) into a [Bm, Hq, Nq] fp32 buffer, Bm = 1 when q, k and the padding mask are all
  shared by the variants (batch 1 or a stride-0 expand: the minima then cost 1/B of a QK^T
  pass), else B. The attention kernel then runs the online softmax on f (s - m), which has the
  softmax of s' (a row constant does not change a softmax): two operations per score more than
  plain attention. FLOPs with per-variant q/k: 1.5x plain attention's matmul FLOPs, for any
  factors (the one-pass alternative in docs/semantics.md needs a second PV product, twice the
  exponentials and two-valued factors). Scores are kept in base 2 (log2(e) folded into the
  scale); the min-shift is linear, so it commutes with the change of base.

Precision: fp16/bf16 operands feed the tensor cores directly with fp32 accumulation. fp32
operands use TF32 tensor-core products (about 1e-3 relative error per product, what torch
gives with ``allow_tf32=True``): ``tf32x3`` (fp32 accuracy) and ``ieee`` (no tensor cores) both
spilled registers for every tile tried at head dims >= 80, so they are not offered. Use
fp16/bf16 for speed, the reference or C++ backend for fp32 exactness. Lengths, head counts
and the scale are runtime arguments (no recompile per length); head dim, block sizes, mode,
the stages and the masks are constexpr. Tile configs are not timed (see ``_CONFIGS``). Head
dims 16..256; a head dim that is not a power of two is padded to the next one (masked loads, or
TMA's zero fill).

Loads (constexpr ``TMA``): on sm_90 and up Q, K and V are read through host-made tensor
descriptors (TMA, ``_tma_descriptors``: 4-D [B or 1, H, N, D], blocks [1, 1, rows, BLOCK_D]),
as Triton's fused-attention tutorial does on Hopper; the copy engine fills rows past N and
columns past the head dim with zeros, so neither stage masks a load. TMA needs a 16-byte
aligned base, unit last-dim stride and 16-byte multiple strides: where q, k or v lacks them
(e.g. fp16 head dim 20: 40-byte rows) the launcher takes the pointer path (``cp.async``), as
on sm_80. Both feed wgmma on sm_90. Ahead-of-time SASS (``tests/test_triton_aot.py``): TMA
costs a constant 17-37 instructions per key tile over the pointer path (mbarrier arm / issue /
wait per K and V tile) and saves registers (paper d64: 153 -> 120, two blocks per SM).

Triton is imported lazily (first use), so ``import atman_kernels`` works without triton and
does not freeze ``TRITON_INTERPRET`` before a test or user sets it. Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slowly): that is how CPU-only machines
test it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from ._checks import AttentionCall

# Set by _triton() on first use; the kernel source below refers to it by this global name.
tl: Any = None

MAX_HEAD_DIM = 256
LOG2E = 1.0 / math.log(2.0)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Integer arguments that must not be specialised (a new compile per value of 1 or per
# multiple of 16): lengths and head counts. Strides keep Triton's divisibility specialisation.
_NO_SPECIALIZE = ("N_Q", "N_K", "H_Q", "GROUP")


def _key_ranges(pid_m, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr):
    """Key ranges of one query block: [0, full_end) holds tiles that every row of the block
    sees whole (no causal cut, no ragged end): no mask at all; [full_end, hi) holds the
    diagonal and ragged tiles, masked. full_end is a multiple of BLOCK_N."""
    if CAUSAL:
        # Row i sees keys j <= i + (N_K - N_Q); keys past the block's last row are never read.
        first_row_last_key = pid_m * BLOCK_M + (N_K - N_Q)
        hi = tl.minimum(N_K, first_row_last_key + BLOCK_M)
        full_end = tl.minimum((first_row_last_key + 1) // BLOCK_N, N_K // BLOCK_N) * BLOCK_N
        full_end = tl.maximum(full_end, 0)
    else:
        hi = N_K
        full_end = (N_K // BLOCK_N) * BLOCK_N
    return full_end, hi


def _key_tile_ptrs(base, stride_n, start_n, offs_n0, offs_d, HOIST: tl.constexpr):
    """Addresses of rows start_n.. of K or V. HOIST: ``base`` is already the [BLOCK_N, BLOCK_D]
    pointer tile of row 0 (built once, outside the loop: one scalar add per tile), else a
    scalar pointer and the tile is formed per tile (nothing of that size stays live across
    the loop: the hoisted tile spilled registers on sm_80 and at padded head dims)."""
    if HOIST:
        return base + start_n * stride_n
    else:
        return base + (start_n + offs_n0)[:, None] * stride_n + offs_d[None, :]


def _load_key_rows(ptrs, offs_n, offs_d, N_K,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of K or V; masks only where a tile can leave the tensor."""
    if MASKED:
        return tl.load(ptrs, mask=(offs_n < N_K)[:, None] & (offs_d < HEAD_DIM)[None, :],
                       other=0.0)
    elif HEAD_DIM != BLOCK_D:
        return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        return tl.load(ptrs)


def _soft_cap(qk, cap_in, cap_out):
    """Base-2 soft-capped score of a raw q . k: c * log2(e) * tanh(scale * qk / c), written as
    cap_out - 2 cap_out / (1 + exp2(cap_in * qk)) with cap_in = 2 scale log2(e) / c and
    cap_out = c log2(e) (tanh x = 1 - 2 / (1 + e^2x)). Five instructions per score, two of
    them MUFU: FMUL, EX2, FADD, RCP, FFMA. The reciprocal is the approximate one (2 ulp;
    ``div.full`` added a range check and rescaling per score, 8 instructions, and spilled
    registers at sm_80 d64 paper mode with padding); outside its range (1 + e >= 2^126) it
    gives 0, which is the true value to fp32 precision, and exp2 -> inf gives 0 too: the
    score is c there; exp2 -> 0 gives -c. Absolute error a few ulp of c. ``tanh.approx``
    (one MUFU) has a relative error of 2^-11, too coarse for c = 50; libdevice's tanh does not
    run in Triton's CPU interpreter."""
    two_cap = 2.0 * cap_out
    return cap_out - two_cap * tl.fdiv(1.0, 1.0 + tl.exp2(qk * cap_in), approx=True)


def _load_kv_tile(base, tma_b, tma_h, stride_n, start_n, offs_n0, offs_d, N_K,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, HOIST: tl.constexpr, TMA: tl.constexpr):
    """Rows start_n.. of K or V as a [BLOCK_N, BLOCK_D] tile. TMA: ``base`` is a
    [Bk, Hkv, Nk, D] tensor descriptor with [1, 1, BLOCK_N, BLOCK_D] blocks read at
    (tma_b, tma_h, start_n, 0); the copy engine fills rows past Nk and columns past the head dim
    with zeros, so no mask exists in either stage. Else ``base`` is a pointer
    (``_key_tile_ptrs``) and the loads are masked where a tile can leave the tensor."""
    if TMA:
        return base.load([tma_b, tma_h, start_n, 0]).reshape([BLOCK_N, BLOCK_D])
    else:
        ptrs = _key_tile_ptrs(base, stride_n, start_n, offs_n0, offs_d, HOIST)
        return _load_key_rows(ptrs, start_n + offs_n0, offs_d, N_K, HEAD_DIM, BLOCK_D, MASKED)


def _attend_tiles(acc, l_i, m_i, q, row_min, row_pos,
                  k_base, v_base, k_b, v_b, kv_h, bias_base, f_base,
                  stride_kn, stride_vn, qk_scale, cap_in, cap_out, lo, hi, N_K,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAPER: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HOIST: tl.constexpr, TMA: tl.constexpr):
    """Online softmax (base 2) over the key tiles in [lo, hi); MASKED = the diagonal/ragged
    stage (causal and bounds masks), else every key of every tile is visible to every row.
    SOFTCAP: scores are soft-capped (``_soft_cap``) before the factors, bias and masks.
    K/V tiles: ``_load_kv_tile`` (TMA: k_base / v_base are descriptors, k_b / v_b / kv_h the
    batch and head coordinates; else pointers to the (batch, head)'s row 0)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if HOIST:
        k_base = k_base + offs_n0[:, None] * stride_kn + offs_d[None, :]
        v_base = v_base + offs_n0[:, None] * stride_vn + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _load_kv_tile(k_base, k_b, kv_h, stride_kn, start_n, offs_n0, offs_d, N_K,
                          HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, HOIST, TMA)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            n_ok = offs_n < N_K
        if SOFTCAP:
            s = _soft_cap(qk, cap_in, cap_out)
        else:
            s = qk * qk_scale
        if PAPER:
            # s' - m = f (s - m): the softmax of a row ignores the row constant m, so the
            # online softmax runs on f (s - m) directly (2 operations per score, 1 vector).
            if MASKED:
                # Past Nk (keys masked below) any finite f works. With TMA: 0, a zero fill
                # that saves a compare and a select per factor (33 instructions per sm_90
                # tile); on the pointer path that fill spilled registers on sm_80 (d256
                # fp32 with padding, d64 fp16 with soft-capping), so it keeps 1.
                if TMA:
                    f = tl.load(f_base + offs_n, mask=n_ok, other=0.0)
                else:
                    f = tl.load(f_base + offs_n, mask=n_ok, other=1.0)
            else:
                f = tl.load(f_base + offs_n)
            s = (s - row_min[:, None]) * f[None, :]
        if HAS_BIAS:
            # log2(f), -inf for padded keys (log mode), or 0 / -inf (padding only).
            if MASKED:
                s += tl.load(bias_base + offs_n, mask=n_ok, other=0.0)[None, :]
            else:
                s += tl.load(bias_base + offs_n)[None, :]
        if MASKED:
            # Causal: key j <= row_pos < N_K for every stored row, so one compare per score
            # covers the bounds too (rows past N_Q are never stored).
            if CAUSAL:
                s = tl.where(offs_n[None, :] <= row_pos[:, None], s, float("-inf"))
            else:
                s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS:
            # A row that has seen no key yet keeps max -inf: shift by 0 so exp2 gives 0, not
            # NaN. (A whole tile without mask or bias has finite scores: no such row.)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_base, v_b, kv_h, stride_vn, start_n, offs_n0, offs_d, N_K,
                          HEAD_DIM, BLOCK_N, BLOCK_D, MASKED, HOIST, TMA)  # fmt: skip
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _suppressed_attention_fwd(
    Q, K, V, BIAS, F, ROW_MIN, SINKS, Out,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_biasb, stride_fb, stride_rb, stride_rh,
    stride_ob, stride_oh, stride_om,
    qk_scale, cap_in, cap_out,
    N_Q, N_K, H_Q, GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PAPER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HOIST: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (variant, query head); see the module docstring.

    Last-dim strides are 1 (the launcher guarantees it). ``qk_scale`` = scale * log2(e).
    TMA: Q, K, V are [B or 1, H, N, D] tensor descriptors (blocks [1, 1, BLOCK_M or BLOCK_N,
    BLOCK_D]); their strides are then read only for the batch: 0 = every variant reads batch 0.
    PAPER: F [B, Nk] the factors (fp32), ROW_MIN [1 or B, Hq, Nq] the base-2 row minima from
    ``_row_min_fwd``. HAS_BIAS: BIAS [1 or B, Nk] added to every score (after the factor).
    SOFTCAP: scores soft-capped with ``cap_in`` / ``cap_out`` (``_soft_cap``). HAS_SINKS:
    SINKS [Hq] fp32 base-2 sink logits, one extra softmax column per head with a zero value
    row: the online softmax starts from it (max = the sink, sum = 1) instead of (-inf, 0).
    """
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b32 = pid_bh // H_Q
    h32 = pid_bh % H_Q
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    h_kv = (h32 // GROUP).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    if TMA:
        k_base = K
        v_base = V
        q = Q.load([tl.where(stride_qb == 0, 0, b32), h32, pid_m * BLOCK_M, 0])
        q = q.reshape([BLOCK_M, BLOCK_D])
    else:
        k_base = K + b * stride_kb + h_kv * stride_kh
        v_base = V + b * stride_vb + h_kv * stride_vh
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :], mask=io_mask, other=0.0)  # fmt: skip
    k_b = tl.where(stride_kb == 0, 0, b32)  # descriptor coordinates (TMA only)
    v_b = tl.where(stride_vb == 0, 0, b32)
    kv_h = h32 // GROUP
    row_pos = offs_m + (N_K - N_Q)
    full_end, hi = _key_ranges(pid_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    row_min = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PAPER:
        row_min = tl.load(ROW_MIN + b * stride_rb + h * stride_rh + offs_m, mask=row_ok,
                          other=0.0)

    if HAS_SINKS:
        # In paper mode the softmax runs on f (s - m): the sink joins as z - m, unscaled.
        m_i = tl.load(SINKS + h) - row_min
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bias_base = BIAS + b * stride_biasb
    f_base = F + b * stride_fb
    # Stage 1: whole tiles, no masks. Stage 2: the diagonal and ragged tiles.
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, row_min, row_pos, k_base, v_base, k_b, v_b, kv_h, bias_base, f_base,
        stride_kn, stride_vn, qk_scale, cap_in, cap_out, 0, full_end, N_K,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, PAPER, HAS_BIAS, SOFTCAP, DOT_PRECISION,
        HOIST, TMA,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, row_min, row_pos, k_base, v_base, k_b, v_b, kv_h, bias_base, f_base,
        stride_kn, stride_vn, qk_scale, cap_in, cap_out, full_end, hi, N_K,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, PAPER, HAS_BIAS, SOFTCAP, DOT_PRECISION,
        HOIST, TMA,
    )
    # l = 0 only where acc = 0: zeros (with sinks l >= the sink's share > 0, and a row with
    # no visible key has acc = 0: zeros too)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)


def _row_min_fwd(
    Q, K, MASK, ROW_MIN,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_mb, stride_rb, stride_rh,
    qk_scale, cap_in, cap_out,
    N_Q, N_K, H_Q, GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HOIST: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """Paper mode's row minima: ROW_MIN[b, h, i] = qk_scale * min over visible j of q_i . k_j
    (0 for a row with no visible key). SOFTCAP: the soft cap of that minimum (the cap is
    increasing, so the minimum of the capped scores is the cap of the minimum: one
    ``_soft_cap`` per row, none per score). One program per BLOCK_M rows of one (b, h); b runs over
    the batch that q, k and the padding mask really have (1 when all three are shared by the
    variants: the minima are then computed once per head and row, not once per variant).
    QK^T and a minimum only: no exponential, no PV product. TMA: Q and K are descriptors, as
    in ``_suppressed_attention_fwd``."""
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b32 = pid_bh // H_Q
    h32 = pid_bh % H_Q
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    h_kv = (h32 // GROUP).to(tl.int64)
    mask_base = MASK + b * stride_mb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    if TMA:
        k_base = K
        q = Q.load([tl.where(stride_qb == 0, 0, b32), h32, pid_m * BLOCK_M, 0])
        q = q.reshape([BLOCK_M, BLOCK_D])
    else:
        k_base = K + b * stride_kb + h_kv * stride_kh
        if HOIST:
            k_base += offs_n0[:, None] * stride_kn + offs_d[None, :]
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :], mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                    other=0.0)  # fmt: skip
    k_b = tl.where(stride_kb == 0, 0, b32)  # descriptor coordinates (TMA only)
    kv_h = h32 // GROUP
    row_pos = offs_m + (N_K - N_Q)
    full_end, hi = _key_ranges(pid_m, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    row_min = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k = _load_kv_tile(k_base, k_b, kv_h, stride_kn, start_n, offs_n0, offs_d, N_K,
                          HEAD_DIM, BLOCK_N, BLOCK_D, False, HOIST, TMA)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_MASK:
            real = tl.load(mask_base + offs_n)
            s = tl.where((real != 0)[None, :], s, float("inf"))
        row_min = tl.minimum(row_min, tl.min(s, 1))
    for start_n in range(full_end, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        k = _load_kv_tile(k_base, k_b, kv_h, stride_kn, start_n, offs_n0, offs_d, N_K,
                          HEAD_DIM, BLOCK_N, BLOCK_D, True, HOIST, TMA)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= row_pos[:, None])
        if HAS_MASK:
            real = tl.load(mask_base + offs_n, mask=n_ok, other=0)
            visible = visible & (real != 0)[None, :]
        row_min = tl.minimum(row_min, tl.min(tl.where(visible, s, float("inf")), 1))
    # No visible key: any finite value works (the row gives zeros); avoid inf - inf.
    if SOFTCAP:
        row_min = tl.where(row_min == float("inf"), 0.0, _soft_cap(row_min, cap_in, cap_out))
    else:
        row_min = tl.where(row_min == float("inf"), 0.0, row_min * qk_scale)
    tl.store(ROW_MIN + b * stride_rb + h * stride_rh + offs_m, row_min, mask=row_ok)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters for one head-dim bucket (BLOCK_D) and dtype."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Build the K/V pointer tile once outside the key loop (fewer instructions per tile) or
    # per tile (fewer live registers). ``kernel_config`` hoists on sm_90 at power-of-two head
    # dims, where the ahead-of-time compiles show no spill; elsewhere the hoisted tile spilled.
    hoist: bool = False
    # Q/K/V through tensor descriptors (TMA, sm_90 and up), where ``run`` finds the layout
    # TMA can read (``_tma_descriptors``); else the pointer path. Never hoisted then.
    tma: bool = False


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head-dim bucket (BLOCK_D). NOT TIMED: no GPU has
# run this kernel, so no entry was chosen by measured time. Each is the largest tile tried in a
# sweep of ahead-of-time compiles (both modes, causal, factors and padding mask, both kernels)
# that spills no register at any head dim of its bucket (e.g. 40 and 64, 80 and 128) on sm_80
# resp. sm_90; ``tests/test_triton_aot.py`` re-checks every entry. A GPU run should re-pick
# them by time (``benchmarks/gpu_check.py`` gives the numbers to do it).
_CONFIGS = {
    # 16-bit inputs
    (80, 2): {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (64, 32, 4, 2),
              128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    (90, 2): {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2),
              128: (128, 64, 8, 2), 256: (64, 32, 4, 2)},
    # fp32 inputs (TF32 tensor cores)
    (80, 4): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (32, 32, 4, 2),
              128: (128, 32, 8, 2), 256: (64, 16, 8, 2)},
    (90, 4): {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2),
              128: (128, 32, 8, 2), 256: (64, 16, 8, 2)},
}  # fmt: skip
_SMALL_SHARED_ARCHS = (86, 89)
_SMALL_SHARED_CONFIGS = {(4, 256): (32, 32, 4, 1), (2, 128): (64, 32, 4, 2)}
# With soft-capping on (its exp2 and reciprocal per score hold more registers): the sm_80
# fp32 d256 tile (64, 16, 8, 2) spilled 40 bytes in the attention kernel; with one stage the
# row-minimum kernel spilled 8 instead. (64, 32, 8, 1) spills in neither (255 and 128
# registers, 104 KB of shared memory).
_SOFTCAP_CONFIGS = {(80, 4, 256): (64, 32, 8, 1)}


def kernel_config(
    head_dim: int, dtype: torch.dtype, arch: int = 80, softcap: bool = False
) -> KernelConfig:
    """Deterministic launch config for a head dim, dtype and compute capability (80 = sm_80).

    Architectures from sm_90 up use the sm_90 table, older ones the sm_80 table, except two
    entries for sm_86 / sm_89 (99 KB of shared memory per block, not 163 KB, and a ptxas
    that spilled the sm_80 tile at 16-bit head dim bucket 128) and, with ``softcap``, the
    entries of ``_SOFTCAP_CONFIGS``.
    """
    family = 90 if arch >= 90 else 80
    size = 4 if dtype == torch.float32 else 2
    block_d = _block_d(head_dim)
    if arch in _SMALL_SHARED_ARCHS and (size, block_d) in _SMALL_SHARED_CONFIGS:
        return KernelConfig(*_SMALL_SHARED_CONFIGS[(size, block_d)])
    if softcap and (family, size, block_d) in _SOFTCAP_CONFIGS:
        return KernelConfig(*_SOFTCAP_CONFIGS[(family, size, block_d)])
    hoist = family == 90 and head_dim == block_d
    return KernelConfig(*_CONFIGS[(family, size)][block_d], hoist=hoist, tma=family == 90)


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _constexprs(
    kernel: str,
    head_dim: int,
    dtype: torch.dtype,
    mode: str,
    causal: bool,
    has_factors: bool,
    has_mask: bool,
    cfg: KernelConfig,
    softcap: bool = False,
    has_sinks: bool = False,
) -> dict[str, Any]:
    """Constexpr arguments of ``kernel`` ("attention" or "row_min"): one definition for
    ``run`` and ``compile_kernel``."""
    common = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _block_d(head_dim),
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "CAUSAL": causal,
        "HOIST": cfg.hoist and not cfg.tma,
        "TMA": cfg.tma,
    }
    # fp32 operands: TF32 tensor cores (see the module docstring); no effect on 16-bit ones.
    tail = {"DOT_PRECISION": "tf32"}
    if kernel == "row_min":
        return {**common, "HAS_MASK": has_mask, "SOFTCAP": softcap, **tail}
    paper = mode == "paper" and has_factors
    has_bias = has_mask or (has_factors and not paper)
    return {**common, "PAPER": paper, "HAS_BIAS": has_bias, "SOFTCAP": softcap,
            "HAS_SINKS": has_sinks, **tail}  # fmt: skip


_KERNEL_SOURCES = {"attention": _suppressed_attention_fwd, "row_min": _row_min_fwd}
# Plain functions until _triton() runs; the kernels call them by these global names.
_HELPER_SOURCES = {
    fn.__name__: fn
    for fn in (_key_ranges, _key_tile_ptrs, _load_key_rows, _load_kv_tile, _soft_cap,
               _attend_tiles)
}


@functools.cache
def _triton():
    """Import triton and build the kernels once; returns (triton, {name: kernel})."""
    global tl
    import triton
    import triton.language as language

    tl = language
    # The kernels call the helpers by their global names: make those names JIT functions.
    module = sys.modules[__name__]
    for name, fn in _HELPER_SOURCES.items():
        setattr(module, name, triton.jit(fn))
    kernels = {
        name: triton.jit(fn, do_not_specialize=list(_NO_SPECIALIZE))
        for name, fn in _KERNEL_SOURCES.items()
    }
    return triton, kernels


def _triton_importable() -> bool:
    try:
        _triton()
    except ImportError:
        return False
    return True


def _interpreter_on() -> bool:
    """Whether Triton runs (or will run, once imported) its CPU interpreter."""
    if "triton" in sys.modules:
        try:
            import triton

            return bool(triton.knobs.runtime.interpret)
        except (ImportError, AttributeError):
            pass
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unsupported_reason(q: torch.Tensor, call: AttentionCall) -> str | None:
    """None if the Triton kernel can run this validated call, else a short reason."""
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not supported (float16, bfloat16, float32)"
    if call.head_dim > MAX_HEAD_DIM:
        return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
    if not q.is_cuda and not _interpreter_on():
        return "needs CUDA tensors or TRITON_INTERPRET=1 set before triton is imported"
    if not _triton_importable():
        return "triton is not importable"
    return None


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernel reads the head dim with stride 1; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _shared(t: torch.Tensor | None) -> bool:
    """Whether every variant reads the same rows (batch 1, or a stride-0 expand)."""
    return t is None or t.shape[0] == 1 or t.stride(0) == 0


def _tma_descriptor(t: torch.Tensor, block_rows: int, block_d: int):
    """A [Bt, H, N, D] tensor descriptor of ``t`` with [1, 1, block_rows, block_d] blocks, or
    None where TMA cannot read it. A shared batch (``_batch_stride`` 0) is described as its
    batch 0 (the kernels read batch 0 when the batch stride is 0). TMA needs a 16-byte
    aligned base, a unit last-dim stride and the other strides multiples of 16 bytes; a
    dimension of size 1 is never stepped along, so its stride is replaced by a valid one."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if _batch_stride(t) == 0:
        t = t[:1]
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 != 0 or 0 in t.shape:
        return None
    strides = list(t.stride())
    for dim in (2, 1, 0):
        if t.shape[dim] == 1:
            strides[dim] = t.shape[dim + 1] * strides[dim + 1]
    if any(s <= 0 or (s * size) % 16 != 0 for s in strides[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_rows, block_d])


def _tma_descriptors(q, k, v, cfg: KernelConfig, head_dim: int):
    """(q, k, v) descriptors for the TMA path, or None if any of them cannot be one (the
    launcher then takes the pointer path: decided on the host, per call)."""
    block_d = _block_d(head_dim)
    descs = (_tma_descriptor(q, cfg.block_m, block_d), _tma_descriptor(k, cfg.block_n, block_d),
             _tma_descriptor(v, cfg.block_n, block_d))  # fmt: skip
    return None if any(d is None for d in descs) else descs


def _key_vectors(factors, key_padding_mask, mode: str):
    """Per-variant key vectors, fp32, [B or 1, Nk]: (bias, paper_factors), None where unused.
    Computed once per call (O(B Nk)), so the kernel never takes a logarithm or builds a
    padding mask per score:

    - log mode: bias = log2(f) (f = 0 -> -inf: the key is removed), -inf for padded keys;
    - paper mode: the factors as fp32; bias = 0 / -inf for real / padded keys, if padding;
    - no factors: bias = 0 / -inf from the padding mask, if any.
    """
    bias = paper_factors = None
    f = None if factors is None else factors.to(torch.float32)
    if f is not None and mode == "paper":
        paper_factors = f.contiguous()
    elif f is not None:
        bias = torch.log2(f)
    if key_padding_mask is not None:
        if bias is None:
            bias = torch.zeros(key_padding_mask.shape, dtype=torch.float32,
                               device=key_padding_mask.device)  # fmt: skip
        bias = bias.masked_fill(~key_padding_mask, float("-inf"))
    if bias is not None:
        bias = bias.contiguous()
    return bias, paper_factors


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    factors: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    call: AttentionCall,
    *,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernels on validated inputs; returns [B, Hq, Nq, D] contiguous in q's dtype.

    Paper mode with factors launches ``_row_min_fwd`` first (into a [1 or B, Hq, Nq] fp32
    buffer: 1 when q, k and the padding mask are all shared by the variants), then the
    attention kernel; every other call is one launch.

    Args:
        q: [Bq, Hq, Nq, D]; k, v: [Bk, Hkv, Nk, D]; Bq, Bk in {1, B}; any strides.
        factors: [B, Nk] (any float dtype, read as fp32) or None (plain attention).
        key_padding_mask: [1 or B, Nk] bool, True = a real key, or None.
        call: the validated call from ``check_call`` (scale, causal, mode, softcap).
        sinks: [Hq] sink logits (any float dtype, read as fp32) exactly when ``call.has_sinks``.
        out: optional preallocated [B, Hq, Nq, D] contiguous output in q's dtype (tests pass a
            NaN-filled one to prove every element is written).
    """
    triton, kernels = _triton()
    shape = (call.batch, call.heads_q, call.len_q, call.head_dim)
    if out is None:
        out = torch.empty(shape, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {q.dtype} tensor of shape {shape}, got "
            f"{out.dtype} {tuple(out.shape)} (contiguous={out.is_contiguous()})"
        )
    elif out.device != q.device:
        raise ValueError(f"out must be on q's device {q.device}, got {out.device}")
    if call.has_sinks != (sinks is not None):
        raise ValueError("sinks must be given exactly when the validated call has sinks")
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    qk_scale = call.scale * LOG2E
    cap_in = cap_out = 0.0  # unread unless SOFTCAP
    if call.softcap is not None:
        cap_in, cap_out = 2.0 * qk_scale / call.softcap, call.softcap * LOG2E
    sinks2 = None if sinks is None else (sinks.to(torch.float32) * LOG2E).contiguous()
    bias, paper_factors = _key_vectors(factors, key_padding_mask, call.mode)
    paper = paper_factors is not None
    arch = 80
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        arch = 10 * major + minor
    cfg = kernel_config(call.head_dim, q.dtype, arch, softcap=call.softcap is not None)
    q_arg, k_arg, v_arg = q, k, v
    if cfg.tma:
        descs = _tma_descriptors(q, k, v, cfg, call.head_dim)
        if descs is None:
            cfg = replace(cfg, tma=False)
        else:
            q_arg, k_arg, v_arg = descs
    num_m = triton.cdiv(call.len_q, cfg.block_m)
    group = call.heads_q // call.heads_kv
    flags = (call.head_dim, q.dtype, call.mode, call.causal, factors is not None,
             key_padding_mask is not None, cfg,
             call.softcap is not None, call.has_sinks)  # fmt: skip
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        row_min = None
        if paper:
            mask = None
            if key_padding_mask is not None:
                mask = key_padding_mask.contiguous().view(torch.uint8)
            per_variant = not (_shared(q) and _shared(k) and _shared(mask))
            rows = call.batch if per_variant else 1
            row_min = torch.empty(rows, call.heads_q, call.len_q, dtype=torch.float32,
                                  device=q.device)  # fmt: skip
            kernels["row_min"][(num_m * rows * call.heads_q,)](
                q_arg, k_arg, mask if mask is not None else q, row_min,
                _batch_stride(q), q.stride(1), q.stride(2),
                _batch_stride(k), k.stride(1), k.stride(2),
                0 if mask is None else _batch_stride(mask),
                row_min.stride(0), row_min.stride(1),
                qk_scale, cap_in, cap_out, call.len_q, call.len_k, call.heads_q, group,
                **_constexprs("row_min", *flags), **launch,
            )  # fmt: skip
        unused = q  # the pointer passed where a constexpr flag says it is never read
        kernels["attention"][(num_m * call.batch * call.heads_q,)](
            q_arg, k_arg, v_arg,
            bias if bias is not None else unused,
            paper_factors if paper else unused,
            row_min if paper else unused,
            sinks2 if sinks2 is not None else unused,
            out,
            _batch_stride(q), q.stride(1), q.stride(2),
            _batch_stride(k), k.stride(1), k.stride(2),
            _batch_stride(v), v.stride(1), v.stride(2),
            0 if bias is None else _batch_stride(bias),
            0 if paper_factors is None else paper_factors.stride(0),
            0 if row_min is None else _batch_stride(row_min),
            0 if row_min is None else row_min.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            qk_scale, cap_in, cap_out, call.len_q, call.len_k, call.heads_q, group,
            **_constexprs("attention", *flags), **launch,
        )  # fmt: skip
    return out


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer arguments read as fp32 vectors / u8 masks when their flag is on.
_FP32_POINTERS = {"BIAS": "HAS_BIAS", "F": "PAPER", "ROW_MIN": "PAPER", "SINKS": "HAS_SINKS"}
_FP32_SCALARS = ("qk_scale", "cap_in", "cap_out")
# Strides that hold the head dim (divisible by 16 only when it is) or a length (never assumed).
_ROW_STRIDES = ("stride_qm", "stride_kn", "stride_vn", "stride_om")
_LENGTH_STRIDES = ("stride_biasb", "stride_fb", "stride_mb", "stride_rb", "stride_rh")


def compile_kernel(
    arch: int,
    head_dim: int,
    dtype: torch.dtype,
    mode: str,
    causal: bool,
    has_factors: bool,
    has_mask: bool,
    config: KernelConfig | None = None,
    kernel: str = "attention",
    softcap: bool = False,
    has_sinks: bool = False,
):
    """Compile ahead of time for ``sm_<arch>`` (no GPU needed) exactly as ``run`` would launch.

    ``kernel``: "attention" (the main kernel) or "row_min" (paper mode's first launch). Same
    constexprs, config (``kernel_config``) and integer specialisation as a launch on
    contiguous tensors: pointers 16-byte aligned; batch/head strides of q, k, v, out divisible
    by 16; the row stride (= head dim) divisible by 16 when the head dim is; strides that
    hold a length (key vectors, row minima) not assumed divisible. Returns triton's compiled
    kernel (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata``). Works whether or not
    ``TRITON_INTERPRET`` is set. ``config`` overrides the table (for tuning it). ``softcap``
    and ``has_sinks`` turn on the soft-capping and sink paths (the values stay runtime
    arguments).
    """
    if mode not in ("paper", "log"):
        raise ValueError(f"mode must be 'paper' or 'log', got {mode!r}")
    if dtype not in _TRITON_DTYPE:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if kernel not in _KERNEL_SOURCES:
        raise ValueError(f"kernel must be one of {tuple(_KERNEL_SOURCES)}, got {kernel!r}")
    triton, _ = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(_KERNEL_SOURCES[kernel], do_not_specialize=list(_NO_SPECIALIZE))
    cfg = config if config is not None else kernel_config(head_dim, dtype, arch, softcap)
    ty = _TRITON_DTYPE[dtype]
    constexprs = _constexprs(kernel, head_dim, dtype, mode, causal, has_factors, has_mask, cfg,
                             softcap, has_sinks)  # fmt: skip
    pointers = {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "Out": f"*{ty}"}
    if cfg.tma:  # what ``_tma_descriptors`` hands the kernels
        block_d = _block_d(head_dim)
        for name, rows in (("Q", cfg.block_m), ("K", cfg.block_n), ("V", cfg.block_n)):
            pointers[name] = f"tensordesc<{ty}[1, 1, {rows}, {block_d}]>"
    for name, flag in _FP32_POINTERS.items():
        pointers[name] = "*fp32" if constexprs.get(flag) else f"*{ty}"
    pointers["MASK"] = "*u8" if has_mask else f"*{ty}"
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    divisible = [["tt.divisibility", 16]]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            if pointers[name].startswith("*"):
                attrs[(i,)] = divisible
        elif name in _FP32_SCALARS:
            signature[name] = "fp32"
        elif name.startswith("stride_"):
            signature[name] = "i32"
            if name in _LENGTH_STRIDES:
                continue
            if name not in _ROW_STRIDES or head_dim % 16 == 0:
                attrs[(i,)] = divisible
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=target, options=options)


__all__ = [
    "KernelConfig",
    "compile_kernel",
    "kernel_config",
    "run",
    "unsupported_reason",
]
