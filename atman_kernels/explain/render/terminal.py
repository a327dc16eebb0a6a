"""The explanation as terminal text: ANSI 24-bit background colours, or scores in brackets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import _unit_scores, answer_lines, prompt_segments, score_rgb

if TYPE_CHECKING:
    from ..explanation import Explanation


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
