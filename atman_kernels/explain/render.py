"""Render an :class:`~atman_kernels.explain.explanation.Explanation`: HTML, PNG, terminal.

Rendering reads an Explanation (the Explanation does not import this module):
:func:`to_html`, :func:`save_png` and :func:`to_terminal`. Text explanations show the prompt's
own text, its spacing and line breaks, with each explained unit (token, word, sentence, span)
highlighted; prompt text outside every unit is shown plain; a causal LM's explained target
tokens follow the prompt, outlined.

Image-text explanations (kind "image_text") show each picture with its "whole" score map blended
over it (each image unit's rectangle in the original picture, ``Span.box``; without boxes the
grid stretched over the picture; without a picture the bare grid), a tiling model's "global"
view beside it at half the size, and the prompt's text below, highlighted as for text (image
tokens never appear as text). Pictures come from ``Explanation.images`` (not serialised) or are
passed again to the renderer after loading JSON.

Colours: each score is divided by the largest absolute score over *all* units (text and image
share one scale); positive values shade towards red (the unit supports the target), negative
towards blue, zero is white. Every output is self-contained: the HTML page has inline CSS and
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
    """The text to draw, as (text, unit index or None) pieces in reading order.

    With the prompt text and character ranges: the prompt cut at the units' ranges (text
    between units has index None), then the target units. Without (token-id prompts): the
    units' texts one after another. Image units (``source == "image"``) are never text: they
    are drawn on their pictures (:func:`view_image`).
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
        rest = [i for i in range(len(spans)) if i not in set(located)]
    else:
        rest = list(range(len(spans)))
    if expl.kind == "image_text":
        rest = [i for i in rest if spans[i].source != "image"]
    pieces.extend((spans[i].text, i) for i in rest)
    return pieces


def headline(expl: Explanation) -> str:
    """What was explained, in words: "why ' Paris'", or "why ' Paris' rather than ' Lyon'",
    with the model's probability of the target where it is known."""
    text = f"why {expl.target!r}"
    if expl.contrast is not None:
        text += f" rather than {expl.contrast!r}"
    if expl.baseline_loss is not None:
        p = math.exp(-float(expl.baseline_loss.double().sum()))
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
    if expl.patch_grid is None:
        body.append("<div class=\"text\">")
        scores = expl.scores.tolist()
        for text, i in segments(expl):
            if i is None:
                body.append(esc(text))
                continue
            r, g, b = score_rgb(units[i])
            cls = "tok target" if expl.spans[i].source == "target" else "tok"
            body.append(
                f"<span class=\"{cls}\" style=\"background:rgb({r},{g},{b})\" "
                f"title=\"{scores[i]:.6g}\">{esc(text)}</span>"
            )
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
    peak = float(expl.scores.abs().max()) if expl.scores.numel() else 0.0
    body.append(
        f"<div class=\"legend\"><span>{esc(legend_labels(expl)[0])}</span>"
        "<span class=\"bar\"></span>"
        f"<span>{esc(legend_labels(expl)[1])}</span><span>(colour scale \u00b1{peak:.4g} nats"
        f"{', text and image alike' if expl.kind == 'image_text' else ''})</span></div>"
    )
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


def _target_heatmap(expl: Explanation) -> str:
    """HTML table: one row per target token, one column per unit, each cell the rise of that
    token's cross-entropy when the unit is suppressed (same colour scale as the text)."""
    esc = html.escape
    peak = float(expl.per_target.abs().max()) or 1.0
    cells = ["<h2 style=\"font-size:16px\">Per target token (rise of its cross-entropy, "
             "nats)</h2><div style=\"overflow-x:auto\"><table class=\"heat\"><tr><th></th>"]
    cells += [f"<th>{esc(s.text[:12])}</th>" for s in expl.spans]
    cells.append("</tr>")
    for token, row in zip(expl.target_tokens, expl.per_target.tolist(), strict=True):
        cells.append(f"<tr><th>{esc(repr(token))}</th>")
        for value in row:
            r, g, b = score_rgb(max(-1.0, min(1.0, value / peak)))
            cells.append(f"<td style=\"background:rgb({r},{g},{b})\" "
                         f"title=\"{value:.6g}\">{value:.2g}</td>")
        cells.append("</tr>")
    cells.append("</table></div>")
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
    x = margin
    right = width - margin
    for text, i in segments(expl):
        rgb = None if i is None else score_rgb(units[i])
        outlined = i is not None and expl.spans[i].source == "target"
        # wrap at whitespace; a line break in the text is a line break in the picture
        for line_no, line in enumerate(text.split("\n")):
            if line_no:
                x, y = margin, y + line_h
            for word in re.findall(r"\s+|\S+", line):
                w = _text_width(probe, word, font) + (2 * pad if rgb else 0)
                w = min(w, right - margin)
                if x + w > right and x > margin:
                    x, y = margin, y + line_h
                    if word.isspace():
                        continue
                boxes.append((x, y, w, word, rgb, outlined))
                x += w
    legend_y = y + line_h + 10
    height = legend_y + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, margin), title, fill=(20, 20, 20), font=font)
    draw.text((margin, margin + 22), _settings_text(expl), fill=(100, 100, 100), font=small)
    for px, py, picture, caption in placed:
        draw.text((px, py), caption, fill=(60, 60, 60), font=small)
        img.paste(picture, (px, py + 18))
    for bx, by, w, text, rgb, outlined in boxes:
        if rgb is not None:
            draw.rectangle([bx, by, bx + w, by + line_h - 6], fill=rgb,
                           outline=(90, 90, 90) if outlined else None)
        draw.text((bx + (pad if rgb else 0), by + 3), text, fill=(0, 0, 0), font=font)
    bar_w = 200
    for i in range(bar_w):
        draw.line(
            [(margin + i, legend_y), (margin + i, legend_y + 12)],
            fill=score_rgb(2.0 * i / (bar_w - 1) - 1.0),
        )
    peak = float(expl.scores.abs().max()) if expl.scores.numel() else 0.0
    both = ", text and image alike" if expl.kind == "image_text" else ""
    draw.text((margin + bar_w + 8, legend_y - 2),
              f"blue {legend_labels(expl)[0]} / red {legend_labels(expl)[1]} "
              f"(scale \u00b1{peak:.3g} nats{both})",
              fill=(60,) * 3, font=small)
    return img


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
    colour); image explanations as a grid of scores; image-text explanations: the text, then
    each image view's grid of scores (a line per row)."""
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
        return "\n".join(lines)
    scores = expl.scores.tolist()
    parts = []
    for text, i in segments(expl):
        if i is None:
            parts.append(text)
        elif color:
            r, g, b = score_rgb(units[i])
            parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m")
        else:
            parts.append(f"{text}[{scores[i]:.3g}]")
    out = "".join(parts)
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
