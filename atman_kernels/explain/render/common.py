"""What every output draws: the colour of a score, the text cut into (text, unit) pieces,
the target's and foil's lines, the headline, the legend's words and a unit's place.

The renderers (:mod:`.terminal`, :mod:`.html`, :mod:`.png`) read these; this module imports
none of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..explanation import Explanation


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


def _where(span: Any) -> str:
    """Where a unit is: its characters in the prompt, or its token position(s)."""
    if span.start is not None:
        return f"chars {span.start}-{span.end}"
    first, last = span.positions[0], span.positions[-1]
    pos = f"position {first}" if first == last else f"positions {first}-{last}"
    return f"{span.source} {pos}"
