"""Swin image classifiers explained exactly: the units are the final stage's cells; suppressing
a cell gives every token of its region the factor, as a key, in every window attention of every
stage (through the cyclic shift, the window padding and the patch mergings), and the shifted
windows' -100 mask stays a mask (excluded keys, not part of paper mode's row minimum).

The brute force here shares no code with the package: it runs the model once per cell with an
attention of its own (float64) that works out, from the block's input size, window and shift,
which token of the image every key of every window is (its own index arithmetic for the pad,
the roll and the window order), which keys the shift mask hides (checked against the mask the
model passes), and applies the suppression formulas to the tokens of the suppressed cell.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch
import transformers as T
from _brute import unit_scale_
from transformers import AttentionInterface
from transformers.models.swin import modeling_swin

from atman_kernels.explain import AtManExplainer
from atman_kernels.hf import atman_attention

ROUTES = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_swin)
needs_routing = pytest.mark.skipif(
    not ROUTES, reason="this transformers' Swin computes attention by hand (refused: "
    "test_swin_that_does_not_route_is_refused)")
LABELS = dict(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
CLASS = 1
REL = 1e-4  # max error relative to the peak |score| of the brute force

# (config, pixel size): three stages each; windows of 4 with a shift of 2 in odd blocks
CASES = {
    # 16x16 -> 8x8 -> 4x4 tokens: every stage divides by the window; the last stage's grid
    # equals the window (no shift there)
    "divides": (dict(image_size=32, patch_size=2, depths=[2, 2, 2]), (32, 32)),
    # 14x14 (padded to 16) -> 7x7 (padded to 8, odd: the merging pads) -> 4x4
    "pads": (dict(image_size=56, patch_size=4, depths=[2, 2, 2]), (56, 56)),
    # not square: 18x14 -> 9x7 -> 5x4 (last stage padded to 8x4: two windows, no shift)
    "not square": (dict(image_size=56, patch_size=4, depths=[2, 2, 2]), (72, 56)),
}


def swin(**overrides):
    cfg = T.SwinConfig(**{**dict(embed_dim=16, num_heads=[2, 2, 4], window_size=4), **overrides},
                       **LABELS)
    torch.manual_seed(0)
    return unit_scale_(T.SwinForImageClassification(cfg))


def pixels(size, seed=1):
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the brute force
BRUTE = "swin_brute_force"


class _Run:
    """What the brute-force attention needs: the block of each attention module, the stage's
    merges still ahead, the block's input size (recorded by a hook), the final grid's width,
    the factor of every final cell and the mode."""

    def __init__(self, model):
        stages = model.base_model.encoder.layers
        self.block_of, self.merges_after, self.dims = {}, {}, {}
        merges = [stage.downsample is not None for stage in stages]
        for s, stage in enumerate(stages):
            for block in stage.blocks:
                self.block_of[block.attention] = block
                self.merges_after[block] = sum(merges[s:])
        self.cols = None
        self.factors = None  # [cells] float64
        self.mode = "paper"
        self.calls = 0


_RUNS: list[_Run] = []


def _window_keys(run, block):
    """(cell [W, N] of every key of every window, -1 = padding; visible [W, N, N])."""
    h, w = run.dims[block]
    ws, shift = int(block.window_size), int(block.shift_size)
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    k = run.merges_after[block]
    n_win_cols = wp // ws
    n_windows = (hp // ws) * n_win_cols
    cells = torch.full((n_windows, ws * ws), -1, dtype=torch.long)
    regions = torch.zeros(n_windows, ws * ws, dtype=torch.long)

    def region(y, size):  # the shift mask's three bands along one axis
        return 0 if y < size - ws else (1 if y < size - shift else 2)

    for win in range(n_windows):
        for t in range(ws * ws):
            y = (win // n_win_cols) * ws + t // ws  # in the shifted, padded grid
            x = (win % n_win_cols) * ws + t % ws
            yo, xo = (y + shift) % hp, (x + shift) % wp  # rolled back by the shift
            if yo < h and xo < w:
                cells[win, t] = (yo >> k) * run.cols + (xo >> k)
            if shift:
                regions[win, t] = region(y, hp) * 3 + region(x, wp)
    visible = regions[:, :, None] == regions[:, None, :]
    return cells, visible


def _brute_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    run = _RUNS[-1]
    run.calls += 1
    assert not dropout
    block = run.block_of[module]
    cells, visible = _window_keys(run, block)
    bias = module.relative_position_bias().double()  # [1, H, N, N]
    mask = attention_mask.double() - bias
    n_windows = cells.shape[0]
    assert query.shape[0] == n_windows, (query.shape, n_windows)
    # the model's shift mask is -100 exactly where this geometry hides a key
    hidden = torch.where(visible, 0.0, -100.0).double()[:, None]
    assert torch.allclose(mask.expand(n_windows, *mask.shape[1:]), hidden, atol=1e-4)
    s = query.double() @ key.double().transpose(-1, -2) * scaling + bias
    vis = visible[:, None]
    if run.factors is not None:
        f = torch.where(cells >= 0, run.factors[cells.clamp(min=0)], 1.0)[:, None, None, :]
        if run.mode == "paper":
            m = s.masked_fill(~vis, math.inf).amin(dim=-1, keepdim=True)
            s = m + f * (s - m)
        else:
            s = s + torch.log(f)
    p = torch.softmax(s.masked_fill(~vis, -math.inf), dim=-1)
    return (p @ value.double()).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(BRUTE, _brute_attention)


@contextlib.contextmanager
def _brute_mode(model):
    previous = model.config._attn_implementation
    run = _Run(model)
    hooks = [block.register_forward_pre_hook(
        lambda mod, args: run.dims.__setitem__(mod, tuple(int(d) for d in args[1])))
        for block in run.merges_after]
    model.set_attn_implementation(BRUTE)
    _RUNS.append(run)
    try:
        with torch.no_grad():
            yield run
    finally:
        _RUNS.pop()
        for h in hooks:
            h.remove()
        model.set_attn_implementation(previous)


def _final_grid(model, inputs):
    """(rows, cols) of the last stage's input, recorded by a hook in a plain forward."""
    seen = []
    block = model.base_model.encoder.layers[-1].blocks[0]
    hook = block.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[1])))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return tuple(int(d) for d in seen[0])


def brute_force_swin(model, inputs: dict, positions, *, cls: int = CLASS, factor: float = 0.1,
                     mode: str = "paper") -> torch.Tensor:
    """[1, len(positions)] rise of the class's cross-entropy, one forward per final cell."""
    rows, cols = _final_grid(model, inputs)
    with _brute_mode(model) as run:
        run.cols, run.mode = cols, mode

        def loss():
            logits = model(**inputs).logits[0].double()
            return -torch.log_softmax(logits, -1)[cls]

        base = loss()
        assert run.calls == sum(len(s.blocks) for s in model.base_model.encoder.layers)
        out = []
        for u in positions:
            run.factors = torch.ones(rows * cols, dtype=torch.float64)
            run.factors[u] = factor
            out.append(loss() - base)
    return torch.stack(out)[None]


def _close(actual, expected):
    actual, expected = actual.double(), expected.double()
    peak = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert peak > 1e-3, f"degenerate test: scores too small ({peak})"
    assert err <= REL * peak, f"max error {err:.3g} > {REL} x peak {peak:.3g}"


# --------------------------------------------------------------------------- tests
@needs_routing
@pytest.mark.parametrize("case", list(CASES))
def test_factors_one_equal_eager(case):
    """'atman' with factors 1 (plain, and with the explainer's window layouts, which turn the
    -100 entries into excluded keys) gives eager's logits."""
    from atman_kernels import suppression
    from atman_kernels.explain.front.swin import swin_units
    from atman_kernels.suppression import key_layouts

    config, size = CASES[case]
    model = swin(**config)
    x = pixels(size)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values=x).logits
        with atman_attention(model):
            plain = model(pixel_values=x).logits
            image = swin_units(model, x)
            with key_layouts(image.layouts), suppression(torch.ones(1, len(image.units))):
                laid_out = model(pixel_values=x).logits
    assert model.config._attn_implementation == "eager"
    assert any(layout.visible is not None and not bool(layout.visible.all())
               for layout in image.layouts.values())  # some keys are masked by the shift
    torch.testing.assert_close(plain, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(laid_out, eager, rtol=1e-5, atol=1e-5)


@needs_routing
@pytest.mark.parametrize("mode", ["paper", "log"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_cell_matches_brute_force(case, mode):
    config, size = CASES[case]
    model = swin(**config)
    x = pixels(size)
    expl = AtManExplainer(model, progress=False, mode=mode, batch_size=5).explain(x, CLASS)
    grid = _final_grid(model, {"pixel_values": x})
    assert expl.patch_grid == grid
    n = grid[0] * grid[1]
    assert list(expl.positions) == list(range(n))
    assert expl.settings["granularity"] == "cell"
    patch = config["patch_size"] * 4  # two mergings
    assert expl.settings["cell_pixels"] == [patch, patch]
    expected = brute_force_swin(model, {"pixel_values": x}, range(n), mode=mode)
    _close(expl.per_target, expected)


@needs_routing
def test_paper_mode_minimum_ignores_the_shift_mask():
    """The same brute force with the -100 entries scored as ordinary keys in the row minimum
    gives other numbers, so the comparison above does tell a mask from a score."""
    config, size = CASES["divides"]
    model = swin(**config)
    x = pixels(size)
    expl = AtManExplainer(model, progress=False, batch_size=16).explain(x, CLASS)

    def min_over_all_keys(module, query, key, value, attention_mask, dropout=0.0,
                          scaling=None, **kwargs):
        run = _RUNS[-1]
        run.calls += 1
        cells, _ = _window_keys(run, run.block_of[module])
        s = query.double() @ key.double().transpose(-1, -2) * scaling + attention_mask.double()
        factors = run.factors if run.factors is not None else torch.ones(cells.max() + 1)
        f = torch.where(cells >= 0, factors[cells.clamp(min=0)], 1.0)[:, None, None, :]
        m = s.amin(dim=-1, keepdim=True)
        p = torch.softmax(m + f * (s - m), dim=-1)
        return (p @ value.double()).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(BRUTE, min_over_all_keys)
    try:
        wrong = brute_force_swin(model, {"pixel_values": x}, range(16))
    finally:
        AttentionInterface.register(BRUTE, _brute_attention)
    assert float((expl.per_target - wrong).abs().max()) > 100 * REL * float(wrong.abs().max())


@needs_routing
def test_window_attention_that_bypasses_atman_is_refused():
    """The routed-layer guard holds for Swin: a block whose attention never reaches 'atman'
    (computed by hand here) makes the explanation fail instead of ignoring that block."""
    config, size = CASES["divides"]
    model = swin(**config)
    attention = model.base_model.encoder.layers[1].blocks[1].attention
    routed = attention.forward

    def by_hand(hidden_states, attention_mask=None, **kwargs):
        previous = attention.config._attn_implementation
        attention.config._attn_implementation = "eager"
        try:
            return routed(hidden_states, attention_mask, **kwargs)
        finally:
            attention.config._attn_implementation = previous

    attention.forward = by_hand
    with pytest.raises(NotImplementedError, match="SwinForImageClassification.*never went"):
        AtManExplainer(model, progress=False).explain(pixels(size), CLASS)


@needs_routing
def test_layout_made_for_another_size_is_refused():
    from atman_kernels import suppression
    from atman_kernels.explain.front.swin import swin_units
    from atman_kernels.suppression import key_layouts

    model = swin(**CASES["pads"][0])
    with torch.no_grad(), atman_attention(model):
        layouts = swin_units(model, pixels((56, 56))).layouts
        with key_layouts(layouts), suppression(torch.ones(1, 16)), pytest.raises(
                ValueError, match="SwinForImageClassification.*another input size"):
            model(pixel_values=pixels((32, 32)))


@needs_routing
def test_auto_batch_sizes_swin_by_its_stage_tokens_not_its_cells():
    from atman_kernels.explain.batching import bytes_per_variant
    from atman_kernels.explain.front.swin import WindowedClassificationTask, swin_units

    config, size = CASES["pads"]
    model = swin(**config)
    image = swin_units(model, pixels(size))
    task = WindowedClassificationTask(model, image.model_inputs, len(image.units), [CLASS],
                                      layouts=image.layouts)
    queries, keys = task.attention_shape
    assert queries > task.seq_len and keys < queries  # stage-0 tokens, one window's keys
    per = bytes_per_variant(model.config, len_q=queries, len_k=keys, n_logits=1)
    explainer = AtManExplainer(model, progress=False, max_memory=3 * per + 1)
    explainer.explain(pixels(size), CLASS)
    assert explainer.last_stats["chunk_size"] == 3


@needs_routing
def test_suppression_without_window_layouts_is_refused():
    """Factors over positions would land on each window's first keys: refused, naming the
    module, before any result (factors 1 included: the call cannot be placed either way)."""
    from atman_kernels import suppression

    model = swin(**CASES["pads"][0])
    x = pixels(CASES["pads"][1])
    with torch.no_grad(), atman_attention(model):
        model(pixel_values=x)  # no suppression in force: plain attention
        for factors in (torch.ones(1, 16), torch.full((2, 16), 0.1)):
            with suppression(factors), pytest.raises(
                    NotImplementedError, match="SwinAttention.*attends within windows"):
                model(pixel_values=x.expand(factors.shape[0], -1, -1, -1))


@needs_routing
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(conceptual_threshold=0.7), "conceptual suppression is not defined"),
    (dict(layers=[0]), "layers= is not supported"),
])
def test_swin_options_without_a_meaning_are_refused(kwargs, match):
    model = swin(**CASES["divides"][0])
    calls = []
    model.base_model.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        AtManExplainer(model, progress=False, **kwargs).explain(pixels((32, 32)), CLASS)
    assert not calls


@needs_routing
@pytest.mark.parametrize(("inputs", "match"), [
    (torch.randn(2, 3, 32, 32), r"\[1, C, H, W\]"),
    (torch.randn(1, 1, 32, 32), "1 channels"),
    ({"pixel_values": torch.randn(1, 3, 32, 32), "labels": 1}, "labels"),
])
def test_bad_pixels_fail_before_any_forward(inputs, match):
    model = swin(**CASES["divides"][0])
    calls = []
    model.base_model.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=match):
        AtManExplainer(model, progress=False).explain(inputs, CLASS)
    assert not calls


@pytest.mark.parametrize("family", ["Swinv2", "DonutSwin"])
def test_swin_variants_that_compute_attention_by_hand_are_refused(family):
    """Swinv2 (cosine attention, continuous position bias) and DonutSwin compute their
    attention without transformers' attention interface: refused, naming the class."""
    cfg = getattr(T, f"{family}Config")(image_size=32, patch_size=2, embed_dim=16,
                                        depths=[1, 1], num_heads=[2, 2], window_size=4,
                                        **LABELS)
    model = getattr(T, f"{family}ForImageClassification")(cfg).eval()
    with pytest.raises(NotImplementedError, match=f"{family}ForImageClassification"):
        AtManExplainer(model, progress=False).explain(pixels((32, 32)), CLASS)


@pytest.mark.skipif(ROUTES, reason="this transformers' Swin routes its attention: explained")
def test_swin_that_does_not_route_is_refused():
    model = swin(**CASES["divides"][0])
    with pytest.raises(NotImplementedError, match="Swin.*AttentionInterface"):
        AtManExplainer(model, progress=False).explain(pixels((32, 32)), CLASS)
