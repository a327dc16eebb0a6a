"""Shared accuracy rule and input factories for the backend tests.

The rule (flash-attention's): a backend's max error against the float64 reference is at most
twice the error of plain PyTorch computing in the same low precision, plus a small floor.
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
    """Assert ``out`` obeys the 2x-plain-error rule; print where and how many if not."""
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert out.dtype == plain.dtype, f"{what}: dtype {out.dtype} != {plain.dtype}"
    out64 = out.double().cpu()
    exact = exact.cpu()
    n_bad = int((~torch.isfinite(out64)).sum())
    assert n_bad == 0, f"{what}: {n_bad} non-finite outputs (NaN/inf) of {out.numel()}"
    err = (out64 - exact).abs()
    plain_err = (plain.double().cpu() - exact).abs().max().item()
    bound = 2 * plain_err + ERROR_FLOOR[out.dtype]
    if err.max().item() > bound:
        bad = err > bound
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: max error {err.max().item():.3e} > bound {bound:.3e} "
            f"(2 x plain {plain_err:.3e} + floor); {int(bad.sum())} of {err.numel()} elements "
            f"off, first at {first}: got {out64[first].item():.6g}, "
            f"expected {exact[first].item():.6g}"
        )
