"""The explanation as a PNG drawn with Pillow: the text's boxes, the pictures' maps, the
per-target heatmap and the colour scale."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..explanation import ensure_parent as _ensure_parent
from .common import (
    _settings_text,
    _unit_scores,
    answer_lines,
    headline,
    legend_labels,
    prompt_segments,
    scale_labels,
    score_rgb,
)
from .maps import _image_heatmap, _view_images

if TYPE_CHECKING:
    from ..explanation import Explanation


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def save_png(
    expl: Explanation,
    path: str | Path,
    *,
    image: torch.Tensor | None = None,
    width: int = 800,
    images: Sequence[Any] | None = None,
) -> tuple[int, int]:
    """Write the explanation as a PNG and return its (width, height).

    Text: token boxes coloured by score, wrapped into lines ``width`` pixels wide, a title with
    the target and a colour legend. Images with a picture [3, H, W]: the heatmap blended over
    the picture, scaled up by the smallest integer that makes the shorter side >= 224 pixels.
    Images without a picture: the bare heatmap, 32 pixels per patch. Image-text: below the
    title, each picture's "whole" map (longer side ``min(384, width - 24)`` pixels) and its
    "global" map at half that size, left to right, then the prompt's text and the legend;
    ``images`` gives the pictures when ``expl.images`` is None (see :func:`to_html`).
    """
    from PIL import Image

    if expl.patch_grid is not None:
        img = _image_heatmap(expl, image if image is not None else expl.image)
    else:
        if width < 200:
            raise ValueError(f"width must be >= 200 pixels, got {width}")
        panels = None
        if expl.kind == "image_text":
            panels = _view_images(expl, images, side=min(384, width - 24))
        img = _text_boxes(expl, width, panels=panels)
    img.save(str(_ensure_parent(path)), format="PNG")
    assert isinstance(img, Image.Image)
    return img.size


def _text_boxes(expl: Explanation, width: int, panels: list | None = None):
    from PIL import Image, ImageDraw

    font, small = _font(16), _font(12)
    margin, pad, line_h = 12, 2, 30
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = f"AtMan: {headline(expl)}"
    units = _unit_scores(expl.scores)
    # pictures (image-text): left to right under the title, a caption above each, wrapped
    placed = []  # (x, y, picture, caption)
    x, y = margin, margin + 2 * 22
    row_h = 0
    for picture, caption in panels or []:
        w, h = picture.size
        if x + w > width - margin and x > margin:
            x, y, row_h = margin, y + row_h + 10, 0
        placed.append((x, y, picture, caption))
        x += w + 16
        row_h = max(row_h, 18 + h)
    if placed:
        y += row_h + 14
    boxes = []  # (x, y, w, text, rgb or None, outlined)
    right = width - margin

    def box(x: int, y: int, word: str, rgb, outlined: bool) -> tuple[int, int]:
        w = _text_width(probe, word, font) + (2 * pad if rgb or outlined else 0)
        w = min(w, right - margin)
        if x + w > right and x > margin:
            x, y = margin, y + line_h
            if word.isspace():
                return x, y
        boxes.append((x, y, w, word, rgb, outlined))
        return x + w, y

    # the prompt: wrapped at whitespace; a line break in the text is a line break in the picture
    x = margin
    for text, i in prompt_segments(expl):
        rgb = None if i is None else score_rgb(units[i])
        for line_no, line in enumerate(text.split("\n")):
            if line_no:
                x, y = margin, y + line_h
            for word in re.findall(r"\s+|\S+", line):
                x, y = box(x, y, word, rgb, False)
    # the target (and foil) apart: a line of their own, labelled, one outlined box per token
    labels = []  # (x, y, text)
    for label, pieces in answer_lines(expl):
        y += line_h + 6
        labels.append((margin, y + 7, f"{label}:"))
        x = margin + _text_width(probe, f"{label}:", small) + 8
        for text, i in pieces:
            shown = text.replace("\n", "\\n").replace("\t", "\\t")
            x, y = box(x, y, shown, None if i is None else score_rgb(units[i]), True)
            x += 4  # a gap between the target's tokens
    heat = None
    if expl.per_target.shape[0] > 1 and expl.patch_grid is None:
        heat, _ = _target_heatmap_png(expl, width)
        heat_y = y + line_h + 12
        y = heat_y + heat.size[1] - line_h
    legend_y = y + line_h + 10
    height = legend_y + 34
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, margin), title, fill=(20, 20, 20), font=font)
    draw.text((margin, margin + 22), _settings_text(expl), fill=(100, 100, 100), font=small)
    for px, py, picture, caption in placed:
        draw.text((px, py), caption, fill=(60, 60, 60), font=small)
        img.paste(picture, (px, py + 18))
    for lx, ly, text in labels:
        draw.text((lx, ly), text, fill=(90, 90, 90), font=small)
    for bx, by, w, text, rgb, outlined in boxes:
        if rgb is not None or outlined:
            draw.rectangle([bx, by, bx + w, by + line_h - 6], fill=rgb or (255, 255, 255),
                           outline=(90, 90, 90) if outlined else None)
        draw.text((bx + (pad if rgb or outlined else 0), by + 3), text, fill=(0, 0, 0),
                  font=font)
    if heat is not None:
        img.paste(heat, (0, heat_y))
    peak = float(expl.scores.abs().max()) if expl.scores.numel() else 0.0
    both = ", text and image alike" if expl.kind == "image_text" else ""
    _draw_scale(draw, margin, legend_y, peak,
                f"blue {legend_labels(expl)[0]} / red {legend_labels(expl)[1]} "
                f"(score, nats{both})")
    return img


def _draw_scale(draw, x: int, y: int, peak: float, caption: str, bar_w: int = 200) -> None:
    """A colour bar from -peak (blue) to +peak (red) at (x, y), its numbers below it
    (:func:`scale_labels`) and ``caption`` to its right."""
    small = _font(12)
    for i in range(bar_w):
        draw.line([(x + i, y), (x + i, y + 12)], fill=score_rgb(2.0 * i / (bar_w - 1) - 1.0))
    draw.rectangle([x, y, x + bar_w - 1, y + 12], outline=(150, 150, 150))
    left, middle, right = scale_labels(peak)
    draw.text((x, y + 15), left, fill=(60,) * 3, font=small)
    draw.text((x + bar_w // 2 - _text_width(draw, middle, small) // 2, y + 15), middle,
              fill=(60,) * 3, font=small)
    draw.text((x + bar_w - _text_width(draw, right, small), y + 15), right, fill=(60,) * 3,
              font=small)
    draw.text((x + bar_w + 8, y - 2), caption, fill=(60,) * 3, font=small)


def _short_label(text: str, limit: int) -> str:
    """A one-line label of at most ``limit`` characters (line breaks and tabs made visible)."""
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= limit else text[: limit - 2] + ".."


def _target_heatmap_png(expl: Explanation, width: int):
    """The target-token x unit heatmap as a PIL image ``width`` pixels wide: one row per target
    token (its text on the left), one column per unit (its text above, turned upright), each
    cell the rise of that token's cross-entropy when the unit is suppressed, coloured on the
    heatmap's own scale (the largest |cell|), labelled with its numbers below. Columns that do
    not fit in one band continue in the next band below. Returns (image, cells): cells the
    (target token, unit, (x0, y0, x1, y1)) box of every cell."""
    from PIL import Image, ImageDraw

    small = _font(12)
    margin, row_h, title_h = 12, 18, 22
    values = expl.per_target.detach().to(torch.float64).cpu()
    n_rows, n_units = values.shape
    peak = float(values.abs().max()) if values.numel() else 0.0
    scale = peak if peak > 0 and peak == peak else 1.0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_labels = [_short_label(repr(t), 16) for t in expl.target_tokens]
    col_labels = [_short_label(s.text, 12) for s in expl.spans]
    label_w = min(width // 4, max(_text_width(probe, t, small) for t in row_labels) + 8)
    avail = width - 2 * margin - label_w
    cell_w = max(14, min(40, avail // max(1, n_units)))
    per_band = max(1, avail // cell_w)
    bands = -(-n_units // per_band)
    col_h = max((_text_width(probe, t, small) for t in col_labels), default=0) + 6
    band_h = col_h + n_rows * row_h + 12
    height = title_h + bands * band_h + 34
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    boxes = []
    draw.text((margin, 2), "Per target token: rise of its cross-entropy when a unit is "
              "suppressed (nats)", fill=(20, 20, 20), font=small)
    for band in range(bands):
        y0 = title_h + band * band_h
        first = band * per_band
        for t, label in enumerate(row_labels):
            draw.text((margin, y0 + col_h + t * row_h + 2), label, fill=(40,) * 3, font=small)
        for j in range(first, min(n_units, first + per_band)):
            x = margin + label_w + (j - first) * cell_w
            text = col_labels[j]
            tag = Image.new("RGB", (max(1, _text_width(probe, text, small) + 2), 14), "white")
            ImageDraw.Draw(tag).text((1, 0), text, fill=(40,) * 3, font=small)
            tag = tag.rotate(90, expand=True)
            img.paste(tag, (x + max(0, (cell_w - tag.size[0]) // 2),
                            y0 + col_h - 3 - tag.size[1]))
            for t in range(n_rows):
                unit = max(-1.0, min(1.0, float(values[t, j]) / scale))
                cy = y0 + col_h + t * row_h
                cell = (x, cy, x + cell_w - 2, cy + row_h - 2)
                draw.rectangle(cell, fill=score_rgb(unit))
                boxes.append((t, j, cell))
    _draw_scale(draw, margin, height - 32, peak,
                "per target token: red = the unit supports it, blue = opposes it")
    return img, boxes
