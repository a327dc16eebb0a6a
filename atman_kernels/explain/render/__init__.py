"""Render an :class:`~atman_kernels.explain.explanation.Explanation`: HTML, PNG, terminal.

Rendering reads an Explanation (the Explanation does not import this package):
:func:`to_html`, :func:`save_png` and :func:`to_terminal`, one module per output format
(:mod:`.html`, :mod:`.png`, :mod:`.terminal`, :mod:`.notebook`) over the shared pieces of
:mod:`.common` (colours, text segments, labels) and :mod:`.maps` (score maps on pictures).
Layering, each module importing only those before it: common, maps, page_data, terminal,
html, png, notebook.

The HTML page is explorable (docs/explaining.md, "The explanation page"): its script
(``page.js``) reads one JSON block (:mod:`.page_data`: the Explanation's ``to_dict()`` and its
citations) to show each target token's row, the answer's citations, a design's tree, a
sortable table of the top units and each picture's map at an adjustable opacity.

Text explanations show the prompt's own text, its spacing and line breaks, with each explained
unit (token, word, sentence, span) highlighted; prompt text outside every unit is shown plain.
The target is shown apart from the prompt, on a line of its own labelled with the model's
probability of it (``target (p = 0.7):``; a classifier's ``label``); a causal LM's target
tokens but the last, which are explained units too (they condition the later target tokens),
are coloured and outlined there. A contrastive explanation adds a line for the foil. When the
target has several tokens, the HTML page and the PNG add the target-token x unit heatmap
(``per_target``), with its own colour scale.

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

# every name the one-module render.py had stays importable from here, private ones included
# ruff: noqa: F401
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
    segments,
    target_probability,
    target_segments,
)
from .html import _CSS, _html_legend, _png_data_uri, _target_heatmap, render_html, to_html
from .maps import _alpha, _image_heatmap, _picture_array, _view_images, view_image
from .notebook import _notebook_html, attach_notebook_display, show
from .png import (
    _draw_scale,
    _font,
    _short_label,
    _target_heatmap_png,
    _text_boxes,
    _text_width,
    save_png,
)
from .terminal import to_terminal

__all__ = [
    "answer_lines", "attach_notebook_display", "headline", "legend_labels", "prompt_segments",
    "render_html", "save_png", "scale_labels", "score_rgb", "segments", "show",
    "target_probability", "target_segments", "to_html", "to_terminal", "view_image",
]
