"""What every design shares: the problem a design is handed and the outcome it returns.

A design chooses which groups of units to suppress together (one variant each), asks the
engine for their rises through ``Problem.evaluate`` (possibly in several rounds), and turns the
rises into one row per reported unit. It never runs a forward itself, and it checks its
arguments and the budget before the first ``evaluate`` (the baseline forward runs at the
first call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..units import Span

# The forwards an explanation may spend by default (suppressed variants, the baseline not
# counted): design "auto" runs the exact single-unit design when the units fit in it.
DEFAULT_BUDGET = 48


@dataclass
class Problem:
    """What a design works on.

    Attributes:
        units: the finest units (the explainer's spans), in input order.
        prompt: the text their character ranges index, or None.
        granularity: how the units were cut ("token", "sentence", ..., "spans").
        evaluate: groups of unit indices -> [G, R] float64 rises (R = target rows, then the
            foil's rows for contrastive explanations), one variant per group.
        rank: [G, R] rises -> [G] the scores a design ranks groups by (the explanation's
            combined score, never normalised).
        budget: the most variants the design may run (None: its default).
    """

    units: list[Span]
    prompt: str | None
    granularity: str
    evaluate: Callable[[Sequence[Sequence[int]]], torch.Tensor]
    rank: Callable[[torch.Tensor], torch.Tensor]
    budget: int | None = None


@dataclass
class TreeEntry:
    """One scored group of a coarse-to-fine design (becomes an ``explanation.Node``)."""

    span: Span
    level: str
    parent: int | None
    rise: torch.Tensor  # [R]
    refined: bool = False


@dataclass
class Outcome:
    """A design's result: the reported units and one [R] row each (exact rises, or the
    estimator's coefficients), the tree of every level scored (empty when flat), the estimate
    (None: exact scores) and the design's settings (name, budget, variants, ...)."""

    spans: list[Span]
    rise: torch.Tensor  # [U', R]
    tree: list[TreeEntry] = field(default_factory=list)
    estimate: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def check_budget(budget: Any) -> int | None:
    """``budget`` as an int >= 1, or None."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be None or an int >= 1 (the most suppressed forwards "
                         f"an explanation may run), got {budget!r}")
    return budget
