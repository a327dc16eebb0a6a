"""Designs: which units each AtMan variant suppresses together, and how the rises become
scores (the step between the units and the engine; estimators in :mod:`..estimate`).

- ``single``: one variant per unit, the paper's exact scores (:mod:`.single`);
- ``hierarchical``: coarse units first, the best refined best-first within the budget; every
  score exact (:mod:`.hierarchical`);
- ``sampled``: random joint suppressions and a sparse linear surrogate; scores estimated, the
  fit's quality reported (:mod:`.sampled`);
- ``auto`` (the default): ``single`` when the units fit in the budget (default
  :data:`DEFAULT_BUDGET` variants), else ``hierarchical`` for text prompts; images and other
  units without text stay ``single`` (never an estimate unasked).

The budget counts suppressed variants (forwards of the input; the unsuppressed baseline is not
counted, and prefix reuse makes a variant that suppresses late cheaper).
"""

from __future__ import annotations

from typing import Any

from ..units import Span
from .base import DEFAULT_BUDGET, Outcome, Problem, TreeEntry, check_budget
from .hierarchical import Hierarchical
from .sampled import Sampled
from .single import Single

DESIGNS = ("auto", "single", "hierarchical", "sampled")

__all__ = ["DEFAULT_BUDGET", "DESIGNS", "Hierarchical", "Outcome", "Problem", "Sampled",
           "Single", "TreeEntry", "check_budget", "check_design", "choose_design"]


def check_design(design: Any) -> Any:
    """A design name of :data:`DESIGNS` or a design object (``Single()``, ``Hierarchical()``,
    ``Sampled(keep_prob=..., seed=...)``), else ValueError."""
    if isinstance(design, (Single, Hierarchical, Sampled)):
        return design
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS} or a design object (Single(), "
                         f"Hierarchical(), Sampled(...)), got {design!r}")
    return design


def choose_design(design: Any, units: list[Span], budget: int | None) -> Any:
    """The design object to run: ``design`` itself, or for "auto" the rule of the module doc."""
    design = check_design(design)
    if not isinstance(design, str):
        return design
    if design == "single":
        return Single()
    if design == "hierarchical":
        return Hierarchical()
    if design == "sampled":
        return Sampled()
    limit = DEFAULT_BUDGET if budget is None else budget
    text = any(u.source == "prompt" and u.start is not None for u in units) and not any(
        u.source == "image" for u in units)
    if len(units) <= limit or not text:
        return Single()
    return Hierarchical()
