"""The explanation as one self-contained, explorable HTML page: inline CSS and script
(``page.css``, ``page.js`` beside this module), pictures as ``data:`` PNG, its data in one JSON
block (:mod:`.page_data`). What the page does is described in docs/explaining.md."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from importlib import resources
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
from .maps import _image_layers, _view_layer_list
from .page_data import CITE_K, page_data, page_data_json

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
    """A complete HTML page for the explanation: inline CSS and script, no network asset.

    The page reads its data from one ``<script type="application/json">`` block
    (:func:`.page_data.page_data`: the Explanation's ``to_dict()`` and its citations); the
    static markup below shows the combined scores without the script too.
    """
    esc = html.escape
    head = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
        f"<title>AtMan explanation: {esc(expl.target)}</title>"
        f"<style>{_CSS}{_asset('page.css')}</style></head><body><div class=\"atman-page\">"
        f"<h1>AtMan: {esc(headline(expl))}</h1>"
        f"<div class=\"settings\">{esc(_settings_text(expl))}</div>"
    )
    body = [_estimate_note(expl)]
    if expl.kind == "image_text":
        body.append(_pictures(expl, images))
    if expl.patch_grid is None:
        body.append("<div class=\"text\">")
        units = _unit_scores(expl.scores)
        body.extend(_piece(expl, units, text, i) for text, i in prompt_segments(expl))
        body.extend(_answer_lines(expl))
        body.append("</div>")
    else:
        if expl.image is not None:  # the picture (not serialised) with the patch map on it
            rows, cols = expl.patch_grid
            body.append("<div class=\"pictures\">" + _figure(
                *_image_layers(expl, expl.image), f"{rows} x {cols} patches", 0) + "</div>")
        body.append(_patch_grid(expl))
        body.extend(_answer_lines(expl))
    body.append(_row_controls(expl))
    peak = float(expl.scores.abs().max()) if expl.scores.numel() else 0.0
    both = ", text and image alike" if expl.kind == "image_text" else ""
    body.append(_html_legend(peak, *legend_labels(expl), note=f"colour scale{both}",
                             main=True))
    body.append(_citations(expl))
    body.append(_tree_box(expl))
    body.append(_top_table(expl))
    if expl.per_target.shape[0] > 1:
        body.append(_target_heatmap(expl))
    body.append(f"<script type=\"application/json\" class=\"atman-data\">"
                f"{page_data_json(expl)}</script><script>{_asset('page.js')}</script>")
    body.append("</div></body></html>")
    return head + "".join(body)


def _asset(name: str) -> str:
    """The text of a file shipped beside this module (``page.css``, ``page.js``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _piece(expl: Explanation, units: list[float], text: str, i: int | None,
           target: int | None = None) -> str:
    """One piece of text: plain, or unit ``i`` coloured by its combined score (its score in
    ``title``, ``aria-label`` and ``data-score``); ``target``: the index of the target token
    it shows (focusable, selects that token's row). ``units``: :func:`_unit_scores`."""
    esc = html.escape
    attrs = ""
    if target is not None:
        attrs = f" data-target=\"{target}\" tabindex=\"0\" role=\"button\" aria-pressed=\"false\""
    if i is None:
        if target is None:
            return esc(text)
        return f"<span class=\"tok target\"{attrs}>{esc(text)}</span>"
    r, g, b = score_rgb(units[i])
    score = float(expl.scores[i])
    cls = "tok target" if expl.spans[i].source == "target" or target is not None else "tok"
    label = f"{text}: {score:.6g} nats"
    return (f"<span class=\"{cls}\" data-unit=\"{i}\" data-score=\"{score!r}\"{attrs} "
            f"style=\"background:rgb({r},{g},{b})\" title=\"{score:.6g} nats\" "
            f"aria-label=\"{esc(label)}\">{esc(text)}</span>")


def _answer_lines(expl: Explanation) -> list[str]:
    """The target's line (each target token selectable: ``data-target``) and the foil's."""
    out, units = [], _unit_scores(expl.scores)
    for n, (label, pieces) in enumerate(answer_lines(expl)):
        fact = n == 0
        out.append(f"<div class=\"answer\"><span class=\"label\">{html.escape(label)}:</span> "
                   + "".join(_piece(expl, units, text, i, t) if fact else
                             f"<span class=\"tok target foil\">{html.escape(text)}</span>"
                             for t, (text, i) in enumerate(pieces)) + "</div>")
    return out


def _row_controls(expl: Explanation) -> str:
    """What the text's colours show now, and the way back to every target's combined score."""
    return ("<div class=\"rows\"><span class=\"rowinfo\" aria-live=\"polite\">showing: all "
            "targets (combined score)</span> <button type=\"button\" class=\"reset\">all "
            "targets</button> <span class=\"hint\">hover, click or focus and press Enter on a "
            "target token to see its own row</span></div>")


def _estimate_note(expl: Explanation) -> str:
    """A note that the scores are a surrogate's estimates, with its fit quality."""
    if not expl.is_estimate:
        return ""
    est = expl.estimate
    fit = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                    for k, v in est.items() if k != "method")
    method = html.escape(str(est["method"]))
    return (f"<div class=\"estimate\" role=\"note\">Estimated scores ({method}"
            f" surrogate fit, not exact AtMan rises){': ' + html.escape(fit) if fit else ''}"
            "</div>")


def _citations(expl: Explanation) -> str:
    """The answer's sentences, each a button listing its cited units (filled by the script)."""
    cites = page_data(expl)["citations"]
    if not cites:
        return ""
    buttons = "".join(f"<button type=\"button\" class=\"cite\" data-cite=\"{n}\" "
                      f"aria-pressed=\"false\">{html.escape(c['text'])}</button>"
                      for n, c in enumerate(cites))
    return (f"<div class=\"citations\"><h2>Citations (top {CITE_K} units per answer "
            f"sentence; click a sentence)</h2>{buttons}<ol class=\"cite-list\"></ol></div>")


def _tree_box(expl: Explanation) -> str:
    """The box the script fills with the design's tree (coarse units, expandable)."""
    if not expl.tree:
        return ""
    return (f"<div class=\"tree\"><h2>Levels scored: {html.escape(', '.join(expl.levels))}"
            "</h2></div>")


def _top_table(expl: Explanation, k: int = 10) -> str:
    """The top ``k`` units, sortable by score or position (header buttons)."""
    esc = html.escape
    rows = ["<table class=\"top\"><thead><tr><th>rank</th><th>unit</th><th><button "
            "type=\"button\" data-sort=\"position\">where</button></th><th><button "
            "type=\"button\" data-sort=\"score\">score (nats)</button></th></tr></thead><tbody>"]
    for rank, (i, span, score) in enumerate(expl.top(k), start=1):
        rows.append(f"<tr data-index=\"{i}\" data-score=\"{score!r}\" "
                    f"data-position=\"{span.positions[0]}\"><td>{rank}</td>"
                    f"<td>{esc(repr(span.text))}</td><td>{esc(_where(span))}</td>"
                    f"<td>{score:.6g}</td></tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def _patch_grid(expl: Explanation) -> str:
    """An image classifier's patches as a table of coloured cells."""
    esc = html.escape
    units = _unit_scores(expl.scores)
    rows, cols = expl.patch_grid
    out = ["<table class=\"grid\">"]
    for i in range(rows):
        out.append("<tr>")
        for j in range(cols):
            idx = i * cols + j
            r, g, b = score_rgb(units[idx])
            label = f"{expl.tokens[idx]}: {float(expl.scores[idx]):.6g}"
            out.append(f"<td style=\"background:rgb({r},{g},{b})\" title=\"{esc(label)}\" "
                       f"aria-label=\"{esc(label)} nats\"></td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _pictures(expl: Explanation, images: Sequence[Any] | None) -> str:
    """Each image view (:func:`_figure`), in the order of :func:`.maps._view_images`."""
    return ("<div class=\"pictures\">" + "".join(
        _figure(base, colours, mask, caption, n) for n, (base, colours, mask, caption)
        in enumerate(_view_layer_list(expl, images, 384))) + "</div>")


def _figure(base, colours, mask, caption: str, n: int) -> str:
    """The picture ``base`` with its map (``colours`` at opacity ``mask``) on top, the map's
    opacity set by a range input (the ``n``-th on the page); without a picture the bare map."""
    esc = html.escape
    w, h = colours.size
    if base is None:
        return (f"<figure><img src=\"{_png_data_uri(colours)}\" width=\"{w}\" "
                f"height=\"{h}\" alt=\"{esc(caption)}\"><figcaption>{esc(caption)}"
                "</figcaption></figure>")
    layer = colours.copy()
    layer.putalpha(mask)
    return (
        f"<figure><div class=\"blend\" style=\"width:{w}px;height:{h}px\">"
        f"<img class=\"base\" src=\"{_png_data_uri(base)}\" width=\"{w}\" height=\"{h}\" "
        f"alt=\"{esc(caption)}\"><img class=\"map\" src=\"{_png_data_uri(layer)}\" "
        f"width=\"{w}\" height=\"{h}\" alt=\"score map\"></div>"
        f"<figcaption>{esc(caption)} <label>map opacity <input type=\"range\" "
        f"class=\"opacity\" id=\"opacity-{n}\" min=\"0\" max=\"100\" value=\"100\">"
        "</label></figcaption></figure>")


def _html_legend(peak: float, low: str, high: str, note: str, main: bool = False) -> str:
    """A colour bar with its numbers (-peak, 0, +peak nats) and what its ends mean; ``main``:
    the text's scale, whose numbers the script updates to the row shown."""
    esc = html.escape
    left, middle, right = scale_labels(peak)
    cls = "legend main" if main else "legend"
    return (f"<div class=\"{cls}\"><span>{esc(low)}</span><span class=\"lo\">{esc(left)}</span>"
            f"<span class=\"bar\" title=\"0 nats at the middle\"></span>"
            f"<span class=\"hi\">{esc(right)}</span><span>{esc(high)}</span>"
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
