"""The op ``suppressed_attention`` against torch SDPA, timed by pytest-benchmark.

Each size is one benchmark group, so every backend and mode sits beside SDPA (no
suppression, the floor) in the report. Inputs: SmolLM2's heads (Hq=9, Hkv=3, D=64), fp32,
B variants with single-token suppression (factor 0.1, one key each), causal or full (no
mask). The last timed call's output is checked against the reference op.

Backends: ``reference`` and ``cpp`` on CPU; ``triton`` on a CUDA device only (on CPU it would
run under Triton's interpreter, orders of magnitude too slow to time: skipped, with that
reason). ``cpp`` is CPU-only, skipped on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atman_kernels import suppressed_attention
from atman_kernels.ops import cpp_backend

HQ, HKV, D = 9, 3, 64
# size id -> (variants B, sequence length N, timed rounds, warm-up rounds)
SIZES = {"small": (4, 64, 30, 3), "medium": (16, 256, 10, 2)}
BACKENDS = ("reference", "cpp", "triton")
MODES = ("paper", "log")
MASKS = {"causal": True, "full": False}
CASES = [pytest.param(b, m, c, id=f"{b}-{m}-{c}") for b in BACKENDS for m in MODES
         for c in MASKS] + [pytest.param("sdpa", None, c, id=f"sdpa-{c}") for c in MASKS]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_case(b: int, n: int) -> tuple[torch.Tensor, ...]:
    """q [B, Hq, N, D], k / v [B, Hkv, N, D], factors [B, N] (0.1 on one key per variant)."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(b, HQ, n, D, generator=g)
    k = torch.randn(b, HKV, n, D, generator=g)
    v = torch.randn(b, HKV, n, D, generator=g)
    factors = torch.ones(b, n)
    factors[torch.arange(b), torch.arange(b) * (n // b)] = 0.1
    return tuple(t.to(DEVICE) for t in (q, k, v, factors))


def skip_reason(backend: str) -> str | None:
    if backend == "triton" and DEVICE.type != "cuda":
        return ("triton on CPU runs under Triton's interpreter (TRITON_INTERPRET=1), far too "
                "slow to time; it is timed on a CUDA device")
    if backend == "cpp" and DEVICE.type == "cuda":
        return "cpp is the CPU kernel; this run's tensors are on CUDA"
    if backend == "cpp" and cpp_backend.extension_error() is not None:
        return f"C++ extension not built: {cpp_backend.extension_error()}"
    return None


@pytest.mark.parametrize("backend, mode, mask", CASES)
@pytest.mark.parametrize("size", list(SIZES))
def test_op(benchmark, size: str, backend: str, mode: str | None, mask: str) -> None:
    reason = skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    b, n, rounds, warmup = SIZES[size]
    q, k, v, factors = make_case(b, n)
    causal = MASKS[mask]
    if backend == "sdpa":
        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        want = suppressed_attention(q, k, v, None, causal=causal, backend="reference")
    else:
        def run():
            return suppressed_attention(q, k, v, factors, causal=causal, mode=mode,
                                        backend=backend)
        want = suppressed_attention(q, k, v, factors, causal=causal, mode=mode,
                                    backend="reference")

    def timed():
        out = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"op {size}: B={b} Hq={HQ} Hkv={HKV} N={n} D={D} fp32 {DEVICE.type}"
    benchmark.extra_info.update(backend=backend, mode=mode or "none", causal=causal,
                                B=b, N=n, device_type=DEVICE.type)
    with torch.inference_mode():
        got = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{backend} {mode} {mask}: max error {err:.2e} against the reference"
