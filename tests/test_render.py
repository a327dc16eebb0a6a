"""Explanation serialisation and rendering (HTML, PNG, terminal) on hand-made explanations."""

from __future__ import annotations

import html
import json

import pytest
import torch
from PIL import Image

from atman_kernels.explain import Explanation
from atman_kernels.explain.explanation import combine_scores
from atman_kernels.explain.render import save_png, score_rgb, to_html, to_terminal

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
    assert coloured.count("\x1b[48;2;") == len(TOKENS) and coloured.endswith("\x1b[0m")
    plain = to_terminal(expl, color=False)
    assert "\x1b" not in plain and "capital</b>[2.2]" in plain
    grid = to_terminal(image_explanation(), color=False)
    assert len(grid.splitlines()) == 3


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
    assert back.to_dict()["format_version"] == 2
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
