"""The C++ CPU backend against the float64 reference, its op registration, and its fallbacks.

Accuracy rules (tests/_tolerance.py): the kernel's max error against the float64 reference is
at most 2x the error of plain PyTorch computing in the same dtype, plus a small floor; for fp16
and bf16 also at most 2x the error of the exact result rounded to that dtype (fp32 math). Every run
writes into an output poisoned with NaN, so an element the kernel forgets to write fails.

The kernel is compiled once per instruction-set level ("default", "avx2", "avx512"): the
correctness tests run on every level this CPU supports (the ``isa`` fixture forces each in
turn), and subprocess tests check that ``ATEN_CPU_CAPABILITY`` picks the level as ATen does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from _tolerance import assert_close_to_reference, make_inputs, reference_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from atman_kernels import BackendUnavailable, suppressed_attention
from atman_kernels.ops import choose_backend, cpp_backend
from atman_kernels.ops._checks import check_call
from atman_kernels.ops.reference import reference_attention

# without the extension: skipped with the reason, a failure under CI=true (tests/conftest.py)
pytestmark = pytest.mark.needs_cpp

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ISAS = cpp_backend.supported_isas() if cpp_backend.extension_error() is None else ("default",)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on one compiled instruction-set level (every level this CPU supports)."""
    before = cpp_backend._C._set_isa(request.param)
    assert cpp_backend.isa() == request.param
    yield request.param
    cpp_backend._C._set_isa("")
    assert cpp_backend.isa() == before


def run_poisoned(
    q, k, v, factors, mask, *, causal=False, mode="paper", scale=None, softcap=None, sinks=None
):
    """The kernel's output, written into a NaN-filled tensor."""
    call = check_call(q, k, v, factors, causal, scale, mode, mask, softcap=softcap, sinks=sinks)
    out = torch.full(
        (call.batch, call.heads_q, call.len_q, call.head_dim), float("nan"), dtype=q.dtype
    )
    result = cpp_backend.run(q, k, v, factors, mask, call, sinks=sinks, out=out)
    assert result is out
    return out


def check_case(q, k, v, factors, mask, *, causal, mode, scale=None, what="cpp"):
    out = run_poisoned(q, k, v, factors, mask, causal=causal, mode=mode, scale=scale)
    exact, plain = reference_pair(q, k, v, factors, mask, causal=causal, mode=mode, scale=scale)
    assert_close_to_reference(out, exact, plain, what=what)
    return out, exact


# (batch, heads_q, heads_kv, len_q, len_k, head_dim, options): odd lengths, odd head dims,
# GQA / MQA, causal with Nq < Nk and Nq = 1, padding, factor 0 and > 1, shared q/k/v.
CASES = {
    "tiny": (1, 1, 1, 1, 1, 16, dict(causal=False)),
    "odd7-gqa-d40": (2, 4, 2, 7, 7, 40, dict(causal=True)),
    "97-mqa-d80-pad": (2, 3, 1, 97, 97, 80, dict(causal=False, padding=True)),
    "257-causal-d64": (1, 2, 2, 257, 257, 64, dict(causal=True, factor_kind="zero_and_big")),
    "suffix-causal-d128": (2, 2, 1, 33, 97, 128, dict(causal=True, padding=True)),
    "decode-nq1": (3, 2, 2, 1, 97, 64, dict(causal=True)),
    "fully-padded-row": (3, 2, 1, 7, 40, 16, dict(causal=False, fully_padded_row=True)),
    "nq-gt-nk-causal": (2, 2, 2, 9, 5, 16, dict(causal=True)),
    "shared-qkv-many-variants": (
        24,
        3,
        1,
        65,
        65,
        64,
        dict(causal=True, shared_qkv=True, factor_kind="single"),
    ),
    "no-factors": (2, 2, 1, 70, 70, 40, dict(causal=True, factor_kind="none", padding=True)),
    # several key tiles (256 keys each), ragged last tile, padding, causal with Nq < Nk
    "tiles-suffix-pad-gqa": (2, 6, 2, 300, 601, 24, dict(causal=True, padding=True)),
    "tiles-zero-and-big": (1, 2, 1, 513, 513, 64, dict(causal=False, factor_kind="zero_and_big")),
}


# fp16 / bf16 run the fp32 kernel (converted before, rounded after, in level-independent code):
# every dtype on the best level, the two compute types on the others.
DTYPE_ISA = [(dtype, ISAS[-1]) for dtype in DTYPES] + [
    (dtype, level) for level in ISAS[:-1] for dtype in (torch.float64, torch.float32)
]


@pytest.mark.parametrize(("dtype", "level"), DTYPE_ISA, ids=lambda x: str(x).split(".")[-1])
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, mode, dtype, level):
    cpp_backend._C._set_isa(level)
    try:
        _reference_case(case, mode, dtype, level)
    finally:
        cpp_backend._C._set_isa("")


def _reference_case(case, mode, dtype, isa):
    b, hq, hkv, nq, nk, d, opts = CASES[case]
    opts = dict(opts)
    causal = opts.pop("causal")
    q, k, v, factors, mask = make_inputs(b, hq, hkv, nq, nk, d, dtype=dtype, seed=7, **opts)
    check_case(q, k, v, factors, mask, causal=causal, mode=mode, what=f"cpp {isa} {case} {mode}")


# Inputs where fp32 accumulation is visibly better than half-precision math (many keys).
LOW_PRECISION_PLANT_CASES = ["97-mqa-d80-pad", "tiles-suffix-pad-gqa", "tiles-zero-and-big"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("case", LOW_PRECISION_PLANT_CASES)
def test_check_rejects_a_kernel_computing_in_half_precision(case, mode, dtype, monkeypatch):
    """The comparison above, with the kernel replaced by one doing its math (scores, softmax,
    the sums over keys) in q's dtype: the fp32-accumulation rule must fail it (the message
    shows that the 2x plain-PyTorch rule, checked first, let it through); the fp32 reference
    and an emulation of a flash kernel's rounding (P in q's dtype) pass."""
    import _planted

    b, hq, hkv, nq, nk, d, opts = CASES[case]
    opts = dict(opts)
    causal = opts.pop("causal")
    q, k, v, factors, mask = make_inputs(b, hq, hkv, nq, nk, d, dtype=dtype, seed=7, **opts)
    for right in (_planted.correct, _planted.kernel_like):
        monkeypatch.setattr(cpp_backend, "run", right)
        check_case(q, k, v, factors, mask, causal=causal, mode=mode)
    monkeypatch.setattr(cpp_backend, "run", _planted.low_precision)
    with pytest.raises(AssertionError, match="of fp32 accumulation"):
        check_case(q, k, v, factors, mask, causal=causal, mode=mode)


def test_long_keys_use_smaller_row_blocks(isa):
    # Nk = 33000: paper mode's stored scores cap the row block at 16 rows (70 = 4 x 16 + 6);
    # log mode streams them in 64-row blocks. 129 key tiles, the last one ragged.
    q, k, v, factors, mask = make_inputs(1, 2, 1, 70, 33000, 32, padding=True, seed=3)
    check_case(q, k, v, factors, mask, causal=True, mode="paper")
    check_case(q, k, v, factors, mask, causal=False, mode="log")
    sinks = torch.tensor([0.5, -1.0])
    out = run_poisoned(q, k, v, factors, mask, causal=True, mode="paper", softcap=2.0, sinks=sinks)
    exact, plain = capped_reference_pair(q, k, v, factors, mask, causal=True, mode="paper",
                                         softcap=2.0, sinks=sinks)  # fmt: skip
    assert_close_to_reference(out, exact, plain, what=f"{isa} long keys, softcap and sinks")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_plain_loop_gemm_fallback(dtype, monkeypatch, isa):
    # The GEMM used where the torch build exports no BLAS; forced through the env switch.
    monkeypatch.setenv("ATMAN_CPP_DISABLE_BLAS", "1")
    q, k, v, factors, mask = make_inputs(2, 4, 2, 37, 53, 40, dtype=dtype, padding=True, seed=5)
    for mode in ("paper", "log"):
        check_case(q, k, v, factors, mask, causal=True, mode=mode)


@pytest.mark.parametrize("big_factor", [False, True], ids=["argmax-suppressed", "f-above-1"])
def test_paper_mode_extreme_suppressed_or_amplified_key(big_factor, isa):
    # For query row 30 of head 0 one key scores ~160 above the rest but is suppressed
    # (f = 0.01), or a low key has f = 50: the largest s' of the row is far from the largest s.
    # A softmax shifted by anything but the exact maximum of s' (e.g. an upper bound from the
    # raw scores) underflows every term of such a row, and the row comes out 0.
    q, k, v, _, _ = make_inputs(2, 2, 1, 40, 300, 16, factor_kind="none", seed=11)
    k[:, 0, 5] = q[:, 0, 30] * 40  # scale 1/4: q_30 . k_5 / 4 = 10 |q_30|^2, about 160
    factors = torch.ones(2, 300)
    if big_factor:
        factors[:, 7] = 50.0
        factors[:, 5] = 0.2
    else:
        factors[:, 5] = 0.01
    for mode in ("paper", "log"):
        check_case(q, k, v, factors, None, causal=True, mode=mode, what=f"{isa} {mode}")


def test_fully_padded_row_and_removed_keys_give_exact_zeros():
    q, k, v, factors, mask = make_inputs(3, 2, 1, 5, 12, 16, fully_padded_row=True, seed=1)
    out = run_poisoned(q, k, v, factors, mask, mode="paper")
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert out[:-1].abs().sum() > 0
    # log mode: every visible key of variant 0 removed (f = 0) -> zeros; variant 1 untouched
    factors = torch.ones(2, 12)
    factors[0] = 0
    q, k, v, _, _ = make_inputs(2, 2, 1, 5, 12, 16, factor_kind="none", seed=2)
    out = run_poisoned(q, k, v, factors, None, mode="log")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out[1]).all() and out[1].abs().sum() > 0


def test_paper_mode_factor_zero_keeps_the_key_at_the_row_minimum():
    # paper f = 0 differs from log f = 0 (removal): the key still gets the minimum's weight
    q, k, v, _, _ = make_inputs(1, 1, 1, 4, 9, 16, factor_kind="none", seed=4)
    factors = torch.ones(1, 9)
    factors[0, 3] = 0
    paper = run_poisoned(q, k, v, factors, None, mode="paper")
    log = run_poisoned(q, k, v, factors, None, mode="log")
    assert not torch.allclose(paper, log)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_expanded_inputs_match_contiguous(dtype):
    g = torch.Generator().manual_seed(0)
    # [B, N, H, D] memory viewed as [B, H, N, D]; q shared through an expanded batch (stride 0)
    q = torch.randn(1, 31, 4, 40, generator=g).to(dtype).transpose(1, 2).expand(3, 4, 31, 40)
    k = torch.randn(3, 45, 2, 40, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(3, 2, 40, 45, generator=g).to(dtype).transpose(2, 3)  # D not unit-stride
    factors = torch.rand(3, 45, generator=g) * 2
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for mode in ("paper", "log"):
        strided = run_poisoned(q, k, v, factors, None, causal=True, mode=mode)
        contiguous = run_poisoned(
            q.contiguous(), k.contiguous(), v.contiguous(), factors, None, causal=True, mode=mode
        )
        torch.testing.assert_close(strided, contiguous, rtol=tol, atol=tol)


@pytest.mark.parametrize("shared", [False, True], ids=["per-variant-qkv", "shared-qkv"])
def test_reruns_are_bit_identical_for_any_thread_count(shared, isa):
    # shared q/k/v: the variants of a work item reuse one QK^T, and how many share it depends
    # on the thread count; the result must not
    q, k, v, factors, mask = make_inputs(
        12, 6, 2, 150, 150, 64, padding=True, shared_qkv=shared, seed=9
    )
    threads = torch.get_num_threads()
    sinks = torch.linspace(-1, 1, 6)
    try:
        runs = []
        for n_threads in (threads, threads, 1, 3):
            torch.set_num_threads(n_threads)
            runs.append([
                run_poisoned(q, k, v, factors, mask, causal=True, mode="paper"),
                run_poisoned(q, k, v, factors, mask, causal=True, mode="log", softcap=3.0,
                             sinks=sinks),
            ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_shared_qkv_equals_per_variant_copies(isa):
    q, k, v, factors, mask = make_inputs(9, 4, 2, 70, 90, 40, padding=True, shared_qkv=True)
    for mode in ("paper", "log"):
        shared = run_poisoned(q, k, v, factors, mask, causal=True, mode=mode)
        copies = run_poisoned(
            *(t.expand(9, -1, -1, -1).contiguous() for t in (q, k, v)),
            factors,
            mask,
            causal=True,
            mode=mode,
        )
        torch.testing.assert_close(shared, copies, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Soft-capping and sinks in the kernel (semantics: atman_kernels/ops/reference.py)


def capped_reference_pair(q, k, v, factors, mask, *, causal, mode, softcap=None, sinks=None):
    """(float64 reference, plain PyTorch at q's precision) with soft-capping and sinks."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    f64 = None if factors is None else factors.double()
    z64 = None if sinks is None else sinks.double()
    call64 = check_call(q64, k64, v64, f64, causal, None, mode, mask, softcap=softcap, sinks=z64)
    exact = reference_attention(q64, k64, v64, f64, mask, call64, sinks=z64)
    call = check_call(q, k, v, factors, causal, None, mode, mask, softcap=softcap, sinks=sinks)
    plain = reference_attention(q, k, v, factors, mask, call, sinks=sinks, upcast=False)
    return exact, plain


# (batch, heads_q, heads_kv, len_q, len_k, head_dim, options): key tiles of 256 with a ragged
# last one, causal with Nq < Nk, GQA / MQA, padding, factors 0 and > 1, shared q/k/v (scores
# stored and shared by the variants in both modes), no factors.
CAPPED_CASES = {
    "tiles-suffix-pad-gqa": (2, 6, 2, 300, 601, 24, dict(causal=True, padding=True,
                                                          factor_kind="zero_and_big")),
    "odd-mqa-full": (3, 3, 1, 37, 53, 40, dict(causal=False, factor_kind="random")),
    "shared-qkv": (5, 4, 2, 70, 300, 32, dict(causal=True, shared_qkv=True, factor_kind="single",
                                              padding=True)),
    "no-factors": (2, 2, 1, 70, 270, 16, dict(causal=True, factor_kind="none")),
}  # fmt: skip


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize(
    "softcap,with_sinks,dtype",
    [(0.3, False, torch.float32), (50.0, True, torch.float32), (1.5, True, torch.float32),
     (1.5, True, torch.float64)],
    ids=["cap", "cap50-sinks", "cap-sinks", "cap-sinks-fp64"],
)  # fmt: skip
@pytest.mark.parametrize("case", list(CAPPED_CASES))
def test_softcap_and_sinks_match_the_reference(case, softcap, with_sinks, dtype, mode, isa):
    # caps 0.3 / 1.5 / 50 against scores of about N(0, 1): the fp32 tanh's large- and
    # small-argument branches both run (fp64 uses the C library's tanh)
    b, hq, hkv, nq, nk, d, opts = CAPPED_CASES[case]
    opts = dict(opts)
    causal = opts.pop("causal")
    q, k, v, factors, mask = make_inputs(b, hq, hkv, nq, nk, d, dtype=dtype, seed=13, **opts)
    g = torch.Generator().manual_seed(hq)
    sinks = torch.randn(hq, generator=g) * 2 if with_sinks else None
    out = run_poisoned(q, k, v, factors, mask, causal=causal, mode=mode, softcap=softcap,
                       sinks=sinks)  # fmt: skip
    exact, plain = capped_reference_pair(q, k, v, factors, mask, causal=causal, mode=mode,
                                         softcap=softcap, sinks=sinks)  # fmt: skip
    assert_close_to_reference(out, exact, plain, what=f"cpp {isa} {case} {mode} cap {softcap}")
    # the cap and the sinks changed the result
    bare, _ = capped_reference_pair(q, k, v, factors, mask, causal=causal, mode=mode)
    assert float((exact - bare).abs().max()) > 1e-3


def test_sinks_with_empty_rows_and_extreme_sinks(isa):
    q, k, v, factors, mask = make_inputs(3, 2, 1, 7, 40, 16, fully_padded_row=True, seed=1)
    for mode in ("paper", "log"):
        # a variant whose keys are all padded gives exact zeros, sinks or not
        out = run_poisoned(q, k, v, factors, mask, mode=mode, sinks=torch.tensor([1.0, -2.0]))
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        assert bool(out[:-1].abs().amax(-1).gt(0).all())
        # a sink far below every score takes no weight (the same operations as no sink), one
        # far above takes all of it
        plain = run_poisoned(q, k, v, factors, mask, causal=True, mode=mode)
        low = run_poisoned(q, k, v, factors, mask, causal=True, mode=mode,
                           sinks=torch.full((2,), -1e4))  # fmt: skip
        assert torch.equal(low, plain)
        high = run_poisoned(q, k, v, factors, mask, causal=True, mode=mode,
                            sinks=torch.full((2,), 1e4))  # fmt: skip
        assert bool(torch.isfinite(high).all()) and float(high.abs().max()) == 0.0


def test_sinks_must_match_the_call():
    q, k, v, factors, _ = make_inputs(1, 2, 1, 4, 6, 16)
    call = check_call(q, k, v, factors, False, None, "paper", None, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="sinks must be given exactly when"):
        cpp_backend.run(q, k, v, factors, None, call)
    op = torch.ops.atman_kernels.suppressed_attention
    with pytest.raises(RuntimeError, match=r"sinks must have shape \[2\]"):
        op(q, k, v, factors, None, False, 0.25, "paper", sinks=torch.zeros(3))
    with pytest.raises(RuntimeError, match="sinks must be finite"):
        op(q, k, v, factors, None, False, 0.25, "paper", sinks=torch.tensor([0.0, float("nan")]))
    with pytest.raises(RuntimeError, match="softcap must be finite and > 0"):
        op(q, k, v, factors, None, False, 0.25, "paper", softcap=0.0)


def test_public_api_dispatches_to_cpp():
    q, k, v, factors, mask = make_inputs(2, 2, 1, 9, 9, 16, padding=True)
    call = check_call(q, k, v, factors, True, None, "paper", mask)
    assert choose_backend(q, call) == ("cpp", None)
    out = suppressed_attention(q, k, v, factors, causal=True, key_padding_mask=mask, backend="cpp")
    auto = suppressed_attention(q, k, v, factors, causal=True, key_padding_mask=mask)
    assert torch.equal(out, auto)


def test_missing_extension_falls_back_with_reason(monkeypatch):
    monkeypatch.setattr(cpp_backend, "_IMPORT_ERROR", "the C++ extension is not built (test)")
    monkeypatch.setattr(cpp_backend, "_warned", False)
    q, k, v, factors, _ = make_inputs(1, 1, 1, 3, 3, 16)
    call = check_call(q, k, v, factors, False, None, "paper", None)
    with pytest.warns(UserWarning, match="not built"):
        name, reason = choose_backend(q, call)
    assert name == "reference" and "not built" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        with pytest.raises(BackendUnavailable, match="not built"):
            suppressed_attention(q, k, v, factors, backend="cpp")


def test_op_rejects_bad_arguments_by_name():
    q, k, v, factors, mask = make_inputs(2, 2, 1, 4, 6, 16)
    op = torch.ops.atman_kernels.suppressed_attention
    with pytest.raises(RuntimeError, match="mode must be 'paper' or 'log'"):
        op(q, k, v, factors, mask, False, 0.25, "sum")
    with pytest.raises(RuntimeError, match="factors must have shape"):
        op(q, k, v, factors[:, :5], mask, False, 0.25, "paper")
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        op(q, k, v, factors, torch.ones(2, 6), False, 0.25, "paper")
    with pytest.raises(RuntimeError, match="multiple of k's head count"):
        op(
            q,
            k[:, :1].expand(2, 3, 6, 16),
            v[:, :1].expand(2, 3, 6, 16),
            factors,
            None,
            False,
            0.25,
            "paper",
        )
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU tensor"):
        torch.ops.atman_kernels.suppressed_attention_out(
            q, k, v, factors, None, False, 0.25, "paper", torch.empty(2, 2, 4, 15)
        )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    len_q=st.integers(1, 40),
    len_k=st.integers(1, 600),
    head_dim=st.sampled_from([8, 16, 24, 40, 64]),
    causal=st.booleans(),
    mode=st.sampled_from(["paper", "log"]),
    factor_kind=st.sampled_from(["none", "random", "zero_and_big", "single"]),
    padding=st.booleans(),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
    level=st.sampled_from(ISAS),
)
def test_hypothesis_shapes_factors_modes(
    batch, group, len_q, len_k, head_dim, causal, mode, factor_kind, padding, shared, seed, level
):
    cpp_backend._C._set_isa(level)
    try:
        _hypothesis_case(
            batch, group, len_q, len_k, head_dim, causal, mode, factor_kind, padding, shared, seed
        )
    finally:
        cpp_backend._C._set_isa("")


def _hypothesis_case(
    batch, group, len_q, len_k, head_dim, causal, mode, factor_kind, padding, shared, seed
):
    hq, hkv = group
    if factor_kind == "none":
        shared = False  # without factors the batch is q's: shared q/k/v means one variant
    q, k, v, factors, mask = make_inputs(
        batch,
        hq,
        hkv,
        len_q,
        len_k,
        head_dim,
        factor_kind=factor_kind,
        padding=padding,
        shared_qkv=shared,
        seed=seed,
    )
    check_case(q, k, v, factors, mask, causal=causal, mode=mode)


def test_opcheck_both_ops():
    q, k, v, factors, mask = make_inputs(2, 4, 2, 9, 13, 16, padding=True)
    scale = 0.3
    for args in (
        (q, k, v, factors, mask, True, scale, "paper"),
        (q, k, v, factors, None, False, scale, "log"),
        (q, k, v, None, None, True, scale, "paper"),
    ):
        torch.library.opcheck(torch.ops.atman_kernels.suppressed_attention, args)
        out = torch.empty(2, 4, 9, 16)
        torch.library.opcheck(torch.ops.atman_kernels.suppressed_attention_out, (*args, out))
    extra = dict(softcap=2.0, sinks=torch.linspace(-1, 1, 4))
    args = (q, k, v, factors, mask, True, scale, "log")
    torch.library.opcheck(torch.ops.atman_kernels.suppressed_attention, args, extra)
    out = torch.empty(2, 4, 9, 16)
    torch.library.opcheck(torch.ops.atman_kernels.suppressed_attention_out, (*args, out), extra)


@pytest.mark.skipif(
    os.environ.get("ATMAN_SKIP_COMPILE_TESTS") == "1", reason="ATMAN_SKIP_COMPILE_TESTS=1"
)
def test_torch_compile_fullgraph():
    q, k, v, factors, mask = make_inputs(2, 2, 1, 8, 8, 16, padding=True)

    def block(q, k, v, factors, mask):
        out = torch.ops.atman_kernels.suppressed_attention(
            q * 2, k, v, factors, mask, True, 0.25, "paper"
        )
        return out.sum(dim=-1)

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k, v, factors, mask), block(q, k, v, factors, mask))


# ---------------------------------------------------------------------------------------------
# Which instruction-set level runs (csrc/cpu_isa.h)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root with ``env`` added."""
    base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY",)}
    base.pop("ATMAN_CPU_ISA_LIMIT", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


REPORT_ISA = """
    import torch
    from atman_kernels.ops import cpp_backend
    print(cpp_backend.isa(), torch.backends.cpu.get_cpu_capability().lower())
"""


def test_isa_is_one_this_cpu_supports():
    assert cpp_backend.isa() in cpp_backend.supported_isas()
    assert cpp_backend.supported_isas()[0] == "default"
    if "ATEN_CPU_CAPABILITY" not in os.environ:
        assert cpp_backend.isa() == cpp_backend.supported_isas()[-1]
    with pytest.raises(ValueError, match="isa must be"):
        cpp_backend._C._set_isa("sse9")


@pytest.mark.parametrize("asked", ["default", "avx2", "avx512"])
def test_aten_cpu_capability_picks_the_level_as_aten_does(asked):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 host must run the avx2 kernel, and ATen's own
    # kernels (SDPA) must agree; a level the CPU lacks falls back to the best it has.
    best = ISAS[-1]
    expected = asked if asked in ISAS else best
    mine, aten = _run_python(REPORT_ISA, ATEN_CPU_CAPABILITY=asked).stdout.split()
    assert mine == expected
    if asked in ISAS:
        assert aten == asked


def test_aten_cpu_capability_unset_takes_the_best_level():
    mine, aten = _run_python(REPORT_ISA).stdout.split()
    assert mine == ISAS[-1]
    assert mine == aten or aten not in cpp_backend.ISA_LEVELS


def test_invalid_aten_cpu_capability_is_ignored_with_a_warning():
    proc = _run_python(REPORT_ISA, ATEN_CPU_CAPABILITY="avx9000")
    assert proc.stdout.split()[0] == ISAS[-1]
    assert "ignoring invalid value for ATEN_CPU_CAPABILITY: avx9000" in proc.stderr


@pytest.mark.skipif(ISAS[-1] == "default", reason="this CPU or build has only the default level")
def test_level_above_the_cpu_falls_back_instead_of_crashing():
    # ATMAN_CPU_ISA_LIMIT makes this host look like one without AVX-512 (or AVX2): asking for
    # avx512 must then run the best level left, warn, and compute the right numbers.
    limit = "avx2" if ISAS[-1] == "avx512" else "default"
    code = """
    import sys, torch
    sys.path.insert(0, "tests")
    from _tolerance import assert_close_to_reference, make_inputs, reference_pair
    from atman_kernels.ops import cpp_backend
    from atman_kernels.ops._checks import check_call
    q, k, v, f, m = make_inputs(2, 4, 2, 70, 300, 24, padding=True, seed=2)
    for mode in ("paper", "log"):
        call = check_call(q, k, v, f, True, None, mode, m)
        out = cpp_backend.run(q, k, v, f, m, call)
        exact, plain = reference_pair(q, k, v, f, m, causal=True, mode=mode)
        assert_close_to_reference(out, exact, plain, what=mode)
    try:
        cpp_backend._C._set_isa("avx512")
    except ValueError as e:
        print("refused", e, file=sys.stderr)
    print(cpp_backend.isa(), cpp_backend.supported_isas()[-1])
    """
    proc = _run_python(code, ATEN_CPU_CAPABILITY="avx512", ATMAN_CPU_ISA_LIMIT=limit)
    assert proc.stdout.split() == [limit, limit]
    assert f"asks for more than this CPU (or build) supports; using {limit}" in proc.stderr
    assert "refused" in proc.stderr and "is not supported here" in proc.stderr


@pytest.mark.skipif("avx2" not in ISAS, reason="this CPU or build has no avx2 level")
def test_suite_case_under_aten_cpu_capability_avx2():
    # The avx2 path chosen through the environment, as on an AVX2-only host, against the
    # reference: GQA, causal with Nq < Nk, padding, factors 0 and > 1, both modes, fp32 + bf16.
    code = """
    import sys, torch
    sys.path.insert(0, "tests")
    from _tolerance import assert_close_to_reference, make_inputs, reference_pair
    from atman_kernels.ops import cpp_backend
    from atman_kernels.ops._checks import check_call
    assert cpp_backend.isa() == "avx2", cpp_backend.isa()
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, f, m = make_inputs(3, 6, 2, 97, 333, 40, dtype=dtype, padding=True,
                                    factor_kind="zero_and_big", seed=5)
        for mode in ("paper", "log"):
            call = check_call(q, k, v, f, True, None, mode, m)
            out = cpp_backend.run(q, k, v, f, m, call)
            exact, plain = reference_pair(q, k, v, f, m, causal=True, mode=mode)
            assert_close_to_reference(out, exact, plain, what=f"{dtype} {mode}")
    print("ok", cpp_backend.isa())
    """
    assert _run_python(code, ATEN_CPU_CAPABILITY="avx2").stdout.split() == ["ok", "avx2"]
