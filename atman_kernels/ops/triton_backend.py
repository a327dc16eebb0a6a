"""Triton backend: one fused launch computes every variant and head of suppressed attention.

Kernel (``_suppressed_attention_fwd``), flash-attention style: each program owns BLOCK_M query
rows of one (variant b, query head h) pair and walks the key tiles of its visible range with an
online softmax in fp32; no [Nq, Nk] buffer exists anywhere. Grid: one axis of
``cdiv(Nq, BLOCK_M) * B * Hq`` programs (query block fastest, so neighbouring programs share
K/V; a single axis has no 65535 limit on B * Hq). Tensors:

- q [Bq, Hq, Nq, D], k/v [Bk, Hkv, Nk, D], Bq and Bk in {1, B}: a batch of 1 is read with
  batch stride 0 (shared by every variant, never copied); kv head = h // (Hq // Hkv) (GQA/MQA).
- factors [B, Nk] (read as fp32): a per-variant vector over keys, loaded once per key tile,
  the same slot as flash-attn's vector ``BIAS_TYPE``.
- key_padding_mask [1 or B, Nk] bool (read as uint8; batch stride 0 when shared).
- out [B, Hq, Nq, D] in q's dtype.

Causal masking is bottom-right aligned (query row i at absolute key position Nk - Nq + i); a
row with no visible key, or in log mode only removed keys, gives zeros, never NaN.

Modes (constexpr, one compiled kernel each):

- ``log``: s' = s + log f, a per-key additive bias; one pass, same FLOPs as plain attention.
- ``paper``: s' = m + f (s - m) with m the row minimum over *visible* keys. m is needed before
  the first exponential, so the kernel makes two passes over the key tiles of its row block:
  pass 1 computes QK^T only and keeps the masked row minimum (no exp, no PV, no softmax
  state); pass 2 is the online softmax on the rescaled scores. FLOPs: plain attention costs
  4 * Nq * Nk * D (2 for QK^T, 2 for PV); pass 1 adds 2 * Nq * Nk * D, i.e. 1.5x the matmul
  FLOPs and no extra exponentials, for any factors. The one-pass alternative (ATMAN.md
  section 2: one accumulator for untouched keys, one for suppressed keys, merged with the
  final minimum) needs a second PV product (also 1.5x the matmul FLOPs), twice the
  exponentials, twice the accumulator registers, and only works when a variant's factors take
  two values; conceptual suppression has continuous factors, so the two-pass form is the one
  exact scheme for every input. Scores are kept in base 2 (log2(e) folded into the scale):
  the min-shift is linear, so it commutes with the change of base.

Precision: fp16/bf16 operands feed the tensor cores directly with fp32 accumulation. fp32
operands use TF32 tensor-core products (about 1e-3 relative error per product, what torch
gives with ``allow_tf32=True``): ``tf32x3`` (fp32 accuracy) and ``ieee`` (no tensor cores) both
spilled registers for every tile tried at head dims >= 80, so they are not offered. Use
fp16/bf16 for speed, the reference or C++ backend for fp32 exactness. Lengths, head counts
and the scale are runtime arguments (no recompile per length); head dim, block sizes, mode
and the masks are constexpr. Head dims 16..256; a head dim that is not a power of two is
padded to the next one with masked loads.

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
from dataclasses import dataclass
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


def _suppressed_attention_fwd(
    Q, K, V, F, MASK, Out,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_fb, stride_mb,
    stride_ob, stride_oh, stride_om,
    qk_scale,
    N_Q, N_K, H_Q, GROUP,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_FACTORS: tl.constexpr,
    PAPER: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (variant, query head); see the module docstring.

    Last-dim strides are 1 (the launcher guarantees it). ``qk_scale`` = scale * log2(e).
    """
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // H_Q).to(tl.int64)
    h = pid_bh % H_Q
    h_kv = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    f_base = F + b * stride_fb
    mask_base = MASK + b * stride_mb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < N_Q
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if CAUSAL:
        # Row i sees keys j <= i + (N_K - N_Q); keys past the block's last row are never read.
        row_pos = offs_m + (N_K - N_Q)
        hi = tl.minimum(N_K, pid_m * BLOCK_M + BLOCK_M + (N_K - N_Q))
    else:
        hi = N_K

    # Pass 1 (paper mode): masked row minimum of the raw scores q.k (scale > 0 commutes).
    row_min = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PAPER and HAS_FACTORS:
        row_min = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < N_K
            k = tl.load(
                k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= row_pos[:, None])
            if HAS_MASK:
                real = tl.load(mask_base + offs_n, mask=n_ok, other=0)
                visible = visible & (real != 0)[None, :]
            row_min = tl.minimum(row_min, tl.min(tl.where(visible, s, float("inf")), 1))
        # No visible key: any finite value works (the row gives zeros); avoid inf - inf.
        row_min = tl.where(row_min == float("inf"), 0.0, row_min * qk_scale)

    # Pass 2: online softmax over s' in base 2.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_FACTORS:
            f = tl.load(f_base + offs_n, mask=n_ok, other=1.0)
            if PAPER:
                s = row_min[:, None] + f[None, :] * (s - row_min[:, None])
            else:
                s = s + tl.log2(f)[None, :]  # f = 0 -> -inf: the key is removed
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= row_pos[:, None])
        if HAS_MASK:
            real = tl.load(mask_base + offs_n, mask=n_ok, other=0)
            visible = visible & (real != 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l = 0 only where acc = 0: zeros
    o_base = Out + b * stride_ob + h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters for one head-dim bucket (BLOCK_D) and dtype."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head-dim bucket (BLOCK_D). Picked from a sweep of
# ahead-of-time compiles (paper mode, causal, factors and padding mask: the heaviest variant)
# as the largest tile with no local-memory spill for every head dim of the bucket (e.g. 40 and
# 64, 80 and 128) on sm_80 resp. sm_90; ``tests/test_triton_aot.py`` re-checks every entry.
_CONFIGS = {
    # 16-bit inputs
    (80, 2): {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (64, 64, 4, 2),
              128: (64, 64, 4, 2), 256: (64, 32, 8, 2)},
    (90, 2): {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2),
              128: (128, 64, 8, 2), 256: (64, 32, 4, 2)},
    # fp32 inputs (TF32 tensor cores)
    (80, 4): {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2),
              128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    (90, 4): {16: (128, 64, 8, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2),
              128: (128, 32, 8, 2), 256: (64, 16, 8, 2)},
}  # fmt: skip
_SMALL_SHARED_ARCHS = (86, 89)
_SMALL_SHARED_CONFIGS = {(4, 256): (32, 32, 4, 1), (2, 128): (64, 32, 4, 2)}


def kernel_config(head_dim: int, dtype: torch.dtype, arch: int = 80) -> KernelConfig:
    """Deterministic launch config for a head dim, dtype and compute capability (80 = sm_80).

    Architectures from sm_90 up use the sm_90 table, older ones the sm_80 table, except two
    entries for sm_86 / sm_89 (99 KB of shared memory per block, not 163 KB, and a ptxas
    that spilled the sm_80 tile at 16-bit head dim bucket 128).
    """
    family = 90 if arch >= 90 else 80
    size = 4 if dtype == torch.float32 else 2
    block_d = _block_d(head_dim)
    if arch in _SMALL_SHARED_ARCHS and (size, block_d) in _SMALL_SHARED_CONFIGS:
        return KernelConfig(*_SMALL_SHARED_CONFIGS[(size, block_d)])
    return KernelConfig(*_CONFIGS[(family, size)][block_d])


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _constexprs(
    head_dim: int,
    dtype: torch.dtype,
    mode: str,
    causal: bool,
    has_factors: bool,
    has_mask: bool,
    cfg: KernelConfig,
) -> dict[str, Any]:
    """The kernel's constexpr arguments: one definition for ``run`` and ``compile_kernel``."""
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _block_d(head_dim),
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "CAUSAL": causal,
        "HAS_FACTORS": has_factors,
        "PAPER": mode == "paper",
        "HAS_MASK": has_mask,
        # fp32 operands: TF32 tensor cores (see the module docstring); no effect on 16-bit ones.
        "DOT_PRECISION": "tf32",
    }


@functools.cache
def _triton():
    """Import triton and build the kernel once; returns (triton, kernel)."""
    global tl
    import triton
    import triton.language as language

    tl = language
    kernel = triton.jit(_suppressed_attention_fwd, do_not_specialize=list(_NO_SPECIALIZE))
    return triton, kernel


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


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    factors: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    call: AttentionCall,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel on validated inputs; returns [B, Hq, Nq, D] contiguous in q's dtype.

    Args:
        q: [Bq, Hq, Nq, D]; k, v: [Bk, Hkv, Nk, D]; Bq, Bk in {1, B}; any strides.
        factors: [B, Nk] (any float dtype, read as fp32) or None (plain attention).
        key_padding_mask: [1 or B, Nk] bool, True = a real key, or None.
        call: the validated call from ``check_call``.
        out: optional preallocated [B, Hq, Nq, D] contiguous output in q's dtype (tests pass a
            NaN-filled one to prove every element is written).
    """
    triton, kernel = _triton()
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
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    f = None if factors is None else factors.to(torch.float32).contiguous()
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.contiguous().view(torch.uint8)
    arch = 80
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        arch = 10 * major + minor
    cfg = kernel_config(call.head_dim, q.dtype, arch)
    grid = (triton.cdiv(call.len_q, cfg.block_m) * call.batch * call.heads_q,)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernel[grid](
            q, k, v,
            f if f is not None else q,  # never read when HAS_FACTORS is False
            mask if mask is not None else q,  # never read when HAS_MASK is False
            out,
            _batch_stride(q), q.stride(1), q.stride(2),
            _batch_stride(k), k.stride(1), k.stride(2),
            _batch_stride(v), v.stride(1), v.stride(2),
            0 if f is None else _batch_stride(f),
            0 if mask is None else _batch_stride(mask),
            out.stride(0), out.stride(1), out.stride(2),
            call.scale * LOG2E,
            call.len_q, call.len_k, call.heads_q, call.heads_q // call.heads_kv,
            **_constexprs(
                call.head_dim, q.dtype, call.mode, call.causal, f is not None, mask is not None, cfg
            ),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
    return out


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_kernel(
    arch: int,
    head_dim: int,
    dtype: torch.dtype,
    mode: str,
    causal: bool,
    has_factors: bool,
    has_mask: bool,
    config: KernelConfig | None = None,
):
    """Compile ahead of time for ``sm_<arch>`` (no GPU needed) exactly as ``run`` would launch.

    Same constexprs, config (``kernel_config``) and integer specialisation as a launch on
    contiguous tensors: pointers 16-byte aligned; batch/head strides divisible by 16; the row
    stride (= head dim) divisible by 16 when the head dim is. Returns triton's compiled kernel
    (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata`` with ``n_regs``, ``n_spills``,
    ``shared``). Works whether or not ``TRITON_INTERPRET`` is set. ``config`` overrides the
    table (for tuning it).
    """
    if mode not in ("paper", "log"):
        raise ValueError(f"mode must be 'paper' or 'log', got {mode!r}")
    if dtype not in _TRITON_DTYPE:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    triton, _ = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(_suppressed_attention_fwd, do_not_specialize=list(_NO_SPECIALIZE))
    cfg = config if config is not None else kernel_config(head_dim, dtype, arch)
    ty = _TRITON_DTYPE[dtype]
    pointers = {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "F": "*fp32", "MASK": "*u8"}
    pointers["Out"] = f"*{ty}"
    if not has_factors:
        pointers["F"] = f"*{ty}"  # the launcher passes q as the unused pointer
    if not has_mask:
        pointers["MASK"] = f"*{ty}"
    row_strides = ("stride_qm", "stride_kn", "stride_vn", "stride_om")
    constexprs = _constexprs(head_dim, dtype, mode, causal, has_factors, has_mask, cfg)
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    divisible = [["tt.divisibility", 16]]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = divisible
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name.startswith("stride_"):
            signature[name] = "i32"
            if name not in row_strides or head_dim % 16 == 0:
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
