"""Render an :class:`~atman_kernels.explain.explanation.Explanation`: HTML, PNG, terminal.

Rendering reads an Explanation (the Explanation does not import this module):
:func:`to_html`, :func:`save_png` and :func:`to_terminal`. Text explanations show the prompt's
own text, its spacing and line breaks, with each explained unit (token, word, sentence, span)
highlighted; prompt text outside every unit is shown plain. The target is shown apart from
the prompt, on a line of its own labelled with the model's probability of it (``target (p =
0.7):``; a classifier's ``label``); a causal LM's target tokens but the last, which are explained
units too (they condition the later target tokens), are coloured and outlined there. A
contrastive explanation adds a line for the foil. When the target has several tokens, the HTML
page and the PNG add the target-token x unit heatmap (``per_target``), with its own colour scale.

Image-text explanations (kind "image_text") show each picture with its "whole" score map blended
over it (each image unit's rectangle in the original picture, ``Span.box``; without boxes the
grid stretched over the picture; without a picture the bare grid), a tiling model's "global"
view beside it at half the size, and the prompt's text below, highlighted as for text (image
tokens never appear as text). Pictures come from ``Explanation.images`` (not serialised) or are
passed again to the renderer after loading JSON.

Colours: each score is divided by the largest absolute score over *all* units (text and image
share one scale); positive values shade towards red (the unit supports the target), negative
towards blue, zero is white. Every colour scale is labelled with its numbers in nats (the
unit of every score). Every output is self-contained: the HTML page has inline CSS and
no external link (pictures are embedded as ``data:`` PNG), the PNG is drawn with Pillow.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .explanation import ensure_parent as _ensure_parent

if TYPE_CHECKING:
    from .explanation import Explanation


def _unit_scores(scores: torch.Tensor) -> list[float]:
    """Scores divided by the largest magnitude, in [-1, 1] (zeros when all are zero)."""
    s = scores.detach().to(torch.float64).cpu()
    peak = float(s.abs().max()) if s.numel() else 0.0
    if peak == 0.0 or peak != peak:
        return [0.0] * s.numel()
    return [max(-1.0, min(1.0, x / peak)) for x in s.tolist()]


def score_rgb(unit: float) -> tuple[int, int, int]:
    """RGB of a score in [-1, 1]: white at 0, red at +1, blue at -1."""
    fade = int(round(255 * (1.0 - abs(unit))))
    return (255, fade, fade) if unit >= 0 else (fade, fade, 255)


def segments(expl: Explanation) -> list[tuple[str, int | None]]:
    """The text to draw, as (text, unit index or None) pieces in reading order: the prompt's
    pieces (:func:`prompt_segments`), then a causal LM's explained target tokens (the units
    with ``source == "target"``). The renderers draw the two apart
    (:func:`prompt_segments`, :func:`target_segments`)."""
    targets = [i for i, s in enumerate(expl.spans) if s.source == "target"]
    return prompt_segments(expl) + [(expl.spans[i].text, i) for i in targets]


def prompt_segments(expl: Explanation) -> list[tuple[str, int | None]]:
    """The prompt to draw, as (text, unit index or None) pieces in reading order.

    With the prompt text and character ranges: the prompt cut at the units' ranges (text
    between units has index None). Without (token-id prompts): the prompt units' texts one
    after another. Target units (``source == "target"``, see :func:`target_segments`) and
    image units (``source == "image"``, drawn on their pictures, :func:`view_image`) are never
    part of it.
    """
    spans = expl.spans
    located = [i for i, s in enumerate(spans) if s.source == "prompt" and s.start is not None]
    pieces: list[tuple[str, int | None]] = []
    if expl.prompt is not None and located:
        text, cursor = expl.prompt, 0
        for i in sorted(located, key=lambda i: (spans[i].start, spans[i].end)):
            start, end = max(spans[i].start, cursor), spans[i].end
            if end <= start:  # wholly inside an earlier unit (tokens sharing a character)
                continue
            if start > cursor:
                pieces.append((text[cursor:start], None))
            pieces.append((text[start:end], i))
            cursor = end
        if cursor < len(text):
            pieces.append((text[cursor:], None))
    done = set(located) if pieces else set()
    pieces.extend((spans[i].text, i) for i in range(len(spans))
                  if i not in done and spans[i].source == "prompt")
    return pieces


def target_segments(expl: Explanation) -> list[tuple[str, int | None]]:
    """The target to draw, apart from the prompt: (text, unit index or None) per target token.

    A causal LM's target tokens but the last are units at token granularity (``source ==
    "target"``: they condition the later target tokens) and carry their index; the others
    (the last, every token at coarser granularity, a classifier's label) carry None.
    """
    units = sorted((i for i, s in enumerate(expl.spans) if s.source == "target"),
                   key=lambda i: expl.spans[i].positions[0])
    pieces: list[tuple[str, int | None]] = [(expl.spans[i].text, i) for i in units]
    pieces.extend((token, None) for token in expl.target_tokens[len(units):])
    return pieces


def target_probability(expl: Explanation, foil: bool = False) -> float | None:
    """The model's probability of the whole target (``foil``: of the contrast), without
    suppression: exp(-sum of its tokens' cross-entropies); None where unknown."""
    loss = expl.contrast_baseline_loss if foil else expl.baseline_loss
    if loss is None or loss.numel() == 0:
        return None
    return math.exp(-float(loss.double().sum()))


def answer_lines(expl: Explanation) -> list[tuple[str, list[tuple[str, int | None]]]]:
    """(label, pieces) of the lines drawn apart from the prompt: the target ("target (p =
    0.7)", a classifier's "label (p = 0.9)") and, for contrastive explanations, the foil
    ("rather than (p = 0.1)")."""
    word = "target" if expl.kind in ("causal_lm", "image_text") else "label"
    lines = []
    for name, foil in ((word, False), ("rather than", True)):
        if foil and expl.contrast is None:
            continue
        p = target_probability(expl, foil=foil)
        label = name if p is None else f"{name} (p = {p:.3g})"
        pieces = [(expl.contrast, None)] if foil else target_segments(expl)
        lines.append((label, pieces))
    return lines


def scale_labels(peak: float) -> tuple[str, str, str]:
    """Numbers at the (left, middle, right) of a colour scale running from -peak to +peak."""
    return f"{-peak:.3g}", "0", f"+{peak:.3g} nats"


def headline(expl: Explanation) -> str:
    """What was explained, in words: "why ' Paris'", or "why ' Paris' rather than ' Lyon'",
    with the model's probability of the target where it is known."""
    text = f"why {expl.target!r}"
    if expl.contrast is not None:
        text += f" rather than {expl.contrast!r}"
    candidates = expl.settings.get("candidates")
    if candidates:  # zero-shot: the target is one of these label texts
        text += f" among {', '.join(repr(c) for c in candidates)}"
    p = target_probability(expl)
    if p is not None:
        text += f" (p = {p:.3g}"
        if expl.base_margin is not None:
            text += f", log-odds over the foil {expl.base_margin:+.3g} nats"
        text += ")"
    return text


def legend_labels(expl: Explanation) -> tuple[str, str]:
    """(negative end, positive end) of the colour scale, in words."""
    if expl.contrast is not None:
        return f"supports {expl.contrast!r}", f"supports {expl.target!r}"
    return "opposes the target", "supports the target"


def _settings_text(expl: Explanation) -> str:
    keys = ("factor", "conceptual_threshold", "mode", "postprocess", "normalize", "model")
    parts = [f"{k}={expl.settings[k]}" for k in keys if k in expl.settings]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:960px}
h1{font-size:20px;margin:0 0 4px 0} .settings{color:#666;font-size:13px;margin-bottom:16px}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:16px;line-height:2.1;
white-space:pre-wrap;border:1px solid #ddd;padding:12px;border-radius:6px}
.tok{padding:2px 1px;border-radius:3px} .target{outline:1px dashed #888}
.answer{margin-top:10px;padding-top:6px;border-top:1px dashed #bbb}
.label{font-family:system-ui,sans-serif;font-size:13px;color:#555}
.legend{display:flex;align-items:center;gap:8px;margin:14px 0;font-size:13px}
.bar{width:240px;height:14px;border:1px solid #aaa;
background:linear-gradient(to right,#0000ff,#ffffff,#ff0000)}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px}
.grid td{width:28px;height:28px;padding:0;text-align:center;font-size:9px}
.pictures{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-end;margin-bottom:14px}
figure{margin:0} figcaption{font-size:12px;color:#555} img{display:block;image-rendering:auto}
"""


def to_html(expl: Explanation, path: str | Path | None = None, *,
            images: Sequence[Any] | None = None) -> str:
    """A self-contained HTML page (inline CSS, no external assets); written to ``path``.

    ``images``: image-text explanations: the pictures ([H, W, 3] uint8 arrays or PIL images,
    in prompt order) when ``expl.images`` is None (an explanation read back from JSON).
    """
    page = render_html(expl, images=images)
    if path is not None:
        _ensure_parent(path).write_text(page, encoding="utf-8")
    return page


def render_html(expl: Explanation, *, images: Sequence[Any] | None = None) -> str:
    """A complete HTML page for the explanation (inline CSS, no network assets)."""
    units = _unit_scores(expl.scores)
    esc = html.escape
    target = esc(expl.target)
    head = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
        f"<title>AtMan explanation: {target}</title><style>{_CSS}</style></head><body>"
        f"<h1>AtMan: {esc(headline(expl))}</h1>"
        f"<div class=\"settings\">{esc(_settings_text(expl))}</div>"
    )
    body = []
    if expl.kind == "image_text":
        body.append("<div class=\"pictures\">")
        for picture, caption in _view_images(expl, images, side=384):
            body.append(
                f"<figure><img src=\"{_png_data_uri(picture)}\" width=\"{picture.size[0]}\" "
                f"height=\"{picture.size[1]}\" alt=\"{esc(caption)}\">"
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
        body.append("</div>")
    scores = expl.scores.tolist()

    def piece(text: str, i: int | None, target: bool = False) -> str:
        if i is None:
            return f"<span class=\"tok target\">{esc(text)}</span>" if target else esc(text)
        r, g, b = score_rgb(units[i])
        cls = "tok target" if expl.spans[i].source == "target" else "tok"
        return (f"<span class=\"{cls}\" style=\"background:rgb({r},{g},{b})\" "
                f"title=\"{scores[i]:.6g} nats\">{esc(text)}</span>")

    if expl.patch_grid is None:
        body.append("<div class=\"text\">")
        body.extend(piece(text, i) for text, i in prompt_segments(expl))
        # the target (and foil) apart from the prompt, each on a line of its own
        for label, pieces in answer_lines(expl):
            body.append(f"<div class=\"answer\"><span class=\"label\">{esc(label)}:</span> "
                        + "".join(piece(text, i, True) for text, i in pieces) + "</div>")
        body.append("</div>")
    else:
        rows, cols = expl.patch_grid
        body.append("<table class=\"grid\">")
        for i in range(rows):
            body.append("<tr>")
            for j in range(cols):
                idx = i * cols + j
                r, g, b = score_rgb(units[idx])
                body.append(
                    f"<td style=\"background:rgb({r},{g},{b})\" "
                    f"title=\"{esc(expl.tokens[idx])}: {float(expl.scores[idx]):.6g}\"></td>"
                )
            body.append("</tr>")
        body.append("</table>")
        for label, pieces in answer_lines(expl):
            body.append(f"<div class=\"answer\"><span class=\"label\">{esc(label)}:</span> "
                        + "".join(piece(text, i, True) for text, i in pieces) + "</div>")
    peak = float(expl.scores.abs().max()) if expl.scores.numel() else 0.0
    both = ", text and image alike" if expl.kind == "image_text" else ""
    body.append(_html_legend(peak, *legend_labels(expl), note=f"colour scale{both}"))
    body.append("<table><tr><th>rank</th><th>unit</th><th>where</th><th>score (nats)</th></tr>")
    for rank, (_, span, score) in enumerate(expl.top(10), start=1):
        body.append(f"<tr><td>{rank}</td><td>{esc(repr(span.text))}</td>"
                    f"<td>{esc(_where(span))}</td><td>{score:.6g}</td></tr>")
    body.append("</table>")
    if expl.per_target.shape[0] > 1:
        body.append(_target_heatmap(expl))
    body.append("</body></html>")
    return head + "".join(body)


def _where(span: Any) -> str:
    """Where a unit is: its characters in the prompt, or its token position(s)."""
    if span.start is not None:
        return f"chars {span.start}-{span.end}"
    first, last = span.positions[0], span.positions[-1]
    pos = f"position {first}" if first == last else f"positions {first}-{last}"
    return f"{span.source} {pos}"


def _html_legend(peak: float, low: str, high: str, note: str) -> str:
    """A colour bar with its numbers (-peak, 0, +peak nats) and what its ends mean."""
    esc = html.escape
    left, middle, right = scale_labels(peak)
    return (f"<div class=\"legend\"><span>{esc(low)}</span><span>{esc(left)}</span>"
            f"<span class=\"bar\" title=\"0 nats at the middle\"></span>"
            f"<span>{esc(right)}</span><span>{esc(high)}</span>"
            f"<span>({esc(note)}: white = {middle})</span></div>")


def _target_heatmap(expl: Explanation) -> str:
    """HTML table: one row per target token, one column per unit, each cell the rise of that
    token's cross-entropy when the unit is suppressed, coloured on its own scale (the largest
    |cell|), which is labelled below the table."""
    esc = html.escape
    peak = float(expl.per_target.abs().max()) if expl.per_target.numel() else 0.0
    scale = peak or 1.0
    cells = ["<h2 style=\"font-size:16px\">Per target token (rise of its cross-entropy, "
             "nats)</h2><div style=\"overflow-x:auto\"><table class=\"heat\"><tr><th></th>"]
    cells += [f"<th title=\"{esc(_where(s))}\">{esc(s.text[:12])}</th>" for s in expl.spans]
    cells.append("</tr>")
    for token, row in zip(expl.target_tokens, expl.per_target.tolist(), strict=True):
        cells.append(f"<tr><th>{esc(repr(token))}</th>")
        for value in row:
            r, g, b = score_rgb(max(-1.0, min(1.0, value / scale)))
            cells.append(f"<td style=\"background:rgb({r},{g},{b})\" "
                         f"title=\"{value:.6g} nats\">{value:.2g}</td>")
        cells.append("</tr>")
    cells.append("</table></div>")
    cells.append(_html_legend(peak, "opposes the token", "supports the token",
                              "per-token colour scale"))
    return "".join(cells)


def show(expl: Explanation, **kwargs: Any) -> None:
    """Display in a notebook (HTML) or print to the terminal."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        print(to_terminal(expl))
        return
    if get_ipython() is None:
        print(to_terminal(expl))
        return
    display(HTML(render_html(expl, **kwargs)))


def _notebook_html(self: Explanation) -> str:
    return render_html(self)


def attach_notebook_display() -> None:
    """Give :class:`Explanation` its notebook rendering (``_repr_html_``) from here, so that
    the Explanation module itself never imports its renderers."""
    from .explanation import Explanation

    Explanation._repr_html_ = _notebook_html  # type: ignore[attr-defined]


# -------------------------------------------------------------------------------------- PNG
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


# ------------------------------------------------------------------------ image-text maps
def _picture_array(picture: Any) -> np.ndarray:
    """A picture as an [H, W, 3] uint8 array (PIL image, [H, W, C] or [C, H, W] array)."""
    if hasattr(picture, "convert"):  # PIL
        return np.asarray(picture.convert("RGB"))
    arr = picture.detach().cpu().numpy() if torch.is_tensor(picture) else np.asarray(picture)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a picture must be a PIL image or an [H, W, 3] array, got shape "
                         f"{arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        scale = 255.0 if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0 else 1.0
        arr = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _alpha(unit: float) -> int:
    """Opacity of a map cell over its picture: a faint veil at 0, strong at |score| = 1."""
    return int(40 + 170 * abs(unit))


def view_image(expl: Explanation, image: int = 0, view: str = "whole", *,
               picture: Any = None, side: int = 384):
    """One image view's score map as a PIL image, longer side ``side`` pixels.

    With a picture (``picture``, else ``expl.images[image]``): the picture scaled to ``side``
    and each image unit's colour blended over it, on the unit's ``box`` (its rectangle in the
    original picture) when every unit of the view has one, else on the view's grid stretched
    over the picture. Without a picture: the bare grid, square cells. Colours on the scale of
    all units (:func:`score_rgb` of the score over the largest |score|).
    """
    from PIL import Image, ImageDraw

    if expl.kind != "image_text":
        raise ValueError(f"view_image needs an image-text explanation, got kind {expl.kind!r}")
    if isinstance(side, bool) or not isinstance(side, int) or side < 16:
        raise ValueError(f"side must be an int >= 16 pixels, got {side!r}")
    found = [v for v in expl.image_views if v["image"] == image and v["view"] == view]
    if not found:
        have = sorted({(v["image"], v["view"]) for v in expl.image_views})
        raise ValueError(f"no image view ({image}, {view!r}); this explanation has {have}")
    rows, cols = (int(x) for x in found[0]["grid"])
    cells = [int(c) for c in found[0]["cells"]]
    if picture is None and expl.images is not None and image < len(expl.images):
        picture = expl.images[image]
    units = _unit_scores(expl.scores)
    heat = Image.new("RGB", (cols, rows))
    alpha = Image.new("L", (cols, rows))
    for k, u in enumerate(cells):
        heat.putpixel((k % cols, k // cols), score_rgb(units[u]))
        alpha.putpixel((k % cols, k // cols), _alpha(units[u]))
    if picture is None:
        cell = max(2, side // max(rows, cols))
        return heat.resize((cols * cell, rows * cell), Image.NEAREST)
    pic = _picture_array(picture)
    h, w = pic.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = Image.fromarray(pic).resize(size, Image.BILINEAR)
    boxes = [expl.spans[u].box for u in cells]
    if all(b is not None for b in boxes):
        overlay = Image.new("RGB", size, "white")
        mask = Image.new("L", size, 0)
        draw_o, draw_m = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
        for u in dict.fromkeys(cells):  # each unit once (a region covers several cells)
            x0, y0, x1, y1 = (float(b) * scale for b in expl.spans[u].box)
            x0, y0, x1, y1 = round(x0), round(y0), round(x1) - 1, round(y1) - 1
            if x1 < x0 or y1 < y0:  # a cell of padding only: nothing of the picture
                continue
            draw_o.rectangle([x0, y0, x1, y1], fill=score_rgb(units[u]))
            draw_m.rectangle([x0, y0, x1, y1], fill=_alpha(units[u]))
    else:
        overlay = heat.resize(size, Image.NEAREST)
        mask = alpha.resize(size, Image.NEAREST)
    return Image.composite(overlay, base, mask)


def _view_images(expl: Explanation, images: Sequence[Any] | None, side: int) -> list:
    """(PIL image, caption) of every view: each picture's "whole" map at ``side``, its
    "global" map (tiling models) at half."""
    pictures = list(images) if images is not None else expl.images
    out = []
    for v in sorted(expl.image_views, key=lambda v: (v["image"], v["view"] != "whole")):
        i, name = v["image"], v["view"]
        picture = pictures[i] if pictures is not None and i < len(pictures) else None
        small = name == "global"
        img = view_image(expl, i, name, picture=picture, side=side // 2 if small else side)
        rows, cols = v["grid"]
        what = "global view" if small else "whole picture"
        out.append((img, f"image {i}: {what}, {rows} x {cols} cells"
                         + ("" if picture is not None else " (no picture given)")))
    return out


def _png_data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_heatmap(expl: Explanation, image: torch.Tensor | None):
    from PIL import Image

    rows, cols = expl.patch_grid
    units = _unit_scores(expl.scores)
    heat = Image.new("RGB", (cols, rows))
    alpha = Image.new("L", (cols, rows))
    for idx, unit in enumerate(units):
        heat.putpixel((idx % cols, idx // cols), score_rgb(unit))
        alpha.putpixel((idx % cols, idx // cols), int(40 + 170 * abs(unit)))
    if image is None:
        size = (cols * 32, rows * 32)
        return heat.resize(size, Image.NEAREST)
    pic = image.detach().to(torch.float32).cpu()
    if pic.dim() == 4 and pic.shape[0] == 1:
        pic = pic[0]
    if pic.dim() != 3 or pic.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape [3, H, W] (or [1, 3, H, W]), got "
                         f"{tuple(image.shape)}")
    lo, hi = float(pic.min()), float(pic.max())
    pic = (pic - lo) / (hi - lo) if hi > lo else torch.zeros_like(pic)
    pic = (pic * 255).round().to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).contiguous()
    base = Image.fromarray(pic.numpy(), mode="RGB")
    h, w = pic.shape[0], pic.shape[1]
    scale = max(1, -(-224 // min(h, w)))
    size = (w * scale, h * scale)
    base = base.resize(size, Image.BILINEAR)
    overlay = heat.resize(size, Image.NEAREST)
    mask = alpha.resize(size, Image.NEAREST)
    return Image.composite(overlay, base, mask)


# --------------------------------------------------------------------------------- terminal
def to_terminal(expl: Explanation, *, color: bool | None = None) -> str:
    """The prompt with ANSI 24-bit background colours per unit (or ``unit[score]`` without
    colour), then the target apart, on a line of its own (``target (p = 0.7): ' Paris'``, each
    target token quoted; an explained target token coloured or followed by its score) and, for
    contrastive explanations, the foil's line. Image explanations: a grid of scores, then the
    label's line; image-text explanations: the text and target lines, then each image view's
    grid of scores (a line per row). Scores are in nats."""
    if color is None:  # colour only on a terminal, and never with NO_COLOR set
        import os
        import sys

        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    units = _unit_scores(expl.scores)
    if expl.patch_grid is not None:
        rows, cols = expl.patch_grid
        lines = []
        for i in range(rows):
            cells = []
            for j in range(cols):
                idx = i * cols + j
                text = f"{float(expl.scores[idx]):+8.3f}"
                if color:
                    r, g, b = score_rgb(units[idx])
                    text = f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m"
                cells.append(text)
            lines.append(" ".join(cells))
        lines += [f"{label}: " + " ".join(repr(text) for text, _ in pieces)
                  for label, pieces in answer_lines(expl)]
        return "\n".join(lines)
    scores = expl.scores.tolist()

    def piece(text: str, i: int | None) -> str:
        if i is None:
            return text
        if color:
            r, g, b = score_rgb(units[i])
            return f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m"
        return f"{text}[{scores[i]:.3g}]"

    out = "".join(piece(text, i) for text, i in prompt_segments(expl))
    # the target (and foil) apart from the prompt: a line each, the tokens quoted
    for label, pieces in answer_lines(expl):
        out += f"\n{label}: " + " ".join(piece(repr(text), i) for text, i in pieces)
    if expl.kind == "image_text":
        for v in sorted(expl.image_views, key=lambda v: (v["image"], v["view"] != "whole")):
            rows, cols = (int(x) for x in v["grid"])
            lines = [f"image {v['image']}, {v['view']} view ({rows} x {cols} cells):"]
            for r in range(rows):
                cells = []
                for c in range(cols):
                    u = int(v["cells"][r * cols + c])
                    text = f"{scores[u]:+8.3f}"
                    if color:
                        red, green, blue = score_rgb(units[u])
                        text = f"\x1b[48;2;{red};{green};{blue}m\x1b[38;2;0;0;0m{text}\x1b[0m"
                    cells.append(text)
                lines.append(" ".join(cells))
            out += "\n" + "\n".join(lines)
    return out
