"""Shared accuracy rules and input factories for the backend tests.

Two rules, both checked by :func:`assert_close_to_reference`:

- flash-attention's: a backend's max error against the float64 reference is at most twice the
  error of plain PyTorch computing in the same precision, plus a small floor (every dtype).
- fp32 accumulation (float16 / bfloat16 outputs): the backends promise fp32 math for half
  inputs, which leaves essentially one error, the final rounding to the output dtype. So the max
  error is at most ``FP32_ACCUMULATION_FACTOR`` times the max error of the float64 reference
  rounded to the output dtype (what a perfectly rounded fp32 result would have; the rounded fp32
  reference has the same error to within fp32's epsilon), plus a floor far below one
  low-precision ulp. Plain PyTorch in bf16 is allowed 0.16-0.41 absolute by the first rule on
  the suite's inputs; this one allows about 1.5 ulps of the output. The factor leaves room for
  a flash kernel's rounding of the probabilities to q's dtype before the P @ V product: the
  Triton kernel measured up to 1.23x under the interpreter (fp16), a CPU emulation of that
  rounding (``_planted.kernel_like``) up to 1.61x, the C++ kernel 1.00x; a kernel doing its
  math in the half dtype (``_planted.low_precision``) measured 3.4-26x where Nk >= 97.
"""

from __future__ import annotations

import torch

from atman_kernels.ops._checks import check_call
from atman_kernels.ops.reference import reference_attention

# Floor added to 2x the plain-PyTorch error, per dtype.
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
# fp32-accumulation rule: allowed max error / max error of the correctly rounded result.
FP32_ACCUMULATION_FACTOR = 3.0
# its floor, in units of the dtype's epsilon times the largest |output| (for outputs that are
# exact in the low precision, e.g. a single key: the rounded result then has no error at all).
FP32_ACCUMULATION_FLOOR = 1 / 16
HALF_DTYPES = (torch.float16, torch.bfloat16)


def make_inputs(
    batch: int,
    heads_q: int,
    heads_kv: int,
    len_q: int,
    len_k: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    shared_qkv: bool = False,
    factor_kind: str = "random",
    padding: bool = False,
    fully_padded_row: bool = False,
    seed: int = 0,
    device: str = "cpu",
):
    """Random q, k, v, factors, key_padding_mask for a call with ``batch`` variants.

    factor_kind: "none" (factors=None), "random" (uniform [0, 2): zeros rare), "zero_and_big"
    (a mix of exact 0, 1 and values > 1), "single" (AtMan's single-token suppression: one key
    per variant at 0.1).
    """
    g = torch.Generator().manual_seed(seed)
    bqk = 1 if shared_qkv else batch
    q = torch.randn(bqk, heads_q, len_q, head_dim, generator=g)
    k = torch.randn(bqk, heads_kv, len_k, head_dim, generator=g)
    v = torch.randn(bqk, heads_kv, len_k, head_dim, generator=g)
    if factor_kind == "none":
        factors = None
    elif factor_kind == "random":
        factors = torch.rand(batch, len_k, generator=g) * 2
    elif factor_kind == "zero_and_big":
        choice = torch.randint(0, 3, (batch, len_k), generator=g)
        factors = torch.tensor([0.0, 1.0, 3.5])[choice]
    elif factor_kind == "single":
        factors = torch.ones(batch, len_k)
        idx = torch.arange(batch) % len_k
        factors[torch.arange(batch), idx] = 0.1
    else:
        raise ValueError(factor_kind)
    mask = None
    if padding or fully_padded_row:
        mask = torch.rand(batch, len_k, generator=g) > 0.3
        mask[:, 0] = True
        if fully_padded_row:
            mask[-1] = False
    to = dict(dtype=dtype, device=device)
    q, k, v = (t.to(**to) for t in (q, k, v))
    if factors is not None:
        factors = factors.to(device)
    if mask is not None:
        mask = mask.to(device)
    return q, k, v, factors, mask


def reference_pair(q, k, v, factors, mask, *, causal=False, mode="paper", scale=None):
    """(float64 reference, plain PyTorch at q's precision) for the given inputs."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    f64 = None if factors is None else factors.double()
    call64 = check_call(q64, k64, v64, f64, causal, scale, mode, mask)
    exact = reference_attention(q64, k64, v64, f64, mask, call64)
    call = check_call(q, k, v, factors, causal, scale, mode, mask)
    plain = reference_attention(q, k, v, factors, mask, call, upcast=False)
    return exact, plain


def assert_close_to_reference(out, exact, plain, *, what: str = "backend"):
    """Assert ``out`` obeys both rules (module docstring); say where and how many if not.

    out: the backend's result; exact: the float64 reference; plain: plain PyTorch computing in
    out's dtype (:func:`reference_pair`). Shapes [B, Hq, Nq, D].
    """
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == plain.dtype, f"{what}: dtype {out.dtype} != {plain.dtype}"
    out64 = out.double().cpu()
    exact = exact.cpu()
    n_bad = int((~torch.isfinite(out64)).sum())
    assert n_bad == 0, f"{what}: {n_bad} non-finite outputs (NaN/inf) of {out.numel()}"
    err = (out64 - exact).abs()
    plain_err = (plain.double().cpu() - exact).abs().max().item()
    _check_bound(err, out64, exact, 2 * plain_err + ERROR_FLOOR[out.dtype],
                 f"{what}: max error {{err:.3e}} > bound {{bound:.3e}} (2 x plain "
                 f"{plain_err:.3e} + floor)")  # fmt: skip
    if out.dtype in HALF_DTYPES:
        assert_fp32_accumulation(out, exact, what=what)


def assert_fp32_accumulation(out, exact, *, what: str = "backend"):
    """The fp32-accumulation rule alone (float16 / bfloat16 ``out``; ``exact`` float64)."""
    assert out.dtype in HALF_DTYPES, f"{what}: the fp32-accumulation rule is for half dtypes"
    out64 = out.double().cpu()
    exact = exact.cpu()
    err = (out64 - exact).abs()
    rounding = (exact.to(out.dtype).double() - exact).abs().max().item()
    floor = FP32_ACCUMULATION_FLOOR * torch.finfo(out.dtype).eps * exact.abs().max().item()
    bound = FP32_ACCUMULATION_FACTOR * rounding + floor
    _check_bound(err, out64, exact, bound,
                 f"{what}: max error {{err:.3e}} > bound {{bound:.3e}} of fp32 accumulation "
                 f"({FP32_ACCUMULATION_FACTOR:g} x {rounding:.3e}, the error of the exact "
                 f"result rounded to {out.dtype}, + floor {floor:.1e})")  # fmt: skip


def _check_bound(err, out64, exact, bound: float, message: str) -> None:
    """Raise AssertionError(message, then where) if any element of ``err`` exceeds ``bound``."""
    if err.max().item() > bound:
        bad = err > bound
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            message.format(err=err.max().item(), bound=bound)
            + f"; {int(bad.sum())} of {err.numel()} elements off, first at {first}: got "
            f"{out64[first].item():.6g}, expected {exact[first].item():.6g}"
        )
