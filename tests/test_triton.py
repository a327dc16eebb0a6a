"""The Triton kernel against the float64 reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors. The interpreter is chosen
when triton is first imported, so ``TRITON_INTERPRET=1`` is set here before anything imports
atman_kernels or triton (``conftest.py`` sets it too, without importing triton); with CUDA the
variable is left alone and the same tests run the compiled kernel. The interpreter is slow:
head counts stay small and only the cases that need a long sequence get one.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from _tolerance import assert_close_to_reference, make_inputs, reference_pair  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from atman_kernels import suppressed_attention  # noqa: E402
from atman_kernels.ops import triton_backend  # noqa: E402
from atman_kernels.ops._checks import check_call  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
BF16_SKIP = pytest.mark.skipif(
    INTERPRETED,
    reason="bfloat16 gives garbage in Triton's CPU interpreter (docs/settings.md, backends); "
    "checked on CUDA and by the ahead-of-time compile in test_triton_aot.py",
)
# log mode computes log2(0) = -inf on purpose (f = 0 removes a key); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")


def run_triton(q, k, v, factors, mask, *, causal=False, mode="paper", scale=None):
    """Run the kernel into a NaN-poisoned output, so an element it skips fails the test."""
    call = check_call(q, k, v, factors, causal, scale, mode, mask)
    reason = triton_backend.unsupported_reason(q, call)
    assert reason is None, f"the Triton backend should take this call, but: {reason}"
    out = torch.full(
        (call.batch, call.heads_q, call.len_q, call.head_dim),
        float("nan"),
        dtype=q.dtype,
        device=q.device,
    )
    result = triton_backend.run(q, k, v, factors, mask, call, out=out)
    assert result.data_ptr() == out.data_ptr()
    return result


# (id, make_inputs kwargs, causal). Batch, heads, lengths, head dim are make_inputs' first six.
CASES = [
    ("len1", dict(args=(2, 2, 2, 1, 1, 16)), False),
    ("len7_d40", dict(args=(2, 2, 2, 7, 7, 40)), False),
    ("len97_d80_gqa", dict(args=(2, 4, 2, 97, 97, 80)), False),
    ("len257_d16_causal", dict(args=(1, 1, 1, 257, 257, 16)), True),
    ("d64_mqa_causal_short_q", dict(args=(2, 3, 1, 7, 97, 64)), True),
    ("d128_q1_causal", dict(args=(3, 2, 1, 1, 33, 128)), True),
    ("q_longer_than_k_causal", dict(args=(2, 1, 1, 9, 5, 16)), True),
    ("padding_full_row", dict(args=(3, 2, 2, 20, 70, 32), fully_padded_row=True), False),
    (
        "padding_causal_zero_big",
        dict(args=(3, 2, 1, 30, 66, 16), padding=True, factor_kind="zero_and_big"),
        True,
    ),
    ("shared_qkv_16_variants", dict(args=(16, 2, 1, 24, 24, 64), shared_qkv=True), True),
    ("single_token", dict(args=(6, 2, 2, 12, 12, 16), factor_kind="single"), True),
    ("no_factors", dict(args=(2, 2, 1, 40, 70, 40), factor_kind="none", padding=True), True),
]
# bfloat16 joins where the kernel is compiled (CUDA); under the interpreter one test says why not.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


def yardstick(q, k, v, factors, mask, **kwargs):
    """(float64 reference, plain PyTorch at the kernel's precision). On CUDA the kernel feeds
    fp32 operands to TF32 tensor cores, so plain PyTorch is measured with TF32 matmuls too."""
    if q.is_cuda and q.dtype == torch.float32:
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return reference_pair(q, k, v, factors, mask, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return reference_pair(q, k, v, factors, mask, **kwargs)


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,inputs,causal", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(name, inputs, causal, dtype, mode):
    inputs = dict(inputs)
    args = inputs.pop("args")
    q, k, v, factors, mask = make_inputs(*args, dtype=dtype, device=DEVICE, seed=7, **inputs)
    out = run_triton(q, k, v, factors, mask, causal=causal, mode=mode)
    exact, plain = yardstick(q, k, v, factors, mask, causal=causal, mode=mode)
    assert_close_to_reference(out, exact, plain, what=f"triton {name} {dtype} {mode}")


@BF16_SKIP
def test_bfloat16_matches_float64_reference():
    q, k, v, factors, mask = make_inputs(
        3, 4, 2, 97, 130, 80, dtype=torch.bfloat16, device=DEVICE, padding=True
    )
    for mode in ("paper", "log"):
        out = run_triton(q, k, v, factors, mask, causal=True, mode=mode)
        exact, plain = yardstick(q, k, v, factors, mask, causal=True, mode=mode)
        assert_close_to_reference(out, exact, plain, what=f"triton bfloat16 {mode}")


@pytest.mark.parametrize("mode", ["paper", "log"])
def test_fully_padded_row_gives_zeros(mode):
    q, k, v, factors, mask = make_inputs(3, 2, 2, 9, 40, 16, device=DEVICE, fully_padded_row=True)
    assert not bool(mask[-1].any())
    out = run_triton(q, k, v, factors, mask, mode=mode)
    assert bool(torch.isfinite(out).all())
    assert bool((out[-1] == 0).all()), "a variant with every key padded must give zeros"
    assert bool(out[:-1].abs().amax(dim=-1).gt(0).all()), "other variants must not be zeros"


def test_log_mode_row_with_only_removed_keys_gives_zeros():
    # Causal, Nq = Nk: row 0 sees key 0 only; f = 0 removes it in log mode.
    q, k, v, _, _ = make_inputs(2, 2, 1, 17, 17, 16, device=DEVICE)
    factors = torch.ones(2, 17, device=DEVICE)
    factors[:, 0] = 0.0
    out = run_triton(q, k, v, factors, None, causal=True, mode="log")
    assert bool(torch.isfinite(out).all())
    assert bool((out[:, :, 0] == 0).all())
    exact, plain = yardstick(q, k, v, factors, None, causal=True, mode="log")
    assert_close_to_reference(out, exact, plain, what="log mode, removed keys")


def test_paper_mode_factor_zero_keeps_key_at_row_minimum():
    # Paper mode does not remove a key: with every factor 0 all scores equal the row minimum,
    # so the output is the plain mean of the visible values.
    q, k, v, _, _ = make_inputs(1, 1, 1, 5, 11, 16, device=DEVICE)
    factors = torch.zeros(1, 11, device=DEVICE)
    out = run_triton(q, k, v, factors, None, causal=True, mode="paper")
    for i in range(5):
        expected = v[0, 0, : 11 - 5 + i + 1].double().mean(dim=0)
        torch.testing.assert_close(out[0, 0, i].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "log"])
def test_unit_factors_equal_plain_attention(mode):
    q, k, v, _, mask = make_inputs(2, 2, 2, 13, 29, 32, device=DEVICE, padding=True)
    ones = torch.ones(2, 29, device=DEVICE)
    with_ones = run_triton(q, k, v, ones, mask, causal=True, mode=mode)
    plain = run_triton(q, k, v, None, mask, causal=True, mode=mode)
    torch.testing.assert_close(with_ones, plain, rtol=1e-5, atol=1e-6)


def test_strided_views_read_without_mistakes():
    # [B, N, H, D] memory seen as [B, H, N, D]; a k whose head dim is not unit-stride.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 19, 3, 40, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 1, 40, 23, generator=g).to(DEVICE).transpose(2, 3)
    v = torch.randn(2, 23, 1, 40, generator=g).to(DEVICE).transpose(1, 2)
    factors = (torch.rand(2, 23, generator=g) * 2).to(DEVICE)
    assert q.stride(-1) == 1 and k.stride(-1) != 1
    out = run_triton(q, k, v, factors, None, causal=True)
    exact, plain = yardstick(q, k, v, factors, None, causal=True)
    assert_close_to_reference(out, exact, plain, what="strided views")


def test_two_runs_are_bit_identical():
    q, k, v, factors, mask = make_inputs(4, 2, 1, 70, 70, 64, device=DEVICE, padding=True)
    first = run_triton(q, k, v, factors, mask, causal=True)
    second = run_triton(q, k, v, factors, mask, causal=True)
    assert torch.equal(first, second)


def test_public_op_runs_the_triton_backend():
    q, k, v, factors, _ = make_inputs(2, 2, 1, 9, 9, 16, device=DEVICE)
    out = suppressed_attention(q, k, v, factors, causal=True, backend="triton")
    exact, plain = yardstick(q, k, v, factors, None, causal=True)
    assert_close_to_reference(out, exact, plain, what="suppressed_attention(backend='triton')")


def test_unsupported_reasons():
    q, k, v, _, _ = make_inputs(1, 1, 1, 4, 4, 16, dtype=torch.float64, device=DEVICE)
    call = check_call(q, k, v, None, False, None, "paper", None)
    assert "float64" in triton_backend.unsupported_reason(q, call)
    q, k, v, _, _ = make_inputs(1, 1, 1, 4, 4, 320, device=DEVICE)
    call = check_call(q, k, v, None, False, None, "paper", None)
    assert triton_backend.unsupported_reason(q, call) == "head_dim 320 > 256"


def test_out_argument_is_checked():
    q, k, v, factors, _ = make_inputs(2, 1, 1, 4, 4, 16, device=DEVICE)
    call = check_call(q, k, v, factors, False, None, "paper", None)
    wrong = torch.empty(2, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        triton_backend.run(q, k, v, factors, None, call, out=wrong)


def test_cpu_without_interpreter_is_refused_and_import_stays_lazy():
    """In a fresh process without TRITON_INTERPRET: importing the package does not import
    triton, and CPU tensors get a reason instead of a crash."""
    code = (
        "import sys, torch\n"
        "import atman_kernels\n"
        "from atman_kernels.ops import triton_backend\n"
        "from atman_kernels.ops._checks import check_call\n"
        "assert 'triton' not in sys.modules, 'importing atman_kernels imported triton'\n"
        "q = torch.zeros(1, 1, 2, 16)\n"
        "call = check_call(q, q, q, None, False, None, 'paper', None)\n"
        "print(triton_backend.unsupported_reason(q, call))\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "needs CUDA tensors or TRITON_INTERPRET=1" in done.stdout


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    len_q=st.integers(1, 40),
    len_k=st.integers(1, 70),
    head_dim=st.sampled_from([16, 24, 40, 64]),
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
    if factor_kind == "none":
        shared = False  # without factors the batch is q's: shared q/k/v means one variant
    q, k, v, factors, mask = make_inputs(
        batch, *group, len_q, len_k, head_dim, factor_kind=factor_kind, padding=padding,
        shared_qkv=shared, seed=seed, device=DEVICE,
    )
    out = run_triton(q, k, v, factors, mask, causal=causal, mode=mode)
    exact, plain = yardstick(q, k, v, factors, mask, causal=causal, mode=mode)
    assert_close_to_reference(out, exact, plain, what="triton")


# ---------------------------------------------------------------- the kernel's code paths
# Under the interpreter the sm_80 table applies: 64-key tiles for these head dims, so lengths
# around 64 and 128 put whole tiles (stage 1, no masks) and diagonal / ragged tiles (stage 2)
# in one call; Nq > Nk gives rows that see no key at all.
TILE_LENGTHS = [(64, 64), (65, 129), (128, 128), (1, 128), (63, 191), (130, 64), (70, 300)]


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("len_q,len_k", TILE_LENGTHS, ids=[f"q{a}_k{b}" for a, b in TILE_LENGTHS])
def test_whole_and_diagonal_tiles(len_q, len_k, causal, mode):
    q, k, v, factors, mask = make_inputs(
        2, 2, 1, len_q, len_k, 32, device=DEVICE, seed=len_q + len_k, factor_kind="zero_and_big",
        padding=len_k > 100,
    )
    out = run_triton(q, k, v, factors, mask, causal=causal, mode=mode)
    exact, plain = yardstick(q, k, v, factors, mask, causal=causal, mode=mode)
    assert_close_to_reference(out, exact, plain, what=f"triton q{len_q} k{len_k} {mode}")


def test_log_mode_whole_tile_of_removed_keys_first():
    """Every key of the first whole tile removed (f = 0): rows start stage 1 with max -inf."""
    q, k, v, _, _ = make_inputs(2, 2, 2, 150, 150, 16, device=DEVICE, seed=5)
    factors = torch.rand(2, 150, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    factors[:, :64] = 0.0
    out = run_triton(q, k, v, factors, None, causal=True, mode="log")
    exact, plain = yardstick(q, k, v, factors, None, causal=True, mode="log")
    assert_close_to_reference(out, exact, plain, what="log mode, first tile removed")
    assert bool((out[:, :, :64] == 0).all()), "rows that see only removed keys must be zeros"


# ---------------------------------------------------------------- soft-capping and sinks
# Both are constexpr paths of the kernels (no cost when off). Cases cover GQA / MQA, causal
# with Nq < Nk and Nq > Nk, padding (a fully padded variant too), factors 0 and > 1, no factors,
# an odd (padded) head dim, and lengths that give whole and diagonal tiles.
SOFTCAP_SINK_CASES = [
    ("d40_gqa_causal_short_q", dict(args=(2, 4, 2, 7, 13, 40), padding=True,
                                    factor_kind="zero_and_big"), True),
    ("d16_mqa_causal_whole_tiles", dict(args=(2, 2, 1, 33, 150, 16)), True),
    ("q_longer_than_k_causal", dict(args=(2, 2, 1, 9, 5, 16)), True),
    ("full_padding_row", dict(args=(3, 2, 2, 20, 70, 32), fully_padded_row=True), False),
    ("no_factors", dict(args=(2, 2, 1, 17, 70, 16), factor_kind="none", padding=True), True),
]  # fmt: skip
FEATURES = {"softcap": (1.5, False), "sinks": (None, True), "both": (2.0, True)}


def _sinks(heads: int) -> torch.Tensor:
    return (torch.randn(heads, generator=torch.Generator().manual_seed(3)) * 2).to(DEVICE)


def _capped_yardstick(q, k, v, factors, mask, *, causal, mode, softcap, sinks):
    """(float64 reference, plain PyTorch at q's precision) with soft-capping and sinks."""
    from atman_kernels.ops.reference import reference_attention

    q64, k64, v64 = (t.double() for t in (q, k, v))
    f64 = None if factors is None else factors.double()
    s64 = None if sinks is None else sinks.double()
    extra = dict(softcap=softcap, sinks=s64)
    call64 = check_call(q64, k64, v64, f64, causal, None, mode, mask, **extra)
    exact = reference_attention(q64, k64, v64, f64, mask, call64, sinks=s64)
    call = check_call(q, k, v, factors, causal, None, mode, mask, softcap=softcap, sinks=sinks)
    plain = reference_attention(q, k, v, factors, mask, call, sinks=sinks, upcast=False)
    return exact, plain


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name,inputs,causal", SOFTCAP_SINK_CASES,
                         ids=[c[0] for c in SOFTCAP_SINK_CASES])  # fmt: skip
def test_softcap_and_sinks_match_float64_reference(name, inputs, causal, feature, mode):
    inputs = dict(inputs)
    args = inputs.pop("args")
    dtypes = [torch.float32] + ([torch.float16] if feature == "both" else [])
    softcap, with_sinks = FEATURES[feature]
    for dtype in dtypes:
        q, k, v, factors, mask = make_inputs(*args, dtype=dtype, device=DEVICE, seed=7, **inputs)
        q = q * 2  # scores of a few units: a cap of 1.5..2 bites
        sinks = _sinks(q.shape[1]) if with_sinks else None
        call = check_call(q, k, v, factors, causal, None, mode, mask, softcap=softcap,
                          sinks=sinks)  # fmt: skip
        out = torch.full((call.batch, call.heads_q, call.len_q, call.head_dim), float("nan"),
                         dtype=dtype, device=DEVICE)  # fmt: skip
        triton_backend.run(q, k, v, factors, mask, call, sinks=sinks, out=out)
        exact, plain = _capped_yardstick(q, k, v, factors, mask, causal=causal, mode=mode,
                                         softcap=softcap, sinks=sinks)  # fmt: skip
        assert_close_to_reference(out, exact, plain, what=f"triton {name} {feature} {dtype}")
        # the feature changed the result: a kernel ignoring it would fail above
        without, _ = _capped_yardstick(q, k, v, factors, mask, causal=causal, mode=mode,
                                       softcap=None, sinks=None)  # fmt: skip
        assert float((exact - without).abs().max()) > 1e-3
        if inputs.get("fully_padded_row"):
            assert bool((out[-1] == 0).all()), "every key padded: zeros, sinks or not"


def test_public_op_passes_softcap_and_sinks_to_triton():
    q, k, v, factors, mask = make_inputs(2, 4, 2, 9, 9, 16, device=DEVICE, padding=True)
    sinks = _sinks(4)
    got = suppressed_attention(q, k, v, factors, causal=True, key_padding_mask=mask,
                               softcap=1.5, sinks=sinks, backend="triton")  # fmt: skip
    expected = suppressed_attention(q, k, v, factors, causal=True, key_padding_mask=mask,
                                    softcap=1.5, sinks=sinks, backend="reference")  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    call = check_call(q, k, v, factors, True, None, "paper", mask, softcap=1.5, sinks=sinks)
    with pytest.raises(ValueError, match="sinks must be given exactly when"):
        triton_backend.run(q, k, v, factors, mask, call)


def _variant_layouts(batch, q, k, v):
    """q/k/v of batch 1 seen three ways: batch 1, expanded to B (stride 0), copied to B."""
    expand = tuple(t.expand(batch, *t.shape[1:]) for t in (q, k, v))
    copied = tuple(t.contiguous() for t in expand)
    return {"batch1": (q, k, v), "expanded": expand, "copied": copied}


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_variant"])
def test_shared_and_per_variant_qk_give_the_same_result(mode, mask_kind):
    """Paper mode computes the row minima once per head and row when q, k and the padding are
    shared (batch 1 or a stride-0 expand), else once per variant: every layout must agree with
    the reference and with the others."""
    batch, len_q, len_k = 5, 40, 140
    q, k, v, factors, _ = make_inputs(batch, 4, 2, len_q, len_k, 32, device=DEVICE,
                                      shared_qkv=True, seed=11)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    mask = None
    if mask_kind != "none":
        rows = 1 if mask_kind == "shared" else batch
        mask = (torch.rand(rows, len_k, generator=g) > 0.25).to(DEVICE)
        mask[:, 0] = True
    outs = {}
    for name, (qq, kk, vv) in _variant_layouts(batch, q, k, v).items():
        outs[name] = run_triton(qq, kk, vv, factors, mask, causal=True, mode=mode)
        exact, plain = yardstick(qq, kk, vv, factors, mask, causal=True, mode=mode)
        assert_close_to_reference(outs[name], exact, plain, what=f"{name} {mode} {mask_kind}")
    torch.testing.assert_close(outs["batch1"], outs["expanded"], rtol=0, atol=0)
    torch.testing.assert_close(outs["batch1"], outs["copied"], rtol=1e-6, atol=1e-6)


def test_paper_row_minima_shared_only_when_everything_is_shared():
    """Which batch the row-minimum launch covers: 1 when q, k and the mask are shared."""
    q = torch.zeros(1, 2, 4, 16)
    mask1 = torch.ones(1, 8, dtype=torch.bool).view(torch.uint8)
    mask3 = torch.ones(3, 8, dtype=torch.bool).view(torch.uint8)
    shared = triton_backend._shared
    assert shared(q) and shared(q.expand(3, -1, -1, -1)) and shared(None) and shared(mask1)
    assert not shared(q.expand(3, -1, -1, -1).contiguous()) and not shared(mask3)


@pytest.mark.parametrize("mode", ["paper", "log"])
def test_key_vectors(mode):
    """The per-variant vectors the launcher hands the kernel (log2 f, padding as -inf)."""
    f = torch.tensor([[0.0, 0.5, 1.0, 4.0]])
    mask = torch.tensor([[True, True, False, True]])
    bias, paper_factors = triton_backend._key_vectors(f, mask, mode)
    if mode == "log":
        assert paper_factors is None
        expected = torch.tensor([[float("-inf"), -1.0, float("-inf"), 2.0]])
    else:
        torch.testing.assert_close(paper_factors, f)
        expected = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]])
    torch.testing.assert_close(bias, expected)
    assert triton_backend._key_vectors(None, None, mode) == (None, None)


@pytest.mark.parametrize("mode", ["paper", "log"])
def test_hoisted_pointer_tiles_match_the_reference(monkeypatch, mode):
    """The sm_90 variant (K/V pointer tile built once outside the key loop) on the interpreter,
    which otherwise runs the sm_80 table's per-tile addresses."""
    import dataclasses

    plain_config = triton_backend.kernel_config

    def hoisted(*args, **kwargs):
        return dataclasses.replace(plain_config(*args, **kwargs), hoist=True)

    monkeypatch.setattr(triton_backend, "kernel_config", hoisted)
    for len_q, len_k, head_dim in ((65, 129, 32), (70, 300, 40)):
        q, k, v, factors, mask = make_inputs(3, 2, 1, len_q, len_k, head_dim, device=DEVICE,
                                             padding=True, factor_kind="zero_and_big")  # fmt: skip
        out = run_triton(q, k, v, factors, mask, causal=True, mode=mode)
        exact, plain = yardstick(q, k, v, factors, mask, causal=True, mode=mode)
        assert_close_to_reference(out, exact, plain, what=f"hoisted {mode} k{len_k}")


# ---------------------------------------------------- the TMA path (sm_90's tensor descriptors)
# The interpreter runs tensor descriptors (zero fill past the tensor included), so the TMA
# path is checked here against the reference on any machine; on CUDA only from sm_90 up.
TMA_RUNS = INTERPRETED or torch.cuda.get_device_capability() >= (9, 0)
TMA_SKIP = pytest.mark.skipif(not TMA_RUNS, reason="TMA needs sm_90 or the interpreter")


@pytest.fixture
def tma_forced(monkeypatch):
    """The sm_90 config (tma=True) on any device. Returns a list that gets, per launch, True
    where the launcher made descriptors and False where it fell back to pointers."""
    import dataclasses

    plain_config = triton_backend.kernel_config
    make = triton_backend._tma_descriptors
    taken = []

    def with_tma(*args, **kwargs):
        return dataclasses.replace(plain_config(*args, **kwargs), tma=True)

    def recording(*args):
        descs = make(*args)
        taken.append(descs is not None)
        return descs

    monkeypatch.setattr(triton_backend, "kernel_config", with_tma)
    monkeypatch.setattr(triton_backend, "_tma_descriptors", recording)
    return taken


# Whole and diagonal tiles with ragged ends (TMA's zero fill past Nk), a padded head dim (zero
# fill past D), GQA / MQA, Nq > Nk, a fully padded variant, shared q/k/v (batch coordinate 0).
TMA_CASES = [
    ("ragged_tiles_padding", dict(args=(2, 2, 1, 65, 129, 32), padding=True,
                                  factor_kind="zero_and_big"), True),
    ("d40_gqa", dict(args=(2, 4, 2, 70, 150, 40)), True),
    ("q_longer_than_k", dict(args=(2, 2, 1, 9, 5, 16)), True),
    ("full_padding_row", dict(args=(3, 2, 2, 20, 70, 32), fully_padded_row=True), False),
    ("shared_qkv", dict(args=(3, 4, 2, 40, 140, 32), shared_qkv=True), True),
]  # fmt: skip


@TMA_SKIP
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("name,inputs,causal", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_tma_path_matches_float64_reference(name, inputs, causal, mode, tma_forced):
    inputs = dict(inputs)
    args = inputs.pop("args")
    for dtype in (torch.float32, torch.float16):
        q, k, v, factors, mask = make_inputs(*args, dtype=dtype, device=DEVICE, seed=9, **inputs)
        out = run_triton(q, k, v, factors, mask, causal=causal, mode=mode)
        assert tma_forced[-1], f"{name}: the launcher did not take the TMA path"
        exact, plain = yardstick(q, k, v, factors, mask, causal=causal, mode=mode)
        assert_close_to_reference(out, exact, plain, what=f"tma {name} {dtype} {mode}")


@TMA_SKIP
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_tma_path_reads_model_layouts(mode, tma_forced):
    """[B, N, H, D] memory seen as [B, H, N, D] (how models hand q/k/v over) and a stride-0
    expand of batch 1: descriptors are made for both and agree with the reference."""
    batch, heads, len_q, len_k, dim = 3, 4, 33, 90, 32
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g).to(DEVICE).transpose(1, 2)
               for n in (len_q, len_k, len_k))  # fmt: skip
    factors = (torch.rand(batch, len_k, generator=g) * 2).to(DEVICE)
    expanded = tuple(t[:1].expand(batch, -1, -1, -1) for t in (q, k, v))
    for name, (qq, kk, vv) in {"bnhd": (q, k, v), "expanded": expanded}.items():
        out = run_triton(qq, kk, vv, factors, None, causal=True, mode=mode)
        assert tma_forced[-1], f"{name}: the launcher did not take the TMA path"
        exact, plain = yardstick(qq, kk, vv, factors, None, causal=True, mode=mode)
        assert_close_to_reference(out, exact, plain, what=f"tma {name} {mode}")


@TMA_SKIP
def test_tma_falls_back_to_pointers_where_descriptors_cannot_read(tma_forced):
    """TMA needs 16-byte aligned rows and base: head dim 20 in fp16 (40-byte rows) and a q
    starting 2 bytes into its storage take the pointer path, and still give the right result."""
    q, k, v, factors, mask = make_inputs(2, 2, 1, 17, 40, 20, dtype=torch.float16, device=DEVICE,
                                         padding=True)  # fmt: skip
    storage = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)
    shifted = storage[1:].view(q.shape).copy_(q)
    assert shifted.data_ptr() % 16 != 0
    q32, k32, v32, f32, _ = make_inputs(2, 2, 1, 17, 40, 32, dtype=torch.float16, device=DEVICE)
    shifted32 = torch.empty(q32.numel() + 1, dtype=q32.dtype, device=DEVICE)[1:]
    shifted32 = shifted32.view(q32.shape).copy_(q32)
    for qq, kk, vv, ff, mm in ((q, k, v, factors, mask), (shifted32, k32, v32, f32, None)):
        for mode in ("paper", "log"):
            out = run_triton(qq, kk, vv, ff, mm, causal=True, mode=mode)
            assert tma_forced[-1] is False, "this layout cannot be a TMA descriptor"
            exact, plain = yardstick(qq, kk, vv, ff, mm, causal=True, mode=mode)
            assert_close_to_reference(out, exact, plain, what=f"pointer fallback {mode}")


def test_tma_descriptor_shapes_and_strides():
    """The host side of the TMA path: a shared batch is described as batch 0; strides of size-1
    dimensions are replaced by valid ones; misaligned layouts give None."""
    t = torch.zeros(1, 3, 10, 64, dtype=torch.float16)
    desc = triton_backend._tma_descriptor(t.expand(5, -1, -1, -1), 64, 64)
    assert list(desc.shape) == [1, 3, 10, 64] and desc.block_shape == [1, 1, 64, 64]
    assert desc.strides[0] == 3 * 10 * 64 and desc.strides[1:] == [640, 64, 1]
    bnhd = torch.zeros(2, 10, 3, 64, dtype=torch.float16).transpose(1, 2)
    assert triton_backend._tma_descriptor(bnhd, 64, 64).strides == [1920, 64, 192, 1]
    one_row = torch.zeros(2, 3, 1, 40, dtype=torch.float32)
    assert triton_backend._tma_descriptor(one_row, 32, 64).strides == [120, 40, 40, 1]
    assert triton_backend._tma_descriptor(torch.zeros(2, 3, 10, 20, dtype=torch.float16),
                                          64, 32) is None  # 40-byte rows  # fmt: skip
    assert triton_backend._tma_descriptor(torch.zeros(2, 3, 10, 20), 64, 32) is not None


# ------------------------------------------------------- half precision: fp32 accumulation
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_check_rejects_a_kernel_computing_in_half_precision(mode, dtype, monkeypatch):
    """The kernel comparison with the kernel replaced by one doing its math in the half dtype
    (tests/_planted.py): the fp32-accumulation rule fails it (the 2x plain-PyTorch rule,
    checked first, lets it through); the fp32 reference and an emulation of the kernel's own
    rounding (P in q's dtype before P @ V) pass. Runs on any device (no Triton launch)."""
    import _planted

    for args in ((2, 4, 2, 97, 97, 80), (2, 2, 1, 65, 300, 32)):
        q, k, v, factors, mask = make_inputs(*args, dtype=dtype, device=DEVICE, seed=7,
                                             padding=True, factor_kind="zero_and_big")  # fmt: skip
        for right in (_planted.correct, _planted.kernel_like):
            monkeypatch.setattr(triton_backend, "run", right)
            out = run_triton(q, k, v, factors, mask, causal=True, mode=mode)
            exact, plain = yardstick(q, k, v, factors, mask, causal=True, mode=mode)
            assert_close_to_reference(out, exact, plain, what=f"{right.__name__} {args}")
        monkeypatch.setattr(triton_backend, "run", _planted.low_precision)
        out = run_triton(q, k, v, factors, mask, causal=True, mode=mode)
        exact, plain = yardstick(q, k, v, factors, mask, causal=True, mode=mode)
        with pytest.raises(AssertionError, match="of fp32 accumulation"):
            assert_close_to_reference(out, exact, plain, what=f"half-precision math {args}")


# ------------------------------------------------------- CUDA only: the drop-in and explainer
# The models are the suite's tiny Llama / GPT-2 with unit-scale weights (tests/_brute.py), so
# attention is far from uniform and suppression moves the answer: every comparison first
# asserts that the suppression's effect is EFFECT_OVER_TOLERANCE times the tolerance, so a
# kernel returning zeros or ignoring the factors cannot pass. The checks are functions taking a
# device: the CUDA tests run them on the compiled kernel; the tests after them run them
# everywhere with broken backends planted in place of triton_backend.run and assert they fail.
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: runs the compiled kernel inside models (make gpu-check)",
)
EFFECT_OVER_TOLERANCE = 20
# drop-in: max |logits(triton) - logits(reference)| / max |logits|, per dtype. A stand-in with
# the kernel's rounding (_planted.kernel_like: TF32-cut fp32 dots, P in bf16) measured up to
# 2.7e-3 (fp32) and 1.65e-2 (bf16) on CPU; the suppression's effect is 0.55-1.25 of the scale.
DROP_IN_LIMIT = {torch.float32: 6e-3, torch.bfloat16: 2.5e-2}
# variant i multiplies keys 11 i .. 11 i + 10 by the i-th factor: AtMan's 0.1, removal (0),
# amplification (> 1) and a mild 0.5, so both modes' handling of each is in the logits
DROP_IN_FACTORS = (0.1, 0.0, 3.0, 0.5, 2.0, 0.0)
EXPLAIN_TOL = dict(rtol=2e-2, atol=2e-3)
VOCAB = 96


def _tiny_model(family: str):
    from _brute import unit_scale_
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128)  # fmt: skip
        return unit_scale_(LlamaForCausalLM(config))
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return unit_scale_(GPT2LMHeadModel(config))


def check_drop_in(family: str, mode: str, dtype: torch.dtype, device: str) -> None:
    """Logits of the tiny model (6 variants x 77 tokens) through the "triton" backend against
    the "reference" backend; raises AssertionError if they differ by more than DROP_IN_LIMIT of
    the logits' scale, or if the suppression moves the logits by less than
    EFFECT_OVER_TOLERANCE times that limit (then the comparison could not see a wrong kernel)."""
    import atman_kernels
    from atman_kernels.hf import atman_attention

    model = _tiny_model(family).to(device, dtype)
    variants, seq = len(DROP_IN_FACTORS), 77
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device).expand(variants, -1)
    factors = torch.ones(variants, seq)
    for i, f in enumerate(DROP_IN_FACTORS):
        factors[i, 11 * i : 11 * i + 11] = f
    factors = factors.to(device)
    logits = {}
    with torch.inference_mode(), atman_attention(model):
        with atman_kernels.attention_backend("reference"):
            unsuppressed = model(ids).logits.float()
        for backend in ("triton", "reference"):
            with atman_kernels.suppression(factors, mode), atman_kernels.attention_backend(backend):
                logits[backend] = model(ids).logits.float()
    what = f"{family} {mode} {dtype}"
    scale = logits["reference"].abs().max().item()
    limit = DROP_IN_LIMIT[dtype] * scale
    effect = (logits["reference"] - unsuppressed).abs().max().item()
    assert effect >= EFFECT_OVER_TOLERANCE * limit, (
        f"{what}: the suppression moves the logits by {effect:.3g}, under "
        f"{EFFECT_OVER_TOLERANCE} x the tolerance {limit:.3g}: a kernel ignoring it would pass")
    err = (logits["triton"] - logits["reference"]).abs().max().item()
    assert err <= limit, f"{what}: max |diff| {err:.3g} > {limit:.3g} (scale {scale:.3g})"


def check_explainer(family: str, mode: str, device: str) -> None:
    """AtMan scores of the tiny model (40-token prompt, 3 target tokens) with backend "triton"
    against backend "reference"; raises AssertionError if they differ by more than EXPLAIN_TOL
    or if the largest |score| is under EFFECT_OVER_TOLERANCE times its atol."""
    from atman_kernels.explain import AtManExplainer

    model = _tiny_model(family).to(device)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    target = torch.randint(0, VOCAB, (3,), generator=g).tolist()
    scores = {}
    for backend in ("triton", "reference"):
        explainer = AtManExplainer(model, mode=mode, conceptual_threshold=None, batch_size=8,
                                   progress=False, backend=backend)  # fmt: skip
        scores[backend] = explainer.explain(prompt, target).scores.float().cpu()
    peak = scores["reference"].abs().max().item()
    assert peak >= EFFECT_OVER_TOLERANCE * EXPLAIN_TOL["atol"], (
        f"{family} {mode}: largest |score| {peak:.3g} is under {EFFECT_OVER_TOLERANCE} x atol "
        f"{EXPLAIN_TOL['atol']}: all-zero scores would pass")
    assert scores["triton"].shape == (len(prompt) + len(target) - 1,)
    torch.testing.assert_close(scores["triton"], scores["reference"], **EXPLAIN_TOL)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_drop_in_matches_the_reference_backend(family, mode, dtype):
    check_drop_in(family, mode, dtype, "cuda")


@CUDA
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_explainer_matches_the_reference_backend(family, mode):
    check_explainer(family, mode, "cuda")


def _plant(monkeypatch, run):
    """Put ``run`` in place of triton_backend.run (bf16 under the interpreter included, which
    the dispatch refuses for the real kernel); returns the list of calls it got."""
    import importlib

    dispatch = importlib.import_module("atman_kernels.ops.suppressed_attention")
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return run(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "run", counted)
    monkeypatch.setattr(triton_backend, "unsupported_reason", lambda q, call: None)
    monkeypatch.setattr(dispatch, "_interpreter_refusal", lambda q: None)
    return calls


BROKEN = ["zeros", "ignoring_factors"]


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_drop_in_check_fails_a_broken_kernel(family, mode, dtype, broken, monkeypatch):
    """check_drop_in (the CUDA test's comparison) on this device with the kernel replaced: a
    stand-in with a right kernel's rounding (P in the input dtype, TF32 for fp32) passes; a
    kernel returning zeros or ignoring the factors fails."""
    import _planted

    calls = _plant(monkeypatch, _planted.kernel_like)
    check_drop_in(family, mode, dtype, DEVICE)
    assert calls, "the check never reached the Triton backend"
    calls = _plant(monkeypatch, getattr(_planted, broken))
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        check_drop_in(family, mode, dtype, DEVICE)
    assert calls


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_explainer_check_fails_a_broken_kernel(family, mode, broken, monkeypatch):
    """check_explainer (the CUDA test's comparison) on this device with the kernel replaced:
    the TF32-rounding stand-in passes; zeros or ignored factors fail."""
    import _planted

    calls = _plant(monkeypatch, _planted.kernel_like)
    check_explainer(family, mode, DEVICE)
    assert calls, "the check never reached the Triton backend"
    calls = _plant(monkeypatch, getattr(_planted, broken))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        check_explainer(family, mode, DEVICE)
    assert calls


@pytest.mark.slow
@pytest.mark.parametrize("family,mode", [("llama", "paper"), ("gpt2", "log")])
def test_interpreted_kernel_passes_the_model_checks(family, mode):
    """The real kernel (interpreted on CPU, compiled on CUDA) through both model checks, fp32.
    Slow under the interpreter (about 2 minutes a case on 2 busy cores): two cases cover both
    families and both modes; on CUDA the four-case tests above run them all."""
    check_drop_in(family, mode, torch.float32, DEVICE)
    check_explainer(family, mode, DEVICE)
