"""Rendering of image-text explanations (HTML, PNG, terminal): hand-made and on tiny models.

The maps are checked where they land: a strongly positive unit must show red at the centre of
its box in the picture (its rectangle in the original picture's pixels), a negative one blue,
and the panels drawn into the PNG and the HTML page must be those pictures.
"""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_image_text import PROMPT, TARGET, tiny_idefics3, tiny_llava

from atman_kernels.explain import AtManExplainer, Explanation, Span
from atman_kernels.explain.render import (
    save_png,
    score_rgb,
    segments,
    to_html,
    to_terminal,
    view_image,
)

GREY = 128


def hand_made(images=True, boxes=True) -> Explanation:
    """A 60 x 40 picture (w x h) split 2 x 2, prompt " what is this ?" after the image, and
    a target of two tokens. Cell (1, 1) strongly supports, cell (0, 0) opposes."""
    prompt = " what is this ?"
    text = [Span(" what", 0, 5, (5,)), Span(" is", 5, 8, (6,)), Span(" this", 8, 13, (7,)),
            Span(" ?", 13, 15, (8,))]
    cell_boxes = [(0, 0, 30, 20), (30, 0, 60, 20), (0, 20, 30, 40), (30, 20, 60, 40)]
    image = [Span(f"image 0 whole ({k // 2},{k % 2})", None, None, (1 + k,), source="image",
                  image=0, box=cell_boxes[k] if boxes else None) for k in range(4)]
    target = [Span(" a", None, None, (9,), source="target")]
    spans = image + text + target  # in position order
    scores = torch.tensor([-2.0, 0.0, 0.1, 4.0, 0.5, -0.2, 1.0, 0.3, 0.4], dtype=torch.float64)
    pictures = [np.full((40, 60, 3), GREY, dtype=np.uint8)] if images else None
    return Explanation(tokens=[], scores=scores, per_target=scores[None], target_tokens=[" dog"],
                       kind="image_text", spans=spans, prompt=prompt,
                       image_views=[{"image": 0, "view": "whole", "grid": [2, 2],
                                     "cells": [0, 1, 2, 3]}],
                       settings={"target": " a dog"}, images=pictures)


def is_red(px) -> bool:
    r, g, b = (int(x) for x in px[:3])
    return r > 180 and g < 90 and b < 90


def is_blue(px) -> bool:
    r, g, b = (int(x) for x in px[:3])
    return b > r + 40 and b > g + 40


def find(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    """Every (x, y) where ``small`` appears pixel for pixel in ``big``."""
    h, w = small.shape[:2]
    ys, xs = np.nonzero((big[: big.shape[0] - h + 1, : big.shape[1] - w + 1]
                         == small[0, 0]).all(-1))
    return [(int(x), int(y)) for y, x in zip(ys, xs, strict=True)
            if np.array_equal(big[y:y + h, x:x + w], small)]


def centre(box, scale):
    return (int((box[0] + box[2]) / 2 * scale), int((box[1] + box[3]) / 2 * scale))


# ------------------------------------------------------------------------------ hand-made
def test_positive_cell_red_negative_blue_at_their_boxes():
    expl = hand_made()
    img = np.asarray(view_image(expl, 0, side=300))
    assert img.shape == (200, 300, 3)  # the picture's 3:2 kept, longer side 300
    scale = 300 / 60
    assert is_red(img[centre((30, 20, 60, 40), scale)[::-1]])  # score 4 = the peak: red
    assert is_blue(img[centre((0, 0, 30, 20), scale)[::-1]])  # score -2: half-way to blue
    zero = img[centre((30, 0, 60, 20), scale)[::-1]]  # score 0: the grey picture, veiled
    assert not is_red(zero) and not is_blue(zero) and abs(int(zero[0]) - int(zero[2])) < 3


def test_without_boxes_the_grid_is_stretched_and_without_picture_bare():
    stretched = np.asarray(view_image(hand_made(boxes=False), 0, side=300))
    assert stretched.shape == (200, 300, 3)
    assert is_red(stretched[150, 225]) and is_blue(stretched[50, 75])
    bare = np.asarray(view_image(hand_made(images=False), 0, side=300))
    assert bare.shape == (300, 300, 3)  # square cells: 150 px each
    assert tuple(bare[225, 225]) == score_rgb(1.0) and tuple(bare[75, 75]) == score_rgb(-0.5)


def test_png_holds_the_picture_with_its_map_and_the_text(tmp_path):
    expl = hand_made()
    w, h = save_png(expl, tmp_path / "vl.png", width=640)
    with Image.open(tmp_path / "vl.png") as im:
        png = np.asarray(im.convert("RGB"))
    assert png.shape == (h, w, 3) and w == 640
    panel = np.asarray(view_image(expl, 0, side=384))
    where = find(png, panel)
    assert len(where) == 1, "the whole-picture map appears once in the PNG"
    x, y = where[0]
    cx, cy = centre((30, 20, 60, 40), 384 / 60)
    assert is_red(png[y + cy, x + cx])
    # the text is below the picture: red boxes there come from the text units only
    below = png[y + panel.shape[0]:]
    assert (below == score_rgb(1 / 4)).all(-1).any()  # " this" (score 1 of peak 4)


def test_html_embeds_the_maps_and_shows_no_image_unit_as_text():
    expl = hand_made()
    page = to_html(expl)
    assert "http" not in page.lower() and "<link" not in page
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 2  # the picture, and its map (colours with their opacity) above it
    with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as pic, \
            Image.open(io.BytesIO(base64.b64decode(uris[1]))) as layer:
        assert layer.mode == "RGBA"
        embedded = np.asarray(Image.alpha_composite(pic.convert("RGBA"), layer).convert("RGB"))
    # at full opacity (the slider's start) the page shows exactly the blended view
    assert np.abs(embedded.astype(int) - np.asarray(view_image(expl, 0, side=384))).max() <= 1
    text_div = page.split('<div class="text">', 1)[1].split("</div>", 1)[0]
    assert "image 0" not in text_div and html.escape(" what") in text_div
    assert 'class="tok target"' in text_div  # the explained target token, outlined
    r, g, b = score_rgb(0.5 / 4)  # " what" on the same scale as the image (peak 4)
    assert f"background:rgb({r},{g},{b})" in text_div
    assert "text and image alike" in page


def test_segments_and_terminal_keep_images_out_of_the_text():
    expl = hand_made()
    pieces = segments(expl)
    assert "".join(t for t, _ in pieces) == " what is this ? a"
    assert all(expl.spans[i].source != "image" for _, i in pieces if i is not None)
    out = to_terminal(expl, color=False).splitlines()
    assert out[0] == " what[0.5] is[-0.2] this[1] ?[0.3]"
    assert out[1] == "target: ' a'[0.4]"  # the target apart from the prompt
    assert out[2] == "image 0, whole view (2 x 2 cells):"
    assert out[3].split() == ["-2.000", "+0.000"] and out[4].split() == ["+0.100", "+4.000"]
    assert to_terminal(expl, color=True).count("\x1b[48;2;") == 5 + 4


def test_pictures_given_again_after_json(tmp_path):
    expl = hand_made()
    back = Explanation.from_json(expl.to_json())
    assert back.images is None and back.spans == expl.spans
    assert np.array_equal(np.asarray(view_image(back, 0, picture=expl.images[0])),
                          np.asarray(view_image(expl, 0)))
    assert to_html(back, images=expl.images) == to_html(expl)
    assert "(no picture given)" in to_html(back)
    save_png(back, tmp_path / "b.png", images=expl.images)
    save_png(expl, tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_view_requests_are_refused():
    expl = hand_made()
    with pytest.raises(ValueError, match=r"no image view \(0, 'global'\)"):
        view_image(expl, 0, "global")
    with pytest.raises(ValueError, match="side must be an int >= 16"):
        view_image(expl, 0, side=4)
    text_only = Explanation(tokens=["a"], scores=torch.ones(1), per_target=torch.ones(1, 1),
                            target_tokens=["b"], kind="causal_lm")
    with pytest.raises(ValueError, match="image-text explanation"):
        view_image(text_only)


# ----------------------------------------------------------------------------- tiny models
def _with_scores(expl: Explanation, scores: torch.Tensor) -> Explanation:
    return Explanation(tokens=[], scores=scores, per_target=scores[None],
                       target_tokens=["x"], kind="image_text", spans=expl.spans,
                       prompt=expl.prompt, image_views=expl.image_views, images=expl.images)


def _picture(h=50, w=80):
    rng = np.random.default_rng(0)
    base = np.array([60, 160, 60], dtype=np.int64)  # green, so red and blue are the map's
    return np.clip(base + rng.integers(-10, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("make", [tiny_llava, tiny_idefics3], ids=["llava", "idefics3"])
@pytest.mark.parametrize("region", [None, 2])
def test_a_strong_cell_is_red_at_its_box_on_a_real_model(make, region, tmp_path):
    model, processor = make(11)
    picture = _picture()
    expl = AtManExplainer(model, processor, progress=False).explain(
        (PROMPT, [picture]), TARGET, image_region=region)
    assert expl.images is not None and len(expl.images) == 1
    whole = next(v for v in expl.image_views if v["view"] == "whole")
    rows, cols = whole["grid"]
    # one unit away from the top-left corner made the strongest, every other unit near 0
    unit = whole["cells"][(rows - 1) * cols + cols - 1]
    scores = torch.full((len(expl.spans),), 0.01, dtype=torch.float64)
    scores[unit] = 5.0
    strong = _with_scores(expl, scores)
    box = strong.spans[unit].box
    assert box is not None and box[2] > box[0] and box[3] > box[1]
    side = 384
    scale = side / 80
    img = np.asarray(view_image(strong, 0, side=side))
    assert is_red(img[centre(box, scale)[::-1]])
    first = strong.spans[whole["cells"][0]].box
    assert not is_red(img[centre(first, scale)[::-1]])  # elsewhere the green picture shows
    # in the PNG: the same panel, red at the same place
    save_png(strong, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        png = np.asarray(im.convert("RGB"))
    (x, y), = find(png, img)
    assert is_red(png[y + centre(box, scale)[1], x + centre(box, scale)[0]])
    views = {v["view"] for v in strong.image_views}
    page = to_html(strong)
    assert page.count("data:image/png;base64,") == 2 * len(views)  # picture and map each
    text = to_terminal(strong, color=False)
    assert f"image 0, whole view ({rows} x {cols} cells):" in text
    assert ("global view" in text) == ("global" in views)


def test_real_explanation_renders_text_without_image_units(tmp_path):
    model, processor = tiny_llava(12)
    expl = AtManExplainer(model, processor, progress=False).explain((PROMPT, [_picture()]),
                                                                    TARGET)
    text = "".join(t for t, _ in segments(expl))
    assert text.startswith(expl.prompt) and "image" not in text
    html_page = to_html(expl, tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == html_page
    size = save_png(expl, tmp_path / "r.png", width=500)
    assert size[0] == 500
