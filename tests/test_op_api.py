"""The public op: argument checks, dispatch, and the reference's semantics checked
against independent formulations (SDPA, masks, hand-computed rows)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atman_kernels import BackendUnavailable, suppressed_attention
from atman_kernels.ops import choose_backend
from atman_kernels.ops._checks import check_call


def _qkv(b=2, hq=4, hkv=2, nq=5, nk=7, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def _sdpa(q, k, v, mask=None):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _causal_mask(nq, nk):
    return torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_unit_factors_equal_plain_attention(causal, mode):
    q, k, v = _qkv(nq=5, nk=9)
    ones = torch.ones(2, 9, dtype=torch.float64)
    out = suppressed_attention(q, k, v, ones, causal=causal, mode=mode, backend="reference")
    mask = _causal_mask(5, 9) if causal else None
    torch.testing.assert_close(out, _sdpa(q, k, v, mask))


def test_log_mode_zero_factor_removes_the_key():
    q, k, v = _qkv(nq=4, nk=6)
    f = torch.ones(2, 6, dtype=torch.float64)
    f[0, 2] = 0
    f[1, 5] = 0
    out = suppressed_attention(q, k, v, f, mode="log", backend="reference")
    expected = _sdpa(q, k, v, (f > 0)[:, None, None, :])
    torch.testing.assert_close(out, expected)


def test_log_mode_is_an_additive_log_bias():
    q, k, v = _qkv()
    f = torch.rand(2, 7, dtype=torch.float64) + 0.05
    out = suppressed_attention(q, k, v, f, mode="log", backend="reference")
    expected = _sdpa(q, k, v, torch.log(f)[:, None, None, :])
    torch.testing.assert_close(out, expected)


def test_paper_mode_row_by_hand():
    # One head, one query: s' = m + f (s - m) with m the minimum over visible keys.
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    f = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    out = suppressed_attention(q, k, v, f, scale=1.0, backend="reference")
    s = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    m = s.min()
    p = torch.softmax(m + f[0] * (s - m), dim=0)
    torch.testing.assert_close(out[0, 0, 0], p @ v[0, 0])
    # factor 0 lowers key 0 to the row minimum: its weight equals the minimum key's.
    assert math.isclose(p[0].item(), p[1].item(), rel_tol=1e-12)


def test_paper_mode_minimum_ignores_padding_and_future_keys():
    q, k, v = _qkv(b=1, hq=1, hkv=1, nq=3, nk=5, d=4)
    f = torch.full((1, 5), 0.3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, True]])
    out = suppressed_attention(
        q, k, v, f, causal=True, key_padding_mask=mask, scale=0.5, backend="reference"
    )
    for i in range(3):
        vis = [j for j in range(5) if j <= 2 + i and mask[0, j]]
        s = 0.5 * (k[0, 0, vis] @ q[0, 0, i])
        m = s.min()
        p = torch.softmax(m + 0.3 * (s - m), dim=0)
        torch.testing.assert_close(out[0, 0, i], p @ v[0, 0, vis])


def test_row_without_visible_key_is_zero_not_nan():
    q, k, v = _qkv(b=2, nq=3, nk=4)
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    for mode in ("paper", "log"):
        out = suppressed_attention(
            q, k, v, torch.rand(2, 4, dtype=torch.float64), key_padding_mask=mask, mode=mode,
            backend="reference",
        )
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all()
    # log mode: every visible key removed -> zeros as well
    f = torch.zeros(2, 4, dtype=torch.float64)
    out = suppressed_attention(q, k, v, f, mode="log", backend="reference")
    assert (out == 0).all()


def test_causal_more_queries_than_keys_gives_zero_rows_first():
    q, k, v = _qkv(b=1, nq=6, nk=4)
    out = suppressed_attention(q, k, v, causal=True, backend="reference")
    assert (out[:, :, :2] == 0).all()
    torch.testing.assert_close(out[:, :, 2:], _sdpa(q[:, :, 2:], k, v, _causal_mask(4, 4)))


def test_shared_qkv_broadcasts_over_variants():
    q, k, v = _qkv(b=1)
    f = torch.rand(5, 7, dtype=torch.float64)
    out = suppressed_attention(q, k, v, f, backend="reference")
    assert out.shape == (5, 4, 5, 8)
    for b in range(5):
        single = suppressed_attention(q, k, v, f[b : b + 1], backend="reference")
        torch.testing.assert_close(out[b : b + 1], single)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_keeps_input_dtype(dtype):
    q, k, v = (t.to(dtype) for t in _qkv())
    out = suppressed_attention(q, k, v, torch.rand(2, 7), backend="reference")
    assert out.dtype == dtype and out.is_contiguous()


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_a_backend_that_runs():
    q, k, v = _qkv(dtype=torch.float32)
    call = check_call(q, k, v, None, False, None, "paper", None)
    name, reason = choose_backend(q, call)
    assert name in ("cpp", "reference")
    assert (reason is None) == (name == "cpp")
    factors = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) * 2
    for mode in ("paper", "log"):
        out = suppressed_attention(q, k, v, factors, causal=True, mode=mode)
        ref = suppressed_attention(q, k, v, factors, causal=True, mode=mode, backend="reference")
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # the factors matter here: a backend that ignored them would fail the line above
        plain = suppressed_attention(q, k, v, None, causal=True, backend="reference")
        assert float((ref - plain).abs().max()) > 1e-2


def test_unknown_backend_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        suppressed_attention(q, k, v, backend="cuda")


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(BackendUnavailable, match="triton"):
        suppressed_attention(q, k, v, backend="triton")


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    q, k, v = _qkv(dtype=torch.float32)
    f = torch.rand(2, 7)
    yield "rank", dict(q=q[0]), ValueError, "q must have rank 4"
    yield "int dtype", dict(q=q.long()), TypeError, "q must be float16"
    yield "mixed dtype", dict(k=k.double()), TypeError, "share one dtype"
    yield "v shape", dict(v=v[:, :, :6]), ValueError, "v must have the shape of k"
    yield "head dim", dict(k=k[..., :6], v=v[..., :6]), ValueError, "head dim"
    yield "gqa", dict(k=k[:, :1].repeat(1, 3, 1, 1), v=v[:, :1].repeat(1, 3, 1, 1)), \
        ValueError, "multiple of k's head count"
    yield "empty", dict(q=q[:, :, :0]), ValueError, "no empty dimension"
    yield "factor shape", dict(factors=f[:, :6]), ValueError, "factors must have shape"
    yield "factor rank", dict(factors=f[0]), ValueError, "factors must have shape"
    yield "factor int", dict(factors=f.long()), TypeError, "floating"
    yield "factor nan", dict(factors=f.masked_fill(f > 0.5, float("nan"))), ValueError, "finite"
    yield "factor inf", dict(factors=f + float("inf")), ValueError, "finite"
    yield "factor negative", dict(factors=f - 2), ValueError, ">= 0"
    yield "batch mismatch", dict(factors=torch.rand(3, 7)), ValueError, "batch size must be 1"
    yield "mask dtype", dict(key_padding_mask=torch.ones(2, 7)), TypeError, "must be bool"
    yield "mask shape", dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), \
        ValueError, "key_padding_mask must have shape"
    yield "mask batch", dict(key_padding_mask=torch.ones(3, 7, dtype=torch.bool)), \
        ValueError, "key_padding_mask must have shape"
    yield "mode", dict(mode="additive"), ValueError, "mode must be one of"
    yield "scale", dict(scale=-1.0), ValueError, "scale must be finite and > 0"
    yield "scale nan", dict(scale=float("nan")), ValueError, "scale"
    yield "causal", dict(causal=1), TypeError, "causal must be a bool"
    yield "not tensor", dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"
    yield "device", dict(k=k.to("meta"), v=v.to("meta")), ValueError, "one device"
    yield "factor device", dict(factors=f.to("meta")), ValueError, "factors must be on"
    yield "mask device", dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")), \
        ValueError, "key_padding_mask must be on"
    yield "q nan", dict(q=_poisoned(q, float("nan"))), ValueError, "q must be finite"
    yield "k inf", dict(k=_poisoned(k, float("inf"))), ValueError, "k must be finite"
    yield "v -inf", dict(v=_poisoned(v, float("-inf"))), ValueError, "v must be finite"
    yield "k nan shared", dict(k=_poisoned(k[:1], float("nan")), v=v[:1]), ValueError, \
        "k must be finite"
    yield "softcap 0", dict(softcap=0.0), ValueError, "softcap must be finite and > 0"
    yield "softcap negative", dict(softcap=-50.0), ValueError, "softcap must be finite and > 0"
    yield "softcap inf", dict(softcap=float("inf")), ValueError, "softcap must be finite"
    yield "softcap nan", dict(softcap=float("nan")), ValueError, "softcap must be finite"
    yield "softcap bool", dict(softcap=True), TypeError, "softcap must be a float > 0 or None"
    yield "softcap str", dict(softcap="50"), TypeError, "softcap must be a float > 0 or None"
    sinks = torch.zeros(4)
    yield "sinks shape", dict(sinks=sinks[:3]), ValueError, r"sinks must have shape \[4\]"
    yield "sinks rank", dict(sinks=sinks[None]), ValueError, r"sinks must have shape \[4\]"
    yield "sinks int", dict(sinks=sinks.long()), TypeError, "sinks must be a floating tensor"
    yield "sinks nan", dict(sinks=sinks.index_fill(0, torch.tensor([2]), float("nan"))), \
        ValueError, "sinks must be finite"
    yield "sinks inf", dict(sinks=sinks - float("inf")), ValueError, "sinks must be finite"
    yield "sinks device", dict(sinks=sinks.to("meta")), ValueError, "sinks must be on q's device"
    yield "sinks list", dict(sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor"


def _poisoned(t, value):
    """A copy of ``t`` with one element (away from the edges) set to ``value``."""
    t = t.clone()
    t[-1, -1, t.shape[2] // 2, 1] = value
    return t


@pytest.mark.parametrize(
    "override, exc, msg", [pytest.param(o, e, m, id=n) for n, o, e, m in _bad_cases()]
)
@pytest.mark.parametrize("backend", ["auto", "reference", "cpp", "triton"])
def test_bad_input_raises_before_work(override, exc, msg, backend):
    q, k, v = _qkv(dtype=torch.float32)
    args = dict(q=q, k=k, v=v, factors=torch.rand(2, 7))
    kwargs = {}
    for key, val in override.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(exc, match=msg):
        suppressed_attention(args["q"], args["k"], args["v"], args["factors"], backend=backend,
                             **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_input_is_refused_in_every_dtype(dtype):
    q, k, v = (t.to(dtype) for t in _qkv())
    for backend in ("reference", "cpp"):
        suppressed_attention(q, k, v, backend=backend)  # finite: runs
        with pytest.raises(ValueError, match="q must be finite"):
            suppressed_attention(_poisoned(q, float("nan")), k, v, backend=backend)


def test_large_finite_float64_input_is_not_refused():
    q, k, v = _qkv()
    out = suppressed_attention(q * 1e200, k * 1e-200, v, backend="reference")
    assert torch.isfinite(out).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter runs only on CPU")
def test_bfloat16_under_the_triton_interpreter_is_refused():
    from atman_kernels.ops import triton_backend

    assert triton_backend._interpreter_on()  # conftest sets TRITON_INTERPRET=1 on CPU machines
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(b=1, hq=2, hkv=2, nq=16, nk=16, d=16))
    with pytest.raises(BackendUnavailable, match="bfloat16 under the Triton interpreter"):
        suppressed_attention(q, k, v, causal=True, backend="triton")
    # the refusal is still needed: run directly, the interpreter's bf16 result is far off
    call = check_call(q, k, v, None, True, None, "paper", None)
    wrong = triton_backend.run(q, k, v, None, None, call)
    exact = suppressed_attention(q.double(), k.double(), v.double(), causal=True,
                                 backend="reference")
    assert float((wrong.double() - exact).abs().max()) > 1.0
    # float16 under the interpreter is not refused and is right
    q16, k16, v16 = (t.to(torch.float16) for t in (q, k, v))
    out16 = suppressed_attention(q16, k16, v16, causal=True, backend="triton")
    assert float((out16.double() - exact).abs().max()) < 1e-2


def test_public_op_compiles_with_fullgraph():
    q, k, v = _qkv(dtype=torch.float32)
    f = torch.rand(2, 7)

    def fn(q, k, v, f):
        return suppressed_attention(q, k, v, f, causal=True) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, f), fn(q, k, v, f))
