"""Coarse-to-fine: coarse units suppressed jointly, the best ones refined, best-first.

1. The top level of :func:`..hierarchy.build_hierarchy` (paragraphs, or blocks of at most
   ``max_children`` consecutive units where the text has no coarser structure) is scored: one
   variant per group, all its tokens suppressed together: its exact AtMan score.
2. Repeatedly, the scored group with the highest score whose children fit in what is left of
   the budget is refined: each of its children is scored the same way. Ties go to the earlier
   group.
3. It stops when the budget is spent or nothing is left to refine (every score at the finest
   level).

Every score reported is the exact score of the unit it names (a group's is the rise when the
whole group is suppressed, not a sum of its members'). The explanation's units are the
unrefined groups (finest units where the design reached them, coarse groups elsewhere); the
tree keeps every level, and an unrefined group's children have no score. Prefix reuse applies
at every level (each round is sorted by earliest suppressed position by the engine).
"""

from __future__ import annotations

import torch

from ..hierarchy import Hierarchy, build_hierarchy
from ..units import Span
from .base import DEFAULT_BUDGET, Outcome, Problem, TreeEntry


class Hierarchical:
    """Best-first coarse-to-fine refinement within a budget of variants.

    Args:
        max_children: the most members a group may have before its members are cut into
            blocks (also the most groups at the top level).
    """

    name = "hierarchical"

    def __init__(self, max_children: int = 8) -> None:
        if isinstance(max_children, bool) or not isinstance(max_children, int) or (
                max_children < 2):
            raise ValueError(f"max_children must be an int >= 2, got {max_children!r}")
        self.max_children = max_children

    def check(self, units: list[Span], prompt: str | None, granularity: str,
              budget: int | None) -> Hierarchy:
        """The tree over ``units``; refuses (before any forward) a budget that cannot score
        its top level."""
        tree = build_hierarchy(units, prompt, granularity, max_children=self.max_children)
        budget = DEFAULT_BUDGET if budget is None else budget
        top = tree.top
        if len(top) > budget:
            raise ValueError(
                f"budget={budget} cannot score the top level of the hierarchy: it has "
                f"{len(top)} groups ({self._levels(tree, top)}); give budget >= {len(top)}")
        return tree

    def run(self, problem: Problem) -> Outcome:
        tree = self.check(problem.units, problem.prompt, problem.granularity, problem.budget)
        budget = DEFAULT_BUDGET if problem.budget is None else problem.budget
        top = tree.top
        groups = tree.groups
        entries: list[TreeEntry] = []
        entry_of: dict[int, int] = {}  # group index -> entry index
        scores: dict[int, float] = {}

        def score(members: list[int], parent: int | None) -> None:
            rise = problem.evaluate([list(groups[g].units) for g in members])
            ranked = problem.rank(rise)
            for g, row, s in zip(members, rise, ranked.tolist(), strict=True):
                entry_of[g] = len(entries)
                entries.append(TreeEntry(span=groups[g].span, level=groups[g].level,
                                         parent=parent, rise=row.clone()))
                scores[g] = float(s)

        score(list(top), None)
        spent, rounds = len(top), 1
        while True:
            left = budget - spent
            candidates = [g for g in entry_of if groups[g].children
                          and not entries[entry_of[g]].refined
                          and len(groups[g].children) <= left]
            if not candidates:
                break
            best = min(candidates, key=lambda g: (-scores[g], groups[g].span.positions[0]))
            entries[entry_of[best]].refined = True
            score(list(groups[best].children), entry_of[best])
            spent += len(groups[best].children)
            rounds += 1
        leaves = sorted((k for k, e in enumerate(entries) if not e.refined),
                        key=lambda k: (entries[k].span.positions[0], k))
        rise = torch.stack([entries[k].rise for k in leaves])
        unrefined = sum(1 for g, k in entry_of.items()
                        if groups[g].children and not entries[k].refined)
        return Outcome(
            spans=[entries[k].span for k in leaves], rise=rise, tree=entries,
            settings={"design": self.name, "budget": budget, "variants": spent,
                      "rounds": rounds, "max_children": self.max_children,
                      "levels": tree.depth(), "unrefined_groups": unrefined})

    @staticmethod
    def _levels(tree, members) -> str:
        names: dict[str, int] = {}
        for g in members:
            names[tree.groups[g].level] = names.get(tree.groups[g].level, 0) + 1
        return ", ".join(f"{n} {level}" for level, n in names.items())
