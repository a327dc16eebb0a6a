"""Explanation serialisation and rendering (HTML, PNG, terminal) on hand-made explanations."""

from __future__ import annotations

import html
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from atman_kernels.explain import Explanation
from atman_kernels.explain.explanation import combine_scores
from atman_kernels.explain.render import (
    _target_heatmap_png,
    save_png,
    score_rgb,
    to_html,
    to_terminal,
)
from atman_kernels.explain.units import Span

TOKENS = ["The", " <b>capital</b>", " of", " \"France\"", " &", " is\n", " 'x'"]


def text_explanation() -> Explanation:
    per_target = torch.tensor([[0.5, 2.0, -0.25, 3.0, 0.0, -1.0, 0.125],
                               [0.1, 0.2, 0.3, -0.4, 0.0, 0.6, 0.7]])
    return Explanation(
        tokens=TOKENS, scores=per_target.sum(0), per_target=per_target,
        target_tokens=[" Paris", "!"], kind="causal_lm", token_ids=list(range(7)),
        baseline_loss=torch.tensor([0.3, 1.7]),
        settings={"factor": 0.1, "conceptual_threshold": None, "mode": "paper",
                  "target": " Paris!", "layers": (0, 2)},
    )


def image_explanation() -> Explanation:
    scores = torch.linspace(-1, 2, 12)
    return Explanation(tokens=[f"patch{i}" for i in range(12)], scores=scores,
                       per_target=scores[None], target_tokens=["cat"], kind="image",
                       patch_grid=(3, 4), positions=list(range(1, 13)))


def test_dict_and_json_round_trip_exactly(tmp_path):
    expl = text_explanation()
    back = Explanation.from_dict(json.loads(json.dumps(expl.to_dict())))
    assert back.tokens == expl.tokens and back.target_tokens == expl.target_tokens
    assert torch.equal(back.per_target, expl.per_target.double())
    assert torch.equal(back.scores, expl.scores.double())
    assert torch.equal(back.baseline_loss, expl.baseline_loss.double())
    assert back.settings["layers"] == [0, 2] and back.settings["conceptual_threshold"] is None
    path = tmp_path / "e.json"
    expl.to_json(path)
    again = Explanation.from_json(path)
    assert again.to_dict() == back.to_dict()
    assert Explanation.from_json(expl.to_json()).to_dict() == back.to_dict()
    img = Explanation.from_dict(image_explanation().to_dict())
    assert img.patch_grid == (3, 4) and img.positions == list(range(1, 13))


def test_explanation_validates_shapes():
    with pytest.raises(ValueError, match="scores must have shape"):
        Explanation(tokens=["a", "b"], scores=torch.zeros(3), per_target=torch.zeros(1, 2),
                    target_tokens=["t"], kind="causal_lm")
    with pytest.raises(ValueError, match="kind"):
        Explanation(tokens=["a"], scores=torch.zeros(1), per_target=torch.zeros(1, 1),
                    target_tokens=["t"], kind="audio")
    with pytest.raises(ValueError, match="patch_grid"):
        Explanation(tokens=["a", "b"], scores=torch.zeros(2), per_target=torch.zeros(1, 2),
                    target_tokens=["t"], kind="image", patch_grid=(2, 2))


def test_html_is_self_contained_and_escapes_every_token(tmp_path):
    expl = text_explanation()
    page = to_html(expl, tmp_path / "e.html")
    assert (tmp_path / "e.html").read_text(encoding="utf-8") == page
    for tok in TOKENS:
        assert html.escape(tok) in page  # the unit's own text, line breaks kept
    assert "<b>capital" not in page  # raw markup from a token never reaches the page
    assert "http" not in page.lower() and "<link" not in page and "src=" not in page
    assert "<style>" in page and "Paris!" in page and "factor=0.1" in page
    # strongest positive token in full red, strongest negative in blue-ish
    r, g, b = score_rgb(1.0)
    assert f"rgb({r},{g},{b})" in page and score_rgb(-1.0) == (0, 0, 255)
    grid = to_html(image_explanation())
    assert grid.count("<td style") == 12


def test_png_text_has_requested_width(tmp_path):
    expl = text_explanation()
    size = save_png(expl, tmp_path / "t.png", width=640)
    with Image.open(tmp_path / "t.png") as img:
        assert img.format == "PNG" and img.size == size and img.size[0] == 640
        assert img.size[1] > 60
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 22)}
    assert (255, 0, 0) in colours  # the top token's box is full red
    many = Explanation(tokens=["word"] * 300, scores=torch.ones(300),
                       per_target=torch.ones(1, 300), target_tokens=["x"], kind="causal_lm")
    w, h = save_png(many, tmp_path / "many.png", width=640)
    assert w == 640 and h > size[1]  # wraps into more lines


def test_png_image_heatmap_sizes(tmp_path):
    expl = image_explanation()
    assert save_png(expl, tmp_path / "bare.png") == (4 * 32, 3 * 32)
    picture = torch.rand(3, 12, 16)
    size = save_png(expl, tmp_path / "over.png", image=picture)
    assert size == (16 * 19, 12 * 19)  # integer scale making the short side >= 224
    with Image.open(tmp_path / "over.png") as img:
        assert img.size == size


def test_terminal_rendering():
    expl = text_explanation()
    coloured = to_terminal(expl, color=True)
    prompt, target = coloured.rsplit("\n", 1)
    assert prompt.count("\x1b[48;2;") == len(TOKENS) and prompt.endswith("\x1b[0m")
    assert target == "target (p = 0.135): ' Paris' '!'"  # no unit there: nothing coloured
    plain = to_terminal(expl, color=False)
    assert "\x1b" not in plain and "capital</b>[2.2]" in plain
    grid = to_terminal(image_explanation(), color=False).splitlines()
    assert len(grid) == 4 and grid[3] == "label: 'cat'"


def test_combine_scores_options():
    per = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 0.5]])
    assert torch.equal(combine_scores(per, "none", False), torch.tensor([0.0, -1.0, 1.0]))
    assert torch.equal(combine_scores(per, "abs", False), torch.tensor([2.0, 3.0, 1.0]))
    assert torch.equal(combine_scores(per, "square", False), torch.tensor([2.0, 5.0, 0.5]))
    assert torch.allclose(combine_scores(per, "none", True), torch.tensor([0.5, 0.0, 1.0]))
    assert torch.equal(combine_scores(torch.ones(1, 3), "none", True), torch.zeros(3))
    with pytest.raises(ValueError, match="postprocess"):
        combine_scores(per, "log", False)


def test_top_orders_by_score():
    top = text_explanation().top(2)
    assert [t[0] for t in top] == [3, 1]


def test_json_is_strict_and_round_trips_nan_and_inf(tmp_path):
    per_target = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.5]])
    expl = Explanation(tokens=list("abcd"), scores=per_target[0], per_target=per_target,
                       target_tokens=["t"], kind="causal_lm",
                       settings={"odd": float("nan")})
    text = expl.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = Explanation.from_json(text)
    assert back.to_dict()["format_version"] == 3
    assert torch.equal(back.per_target.isnan(), per_target.isnan())
    assert back.per_target[0, 1] == float("inf") and back.per_target[0, 2] == -float("inf")
    assert back.per_target[0, 3] == 1.5 and back.settings["odd"] == "NaN"


def test_format_1_files_still_load_and_newer_versions_are_refused():
    old = {"kind": "causal_lm", "tokens": ["a", "b"], "scores": [1.0, None],
           "per_target": [[1.0, None]], "target_tokens": ["t"], "positions": [0, 1],
           "token_ids": [5, 6], "settings": {}}
    back = Explanation.from_dict(old)
    assert back.scores[0] == 1.0 and back.scores[1].isnan()
    assert [s.positions for s in back.spans] == [(0,), (1,)]
    with pytest.raises(ValueError, match="newer than this package reads"):
        Explanation.from_dict({**old, "format_version": 99})


def test_terminal_colour_follows_the_terminal_and_no_color(monkeypatch):
    expl = text_explanation()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[" in to_terminal(expl)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in to_terminal(expl)
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    assert "\x1b" not in to_terminal(expl)  # a file or a pipe gets no escapes


def test_notebook_repr_and_per_target_heatmap():
    expl = text_explanation()  # two target tokens
    page = expl._repr_html_()
    assert page.startswith("<!DOCTYPE html>") and "Per target token" in page
    assert page.count("<tr><th>") >= 2  # one heatmap row per target token
    assert "chars" in page or "position" in page  # where each top unit is


def causal_with_target_unit(contrast: bool = False) -> Explanation:
    """Prompt "The capital is" (3 token units), target " Paris" "!" " ok": " Paris" and "!"
    are units too (source "target"), the last target token is not."""
    prompt = "The capital is"
    spans = [Span("The", 0, 3, (0,)), Span(" capital", 3, 11, (1,)), Span(" is", 11, 14, (2,)),
             Span(" Paris", None, None, (3,), source="target"),
             Span("!", None, None, (4,), source="target")]
    per_target = torch.tensor([[0.0, 3.0, -0.5, 0.0, 0.0],
                               [0.2, 1.5, 0.3, 2.0, 0.0],
                               [-0.6, 0.1, 0.0, 0.9, -1.2]], dtype=torch.float64)
    extra = {}
    if contrast:
        extra = {"contrast_tokens": [" Rome"], "contrast_per_target": torch.zeros(1, 5),
                 "contrast_baseline_loss": torch.tensor([2.0])}
    return Explanation(tokens=[], scores=per_target.sum(0), per_target=per_target,
                       target_tokens=[" Paris", "!", " ok"], kind="causal_lm", spans=spans,
                       prompt=prompt, token_ids=[1, 2, 3, 4, 5],
                       baseline_loss=torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64),
                       settings={"target": " Paris! ok"}, **extra)


@pytest.fixture()
def drawn_texts(monkeypatch):
    """Every text the PNG renderer draws, with its position (it is still drawn)."""
    from PIL import ImageDraw

    texts = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        texts.append((tuple(xy), text))
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return texts


def test_the_target_is_shown_apart_from_the_prompt_with_its_probability(tmp_path, drawn_texts):
    expl = causal_with_target_unit(contrast=True)
    p = f"{math.exp(-0.7):.3g}"
    # terminal: the prompt alone on its line(s), then the target's line and the foil's
    lines = to_terminal(expl, color=False).splitlines()
    assert lines[0] == "The[-0.4] capital[4.6] is[-0.2]"
    assert lines[1] == f"target (p = {p}): ' Paris'[2.9] '!'[-1.2] ' ok'"
    assert lines[2] == f"rather than (p = {math.exp(-2.0):.3g}): ' Rome'"
    coloured = to_terminal(expl, color=True).splitlines()
    assert coloured[1].count("\x1b[48;2;") == 2  # the two target units, the last plain
    # HTML: the prompt's text holds no target token; the target follows in its own block
    page = to_html(expl)
    text = page.split('<div class="text">', 1)[1]
    prompt_part, answer = text.split('<div class="answer">', 1)
    assert "Paris" not in prompt_part and "capital" in prompt_part
    assert answer.startswith(f'<span class="label">target (p = {p}):</span>')
    assert answer.index("Paris") < answer.index("!") < answer.index(" ok")
    assert "rather than (p = " in page
    # PNG: the target's label below every prompt word, its tokens on the label's line
    save_png(expl, tmp_path / "t.png")
    prompt_y = max(xy[1] for xy, t in drawn_texts if t in ("The", "capital", "is"))
    (at,) = [k for k, (_, t) in enumerate(drawn_texts) if t == f"target (p = {p}):"]
    label_xy = drawn_texts[at][0]
    assert label_xy[1] > prompt_y
    targets = [xy for xy, t in drawn_texts[at:] if t in (" Paris", "!", " ok")]
    assert len(targets) == 3 and all(abs(y - label_xy[1]) < 20 and x > label_xy[0]
                                     for x, y in targets)
    assert [x for x, _ in targets] == sorted(x for x, _ in targets)


def test_png_draws_the_per_target_heatmap_with_a_numbered_scale(tmp_path, drawn_texts):
    expl = causal_with_target_unit()
    heat, cells = _target_heatmap_png(expl, 640)
    pixels = heat.convert("RGB").load()
    assert len(cells) == 3 * 5 and {(t, j) for t, j, _ in cells} == {
        (t, j) for t in range(3) for j in range(5)}
    for t, j, (x0, y0, x1, y1) in cells:
        value = float(expl.per_target[t, j]) / 3.0  # the heatmap's own scale: peak 3 nats
        assert pixels[(x0 + x1) // 2, (y0 + y1) // 2] == score_rgb(value), (t, j)
    boxes = {(t, j): box for t, j, box in cells}
    assert boxes[0, 0][1] < boxes[1, 0][1] < boxes[2, 0][1]  # a row per target token
    assert boxes[0, 0][0] < boxes[0, 1][0] < boxes[0, 4][0]  # a column per unit, in order
    texts = [t for _, t in drawn_texts]
    assert "-3" in texts and "0" in texts and "+3 nats" in texts  # the scale's numbers
    assert "' Paris'" in texts and " capital" in texts  # row and column labels
    drawn_texts.clear()
    w, h = save_png(expl, tmp_path / "h.png", width=640)
    texts = [t for _, t in drawn_texts]
    assert any(t.startswith("Per target token") and "(nats)" in t for t in texts)
    assert "+3 nats" in texts and "+4.6 nats" in texts  # heatmap scale, score scale
    with Image.open(tmp_path / "h.png") as im:
        png = np.asarray(im.convert("RGB"))
    part = np.asarray(heat.convert("RGB"))
    hits = [y for y in range(h - part.shape[0] + 1) if np.array_equal(png[y:y + part.shape[0]],
                                                                      part)]
    assert len(hits) == 1  # the heatmap is drawn into the PNG, whole
    drawn_texts.clear()
    one = Explanation(tokens=["a", "b"], scores=torch.ones(2), per_target=torch.ones(1, 2),
                      target_tokens=["x"], kind="causal_lm")
    save_png(one, tmp_path / "one.png")
    assert not any(t.startswith("Per target token") for _, t in drawn_texts)


def test_wide_heatmaps_continue_in_bands_of_legible_cells():
    n = 120
    per_target = torch.linspace(-1, 1, 2 * n).reshape(2, n)
    expl = Explanation(tokens=[f"w{i}" for i in range(n)], scores=per_target.sum(0),
                       per_target=per_target, target_tokens=["x", "y"], kind="causal_lm")
    heat, cells = _target_heatmap_png(expl, 640)
    assert heat.size[0] == 640 and len(cells) == 2 * n
    assert all(x1 - x0 >= 12 and 0 <= x0 and x1 < 640 for _, _, (x0, _, x1, _) in cells)
    tops = sorted({y0 for t, _, (_, y0, _, _) in cells if t == 0})
    assert len(tops) >= 3  # 120 units of >= 14 px do not fit in one 640 px band
