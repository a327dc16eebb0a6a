"""The C++ CPU backend: a fused, tiled kernel registered as ``torch.ops.atman_kernels``.

The kernel (``csrc/suppressed_attention.cpp``, built by ``setup.py`` into ``atman_kernels._C``)
is parallel over variants x heads x blocks of query rows; per block and tile of 256 keys it
computes the scores with one BLAS GEMM into a per-thread buffer, applies soft-capping, masks and
factors, runs an online (flash-style) softmax with vector loops, and multiplies by V with a
second GEMM. Paper mode costs the FLOPs of plain attention (the block's scores are kept, so
the row minimum needs no second QK^T); log mode and plain attention stream the scores tile by
tile. Memory is O(rows per block x Nk) per thread at most, never [N, N]. fp32 math for
fp32/fp16/bf16, fp64 for fp64. Soft-capping (``call.softcap``) and per-head sink logits
(``sinks``) are computed in the kernel.

Ops (importing ``atman_kernels._C`` registers them; this module adds their fake kernels so
``torch.compile`` and ``torch.library.opcheck`` accept them):

- ``suppressed_attention(q, k, v, factors, key_padding_mask, causal, scale, suppression_mode,``
  ``softcap=None, sinks=None) -> Tensor``;
- ``suppressed_attention_out(..., suppression_mode, out, softcap=None, sinks=None) -> None``
  (writes into ``out``).

One build runs on any CPU of its architecture: the inner kernel is compiled per instruction-set
level ("default", "avx2" = x86-64-v3, "avx512" = x86-64-v4) and the level is chosen at run time
from CPUID, or from ``ATEN_CPU_CAPABILITY`` as ATen's own kernels choose theirs (a level the CPU
cannot run is lowered to the best it can); :func:`isa` says which level runs.

The extension is imported here and nowhere else. If it is missing (built with
``ATMAN_SKIP_CPP_BUILD=1``, or not built at all) the import does not fail: ``unsupported_reason``
says why, and a warning is issued once when the backend is first asked for.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from ._checks import AttentionCall

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

ISA_LEVELS = ("default", "avx2", "avx512")  # lowest first

_IMPORT_ERROR: str | None
_C = None
try:  # loading the library registers torch.ops.atman_kernels.*
    _C = importlib.import_module("atman_kernels._C")
except ImportError as exc:  # the package must keep working through the reference backend
    _IMPORT_ERROR = (
        f"the C++ extension atman_kernels._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .` (unset ATMAN_SKIP_CPP_BUILD)"
    )
else:
    _IMPORT_ERROR = None

_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"atman_kernels cpp backend unavailable: {reason}", stacklevel=3)


def extension_error() -> str | None:
    """Why the extension could not be imported, or None when it is loaded."""
    return _IMPORT_ERROR


def isa() -> str:
    """The instruction-set level the kernel runs: "default", "avx2" or "avx512".

    The best the CPU supports, unless ``ATEN_CPU_CAPABILITY`` (read once, as ATen reads it)
    names a lower one. Raises :class:`RuntimeError` when the extension is not built.
    """
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _C.isa()


def supported_isas() -> tuple[str, ...]:
    """Every level this CPU and this build can run, lowest first (tests run each)."""
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    best = _C.supported_isa()
    return ISA_LEVELS[: ISA_LEVELS.index(best) + 1]


def _batch(q: torch.Tensor, k: torch.Tensor, factors: torch.Tensor | None) -> int:
    return factors.shape[0] if factors is not None else max(q.shape[0], k.shape[0])


if _IMPORT_ERROR is None:

    @torch.library.register_fake("atman_kernels::suppressed_attention")
    def _suppressed_attention_fake(
        q, k, v, factors, key_padding_mask, causal, scale, suppression_mode, softcap=None,
        sinks=None,
    ):
        torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q and k must have rank 4")
        shape = (_batch(q, k, factors), q.shape[1], q.shape[2], q.shape[3])
        return q.new_empty(shape)

    @torch.library.register_fake("atman_kernels::suppressed_attention_out")
    def _suppressed_attention_out_fake(
        q, k, v, factors, key_padding_mask, causal, scale, suppression_mode, out, softcap=None,
        sinks=None,
    ):
        return None


def unsupported_reason(q: torch.Tensor, call: AttentionCall) -> str | None:
    """None when the C++ kernel can run this validated call, else a short reason."""
    if _IMPORT_ERROR is not None:
        _warn_once(_IMPORT_ERROR)
        return _IMPORT_ERROR
    if q.device.type != "cpu":
        return f"needs CPU tensors, got {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32, float64 are)"
    return None


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
    """Run the kernel on validated inputs.

    Args:
        q: [Bq, Hq, Nq, D]; k, v: [Bk, Hkv, Nk, D] with Bq, Bk in {1, B}; any strides.
        factors: [B, Nk] float or None; key_padding_mask: [1 or B, Nk] bool or None.
        call: the validated call (scale, causal, mode, softcap, whether there are sinks).
        sinks: [Hq] sink logits (any float dtype), exactly when ``call.has_sinks``.
        out: optional [B, Hq, Nq, D] contiguous tensor of q's dtype to write into.

    Returns:
        [B, Hq, Nq, D] contiguous, q's dtype (``out`` itself when given).
    """
    if call.has_sinks != (sinks is not None):
        raise ValueError(
            "sinks must be given exactly when the validated call has sinks "
            f"(call.has_sinks={call.has_sinks}, sinks {'given' if sinks is not None else 'None'})"
        )
    args = (q, k, v, factors, key_padding_mask, call.causal, call.scale, call.mode)
    if out is None:
        return torch.ops.atman_kernels.suppressed_attention(
            *args, softcap=call.softcap, sinks=sinks
        )
    torch.ops.atman_kernels.suppressed_attention_out(
        *args, out, softcap=call.softcap, sinks=sinks
    )
    return out
