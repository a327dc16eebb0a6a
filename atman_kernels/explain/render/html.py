"""The explanation as one self-contained HTML page (inline CSS, pictures as ``data:`` PNG)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..explanation import ensure_parent as _ensure_parent
from .common import (
    _settings_text,
    _unit_scores,
    _where,
    answer_lines,
    headline,
    legend_labels,
    prompt_segments,
    scale_labels,
    score_rgb,
)
from .maps import _view_images

if TYPE_CHECKING:
    from ..explanation import Explanation


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


def _png_data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
