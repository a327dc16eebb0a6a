"""The C++ CPU backend against the float64 reference, its op registration, and its fallbacks.

Accuracy rule (tests/_tolerance.py): the kernel's max error against the float64 reference is
at most 2x the error of plain PyTorch computing in the same dtype, plus a small floor. Every run
writes into an output poisoned with NaN, so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from _tolerance import assert_close_to_reference, make_inputs, reference_pair
from hypothesis import given, settings
from hypothesis import strategies as st

from atman_kernels import BackendUnavailable, suppressed_attention
from atman_kernels.ops import choose_backend, cpp_backend
from atman_kernels.ops._checks import check_call

pytestmark = pytest.mark.skipif(
    cpp_backend.extension_error() is not None,
    reason=f"C++ extension not built: {cpp_backend.extension_error()}",
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def run_poisoned(q, k, v, factors, mask, *, causal=False, mode="paper", scale=None):
    """The kernel's output, written into a NaN-filled tensor."""
    call = check_call(q, k, v, factors, causal, scale, mode, mask)
    out = torch.full(
        (call.batch, call.heads_q, call.len_q, call.head_dim), float("nan"), dtype=q.dtype
    )
    result = cpp_backend.run(q, k, v, factors, mask, call, out=out)
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
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, mode, dtype):
    b, hq, hkv, nq, nk, d, opts = CASES[case]
    opts = dict(opts)
    causal = opts.pop("causal")
    q, k, v, factors, mask = make_inputs(b, hq, hkv, nq, nk, d, dtype=dtype, seed=7, **opts)
    check_case(q, k, v, factors, mask, causal=causal, mode=mode, what=f"cpp {case} {mode}")


def test_long_keys_use_smaller_row_blocks():
    # Nk = 8200: the per-thread score buffer caps the row block at 16 rows (70 = 4 x 16 + 6).
    q, k, v, factors, mask = make_inputs(1, 2, 1, 70, 8200, 32, padding=True, seed=3)
    check_case(q, k, v, factors, mask, causal=True, mode="paper")
    check_case(q, k, v, factors, mask, causal=False, mode="log")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_plain_loop_gemm_fallback(dtype, monkeypatch):
    # The GEMM used where the torch build exports no BLAS; forced through the env switch.
    monkeypatch.setenv("ATMAN_CPP_DISABLE_BLAS", "1")
    q, k, v, factors, mask = make_inputs(2, 4, 2, 37, 53, 40, dtype=dtype, padding=True, seed=5)
    for mode in ("paper", "log"):
        check_case(q, k, v, factors, mask, causal=True, mode=mode)


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
def test_reruns_are_bit_identical_for_any_thread_count(shared):
    # shared q/k/v: the variants of a work item reuse one QK^T, and how many share it depends
    # on the thread count; the result must not
    q, k, v, factors, mask = make_inputs(
        12, 6, 2, 150, 150, 64, padding=True, shared_qkv=shared, seed=9
    )
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads in (threads, threads, 1, 3):
            torch.set_num_threads(n_threads)
            runs.append(run_poisoned(q, k, v, factors, mask, causal=True, mode="paper"))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0], other)


def test_shared_qkv_equals_per_variant_copies():
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
    len_k=st.integers(1, 90),
    head_dim=st.sampled_from([8, 16, 24, 40, 64]),
    causal=st.booleans(),
    mode=st.sampled_from(["paper", "log"]),
    factor_kind=st.sampled_from(["none", "random", "zero_and_big", "single"]),
    padding=st.booleans(),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_factors_modes(
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
