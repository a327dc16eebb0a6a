"""The paper's design: one variant per unit, each unit suppressed alone; exact scores."""

from __future__ import annotations

from ..units import Span
from .base import Outcome, Problem


class Single:
    """Each unit suppressed alone (U variants): the exact AtMan score of every unit.

    A budget below the number of units is refused (no unit is left unscored silently).
    """

    name = "single"

    def check(self, units: list[Span], prompt: str | None, granularity: str,
              budget: int | None) -> None:
        """Refuse a budget below the number of units (before any forward)."""
        n = len(units)
        if budget is not None and budget < n:
            raise ValueError(
                f"budget={budget} is below the {n} units design 'single' scores one "
                f"variant each; give budget >= {n}, or design='hierarchical' (coarse units "
                "first, refined best-first within the budget) or 'sampled'")

    def run(self, problem: Problem) -> Outcome:
        n = len(problem.units)
        self.check(problem.units, problem.prompt, problem.granularity, problem.budget)
        rise = problem.evaluate([[i] for i in range(n)])
        return Outcome(spans=list(problem.units), rise=rise,
                       settings={"design": self.name, "variants": n})
