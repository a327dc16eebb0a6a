"""Soft-capping and attention sinks in the op: the reference against formulas written here,
the materialised fallback against the reference, and which backend takes such a call.

The formulas follow transformers' own eager attentions (read in 5.24): Gemma 2 caps the scaled
scores, ``c * tanh(s / c)``, before adding the mask; GPT-OSS appends the per-head sink logit
as one more softmax column and drops that column after the softmax. The suppression
(docs/semantics.md) comes after the cap and never touches the sink; paper mode's row minimum
is taken over the capped scores of the visible keys only. The Triton kernel's tests are in
``test_triton.py`` (they need the interpreter), the models' in ``test_hf.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from atman_kernels import suppressed_attention
from atman_kernels._materialised import materialised_suppressed_attention
from atman_kernels.ops import choose_backend, cpp_backend
from atman_kernels.ops._checks import check_call
from atman_kernels.ops.reference import visible_keys


def _inputs(b=3, hq=4, hkv=2, nq=6, nk=9, d=8, seed=0, spread=3.0):
    """fp64 q, k, v with scores of a few units (so a cap of 1..3 bites), factors with exact
    zeros and values > 1, a padding mask with one real key at least per variant."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64) * spread
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    factors = torch.tensor([0.0, 1.0, 2.5, 0.3], dtype=torch.float64)[
        torch.randint(0, 4, (b, nk), generator=g)
    ]
    mask = torch.rand(b, nk, generator=g) > 0.3
    mask[:, -1] = True
    sinks = torch.randn(hq, generator=g, dtype=torch.float64) * 2
    return q, k, v, factors, mask, sinks


def _by_formula(q, k, v, factors, mask, *, causal, mode, softcap=None, sinks=None, scale=None):
    """Suppressed attention written out row by row: cap, suppress over V_i, append the sink
    column, softmax, drop the column. Loops over (variant, head, row): slow and plain."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                seen = [
                    j
                    for j in range(nk)
                    if (not causal or j <= i + nk - nq) and (mask is None or bool(mask[bi, j]))
                ]
                s = {j: float(q[bi, h, i] @ k[bi, h // group, j]) * scale for j in seen}
                if softcap is not None:
                    s = {j: softcap * math.tanh(x / softcap) for j, x in s.items()}
                if factors is not None and seen:
                    f = {j: float(factors[bi, j]) for j in seen}
                    if mode == "paper":
                        m = min(s.values())  # visible keys only: never the sink
                        s = {j: m + f[j] * (x - m) for j, x in s.items()}
                    else:
                        s = {j: x + math.log(f[j]) if f[j] > 0 else -math.inf
                             for j, x in s.items()}  # fmt: skip
                logits = list(s.values()) + ([float(sinks[h])] if sinks is not None else [])
                finite = [x for x in logits if x != -math.inf]
                if not finite:
                    continue  # no visible key (and no sink): zeros
                top = max(finite)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for w, j in zip(weights, s, strict=False):  # the sink's weight is dropped
                    out[bi, h, i] += w / total * v[bi, h // group, j]
    return out


CASES = [
    # (id, _inputs kwargs, causal)
    ("gqa_causal_short_q", dict(nq=4, nk=9), True),
    ("gqa_full", dict(nq=6, nk=9), False),
    ("mha_causal_square_odd_d", dict(hq=3, hkv=3, nq=7, nk=7, d=5), True),
    ("mqa_q_longer_than_k", dict(hq=2, hkv=1, nq=8, nk=5), True),
]


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("softcap,with_sinks", [(1.5, False), (None, True), (2.0, True)],
                         ids=["softcap", "sinks", "both"])  # fmt: skip
@pytest.mark.parametrize("name,shape,causal", CASES, ids=[c[0] for c in CASES])
def test_reference_equals_the_formula(name, shape, causal, softcap, with_sinks, mode):
    q, k, v, factors, mask, sinks = _inputs(**shape)
    sinks = sinks if with_sinks else None
    got = suppressed_attention(q, k, v, factors, causal=causal, mode=mode, key_padding_mask=mask,
                               softcap=softcap, sinks=sinks, backend="reference")  # fmt: skip
    expected = _by_formula(q, k, v, factors, mask, causal=causal, mode=mode, softcap=softcap,
                           sinks=sinks)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the cap and the sinks changed the result (the test would pass on an op ignoring them)
    plain = suppressed_attention(q, k, v, factors, causal=causal, mode=mode,
                                 key_padding_mask=mask, backend="reference")  # fmt: skip
    assert float((got - plain).abs().max()) > 1e-2


def test_cap_comes_before_the_row_minimum_in_paper_mode():
    """Paper mode: s' = m + f (s - m) with m the minimum of the *capped* scores. Capping after
    the suppression, or taking m from uncapped scores, gives another result."""
    q, k, v, factors, mask, _ = _inputs(nq=5, nk=5)
    c = 1.0
    got = suppressed_attention(q, k, v, factors, causal=True, softcap=c, backend="reference")
    expected = _by_formula(q, k, v, factors, None, causal=True, mode="paper", softcap=c)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the other order: suppress the raw scores, cap afterwards
    scale = q.shape[-1] ** -0.5
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    s = q @ kk.transpose(-1, -2) * scale
    vis = visible_keys(5, 5, True, None, "cpu")
    m = s.masked_fill(~vis, math.inf).amin(-1, keepdim=True)
    s = c * torch.tanh((m + factors[:, None, None, :] * (s - m)) / c)
    wrong = torch.softmax(s.masked_fill(~vis, -math.inf), -1) @ vv
    assert float((got - wrong).abs().max()) > 1e-2


def test_sink_is_not_the_row_minimum_and_is_never_suppressed():
    """All factors 0 in paper mode: every visible score drops to the row minimum m, so the
    row's keys share weight n e^m against the sink's e^z: out = mean(v) n e^m / (n e^m + e^z).
    A sink below every score would have made m = z if it counted for the minimum."""
    q, k, v, _, _, _ = _inputs(b=1, hq=2, hkv=2, nq=1, nk=6)
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2) * scale)[0, :, 0]  # [H, Nk]
    sinks = s.amin(-1) - 3.0  # below every score
    zeros = torch.zeros(1, 6, dtype=torch.float64)
    for mode, expected_share in (("paper", None), ("log", 0.0)):
        got = suppressed_attention(q, k, v, zeros, mode=mode, sinks=sinks, backend="reference")
        for h in range(2):
            if mode == "paper":
                n_em = 6 * math.exp(float(s[h].min()))
                share = n_em / (n_em + math.exp(float(sinks[h])))
            else:
                share = expected_share  # f = 0 removes every key: the sink takes it all
            torch.testing.assert_close(got[0, h, 0], v[0, h].mean(0) * share, rtol=1e-12,
                                       atol=1e-12)  # fmt: skip


def test_row_without_visible_key_gives_zeros_with_sinks():
    q, k, v, factors, mask, sinks = _inputs(b=2, nq=4, nk=6)
    mask[1] = False  # variant 1: every key padded
    out = suppressed_attention(q, k, v, factors, key_padding_mask=mask, sinks=sinks,
                               softcap=2.0, backend="reference")  # fmt: skip
    assert bool(torch.isfinite(out).all())
    assert bool((out[1] == 0).all())
    assert bool(out[0].abs().amax(-1).gt(0).all())


def test_sinks_lower_every_row_weight_and_huge_cap_changes_nothing():
    q, k, v, factors, mask, sinks = _inputs()
    plain = suppressed_attention(q, k, v, factors, causal=True, backend="reference")
    # a very large cap is the identity up to (s/c)^3 / 3 terms
    capped = suppressed_attention(q, k, v, factors, causal=True, softcap=1e6, backend="reference")
    torch.testing.assert_close(capped, plain, rtol=1e-9, atol=1e-9)
    # a sink far below every score takes no weight
    low = suppressed_attention(q, k, v, factors, causal=True, sinks=sinks * 0 - 1e4,
                               backend="reference")  # fmt: skip
    torch.testing.assert_close(low, plain, rtol=0, atol=0)
    # a sink far above every score takes all of it: zeros
    high = suppressed_attention(q, k, v, factors, causal=True, sinks=sinks * 0 + 1e4,
                                backend="reference")  # fmt: skip
    assert float(high.abs().max()) < 1e-300


def test_sinks_and_q_of_different_float_dtypes_are_accepted():
    q, k, v, factors, _, sinks = _inputs()
    got = suppressed_attention(q.float(), k.float(), v.float(), factors, sinks=sinks,
                               backend="reference")  # fmt: skip
    expected = suppressed_attention(q, k, v, factors, sinks=sinks.float().double(),
                                    backend="reference")  # fmt: skip
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch
# without the extension: skipped with the reason, a failure under CI=true (tests/conftest.py)
needs_cpp = pytest.mark.needs_cpp


@needs_cpp
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_cpp_backend_takes_softcap_through_the_public_op(mode):
    q, k, v, factors, mask, _ = _inputs(nq=5, nk=9)
    call = check_call(q, k, v, factors, True, None, mode, mask, softcap=1.5)
    assert choose_backend(q, call) == ("cpp", None)
    got = suppressed_attention(q, k, v, factors, causal=True, mode=mode, key_padding_mask=mask,
                               softcap=1.5, backend="cpp")  # fmt: skip
    expected = _by_formula(q, k, v, factors, mask, causal=True, mode=mode, softcap=1.5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    auto = suppressed_attention(q, k, v, factors, causal=True, mode=mode, key_padding_mask=mask,
                                softcap=1.5)  # fmt: skip
    assert torch.equal(auto, got)


@needs_cpp
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("name,shape,causal", CASES, ids=[c[0] for c in CASES])
def test_cpp_kernel_equals_the_formula_with_softcap_and_sinks(name, shape, causal, mode):
    """The kernel itself (cpp_backend.run), fp64, against the row-by-row formula."""
    q, k, v, factors, mask, sinks = _inputs(**shape)
    call = check_call(q, k, v, factors, causal, None, mode, mask, softcap=2.0, sinks=sinks)
    got = cpp_backend.run(q, k, v, factors, mask, call, sinks=sinks)
    expected = _by_formula(q, k, v, factors, mask, causal=causal, mode=mode, softcap=2.0,
                           sinks=sinks)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@needs_cpp
def test_sinks_reach_the_cpp_kernel_through_the_public_op():
    """The public op hands sinks to the C++ backend, which ``auto`` picks on CPU: its result
    is the reference's, and it differs from the same call without sinks (so the sinks were
    not dropped on the way)."""
    q, k, v, factors, _, sinks = (t.float() for t in _inputs())
    call = check_call(q, k, v, factors, False, None, "paper", None, sinks=sinks)
    assert choose_backend(q, call) == ("cpp", None)
    expected = suppressed_attention(q, k, v, factors, sinks=sinks, backend="reference")
    got = suppressed_attention(q, k, v, factors, sinks=sinks, backend="cpp")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(suppressed_attention(q, k, v, factors, sinks=sinks), got,
                               rtol=0, atol=0)
    without = suppressed_attention(q, k, v, factors, backend="cpp")
    assert (got - without).abs().max() > 1e-3


# ----------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("mode", ["paper", "log"])
def test_materialised_fallback_equals_the_reference(mode):
    q, k, v, factors, mask, sinks = _inputs(nq=5, nk=9)
    expected = suppressed_attention(q, k, v, factors, causal=True, mode=mode,
                                    key_padding_mask=mask, softcap=1.5, sinks=sinks,
                                    backend="reference")  # fmt: skip
    visible = visible_keys(5, 9, True, mask, "cpu")
    got, weights = materialised_suppressed_attention(
        q, k, v, factors, scale=q.shape[-1] ** -0.5, mode=mode, visible=visible, softcap=1.5,
        sinks=sinks,
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the weights leave out the sink's share: rows sum to less than one
    assert bool((weights.sum(-1) < 1).all())


def test_materialised_fallback_takes_per_row_sinks():
    """Sinks computed per head and row ([B, H, Nq, 1], Inkling 2), with a sliding window and
    an additive bias (the bias joins after the cap, like a mask in Gemma 2)."""
    q, k, v, factors, _, _ = _inputs(nq=6, nk=6)
    g = torch.Generator().manual_seed(5)
    sinks = torch.randn(3, 4, 6, 1, generator=g, dtype=torch.float64)
    bias = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    pos = torch.arange(6)
    window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 3)
    got, _ = materialised_suppressed_attention(
        q, k, v, factors, scale=0.3, mode="paper", visible=window, bias=bias, softcap=2.0,
        sinks=sinks,
    )
    kk, vv = (t.repeat_interleave(2, dim=1) for t in (k, v))
    s = 2.0 * torch.tanh(q @ kk.transpose(-1, -2) * 0.3 / 2.0) + bias
    m = s.masked_fill(~window, math.inf).amin(-1, keepdim=True)
    s = (m + factors[:, None, None, :] * (s - m)).masked_fill(~window, -math.inf)
    w = torch.softmax(torch.cat([s, sinks], dim=-1), dim=-1)[..., :-1]
    torch.testing.assert_close(got, w @ vv, rtol=1e-12, atol=1e-12)
