"""atman_kernels.nn.MultiheadAttention against torch's MultiheadAttention and an independent
suppressed attention written out here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import atman_kernels
from atman_kernels.nn import MultiheadAttention, swap_multihead_attention

E, H = 32, 4


def pair(seed: int = 0, **kwargs) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kwargs).eval()
    ours = MultiheadAttention(E, H, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(batch: int, len_q: int, len_k: int, batch_first: bool, seed: int = 1, kdim=E):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, len_q, E, generator=g)
    k = torch.randn(batch, len_k, kdim, generator=g)
    v = torch.randn(batch, len_k, kdim, generator=g)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return q, k, v


def independent(mha: nn.MultiheadAttention, q, k, v, factors, mode, visible, batch_first):
    """Suppressed MHA from torch's own projection weights, float64, per docs/semantics.md."""
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    w = mha.in_proj_weight.double()
    b = mha.in_proj_bias.double()
    qp, kp, vp = (
        (x.double() @ w[i * E : (i + 1) * E].T + b[i * E : (i + 1) * E])
        .unflatten(-1, (H, E // H))
        .transpose(1, 2)
        for i, x in enumerate((q, k, v))
    )
    s = qp @ kp.transpose(-1, -2) / (E // H) ** 0.5
    f = factors.double()[:, None, None, :]
    if mode == "paper":
        m = torch.where(visible, s, torch.full_like(s, float("inf"))).amin(-1, keepdim=True)
        s = m + f * (s - m)
    else:
        s = s + torch.log(f)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    o = (p @ vp).transpose(1, 2).flatten(2)
    o = o @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()
    return o if batch_first else o.transpose(0, 1), p


def factors_for(batch: int, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(batch, n, generator=g) * 2
    f[f < 0.3] = 0.0
    return f


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal_bool", "causal_float", "both"])
def test_matches_torch_without_factors(batch_first, masks):
    ref, ours = pair(batch_first=batch_first)
    n = 9
    q, k, v = inputs(3, n, n, batch_first)
    kpm = attn = None
    if masks in ("padding", "both"):
        kpm = torch.zeros(3, n, dtype=torch.bool)
        kpm[1, -2:] = True
        kpm[2, -4:] = True
    if masks in ("causal_bool", "both"):
        attn = torch.ones(n, n, dtype=torch.bool).triu(1)
    if masks == "causal_float":
        attn = nn.Transformer.generate_square_subsequent_mask(n)
    kw = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=False)
    expected, _ = ref(q, k, v, **kw)
    got, weights = ours(q, k, v, **kw)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # ones as factors run the fused op and change nothing
    got1, _ = ours(q, k, v, factors=torch.ones(3, n), **kw)
    torch.testing.assert_close(got1, expected, atol=1e-5, rtol=1e-5)


def test_need_weights_without_factors_is_torch():
    ref, ours = pair()
    q, k, v = inputs(2, 5, 7, batch_first=False)
    for avg in (True, False):
        e_out, e_w = ref(q, k, v, average_attn_weights=avg)
        g_out, g_w = ours(q, k, v, average_attn_weights=avg)
        torch.testing.assert_close(g_out, e_out)
        torch.testing.assert_close(g_w, e_w)


@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_factors_match_independent(batch_first, mode):
    ref, ours = pair(batch_first=batch_first)
    n = 11
    q, k, v = inputs(3, n, n, batch_first)
    kpm = torch.zeros(3, n, dtype=torch.bool)
    kpm[2, -3:] = True
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    f = factors_for(3, n)
    visible = (~causal)[None, None] & (~kpm)[:, None, None, :]
    expected, expected_w = independent(ref, q, k, v, f, mode, visible, batch_first)
    got, w = ours(q, k, v, key_padding_mask=kpm, attn_mask=causal, need_weights=False,
                  factors=f, mode=mode)
    assert w is None
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # need_weights=True returns the suppressed weights from the exact path
    got2, w2 = ours(q, k, v, key_padding_mask=kpm, attn_mask=causal, factors=f, mode=mode,
                    average_attn_weights=False)
    torch.testing.assert_close(got2.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2.double(), expected_w, atol=1e-6, rtol=1e-5)
    # the context route gives the same
    with atman_kernels.suppression(f, mode=mode):
        got3, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(got3, got, atol=0, rtol=0)
    assert (got - ref(q, k, v, key_padding_mask=kpm, attn_mask=causal)[0]).abs().max() > 1e-2


def test_general_masks_with_factors_use_exact_path():
    """A banded bool mask and a float bias mask are neither causal nor padding."""
    ref, ours = pair(batch_first=True)
    n = 8
    q, k, v = inputs(2, n, n, True)
    idx = torch.arange(n)
    band = (idx[:, None] - idx[None, :]).abs() > 2  # True = not allowed
    f = factors_for(2, n)
    expected, _ = independent(ref, q, k, v, f, "paper", (~band)[None, None], True)
    got, _ = ours(q, k, v, attn_mask=band, need_weights=False, factors=f)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # without factors, an inexpressible mask is torch's own computation
    torch.testing.assert_close(
        ours(q, k, v, attn_mask=band, need_weights=False)[0],
        ref(q, k, v, attn_mask=band, need_weights=False)[0],
    )


def test_unbatched_and_kdim():
    ref, ours = pair(kdim=24, vdim=24, batch_first=True)
    q, k, v = inputs(1, 6, 5, True, kdim=24)
    q, k, v = q[0], k[0], v[0]
    expected = ref(q, k, v, need_weights=False)[0]
    got = ours(q, k, v, need_weights=False)[0]
    assert got.shape == expected.shape == (6, E)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_one_input_many_variants():
    """Batch-1 input with V factor rows gives V outputs, one per variant."""
    _, ours = pair(batch_first=True)
    q, k, v = inputs(1, 6, 6, True)
    f = factors_for(4, 6)
    many = ours(q, k, v, need_weights=False, factors=f)[0]
    assert many.shape == (4, 6, E)
    for i in range(4):
        one = ours(q, k, v, need_weights=False, factors=f[i : i + 1])[0]
        torch.testing.assert_close(many[i : i + 1], one, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip():
    ref, ours = pair(batch_first=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = nn.MultiheadAttention(E, H, batch_first=True).eval()
    back.load_state_dict(ours.state_dict())
    q, k, v = inputs(2, 5, 5, True)
    torch.testing.assert_close(back(q, k, v)[0], ref(q, k, v)[0])


def test_unsupported_options_with_factors_are_errors():
    _, ours = pair(add_bias_kv=True)
    q, k, v = inputs(2, 5, 5, False)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        ours(q, k, v, factors=torch.ones(2, 5))
    _, ours = pair()
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        ours(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match=r"one column per key \(5\)"):
        ours(q, k, v, factors=torch.ones(2, 4))
    with atman_kernels.suppression(torch.ones(2, 5), layers=[0]), pytest.raises(
        ValueError, match="layer index"
    ):
        ours(q, k, v, need_weights=False)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_swap_in_transformer_encoder():
    """nn.TransformerEncoder in eval mode (its fused fast paths would skip the attention)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 7, E)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=kpm)
        swap_multihead_attention(encoder)
        assert all(type(m.self_attn) is MultiheadAttention for m in encoder.layers)
        assert [m.self_attn.layer_idx for m in encoder.layers] == [0, 1]
        got = encoder(x, src_key_padding_mask=kpm)
        real = ~kpm
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
        f = factors_for(3, 7)
        with atman_kernels.suppression(f):
            suppressed = encoder(x, src_key_padding_mask=kpm)
        with atman_kernels.suppression(f, layers=[1]):
            last_only = encoder(x, src_key_padding_mask=kpm)
    assert (suppressed - got)[real].abs().max() > 1e-2
    assert (last_only - suppressed)[real].abs().max() > 1e-3


def test_swap_shares_parameters_in_a_vit_like_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(E)
            self.attn = nn.MultiheadAttention(E, H)  # sequence-first, like CLIP's towers

        def forward(self, x):
            y = self.norm(x)
            return x + self.attn(y, y, y)[0]  # default need_weights=True

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    weight = model[0].attn.in_proj_weight
    x = torch.randn(5, 2, E)
    expected = model(x)
    swap_multihead_attention(model)
    assert model[0].attn.in_proj_weight is weight
    torch.testing.assert_close(model(x), expected)
    f = factors_for(2, 5)
    with atman_kernels.suppression(f):
        suppressed = model(x)  # need_weights=True with factors: exact path
    # independent: apply block by block
    y = x
    for blk in model:
        z = blk.norm(y)
        o, _ = independent(blk.attn, z, z, z, f, "paper", torch.ones(1, 1, 5, 5, dtype=bool),
                           batch_first=False)
        y = y + o.float()
    torch.testing.assert_close(suppressed, y, atol=1e-5, rtol=1e-5)
