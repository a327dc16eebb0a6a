"""Factor rows of AtMan variants from groups of unit positions, and what the engine reads off
a row (its earliest suppressed position).

A design (:mod:`.design`) asks for *groups* of units suppressed together; a variant's factor
row suppresses every position of every unit in its group (:func:`group_factors`). With
conceptual suppression the row is the union of the units' conceptual rows
(:func:`.conceptual.unit_factors` gives one row per unit): the minimum factor at each key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def first_changed_position(factors: torch.Tensor) -> torch.Tensor:
    """[V] earliest position whose factor != 1 in each row of ``factors`` [V, N] (N if none)."""
    changed = factors != 1
    n = factors.shape[1]
    pos = torch.arange(n).expand_as(factors)
    return torch.where(changed, pos, torch.full_like(pos, n)).amin(dim=1)


def group_factors(unit_rows: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """[G, N] factor rows, row g suppressing every unit of ``groups[g]`` together.

    Args:
        unit_rows: [U, N] the factor row of each unit suppressed alone (plain or conceptual).
        groups: G non-empty lists of unit indices in [0, U).

    The rows combine by the minimum (where several units reach a key, the strongest
    suppression wins: the same rule as overlapping conceptual suppression). Factors > 1
    (amplification) combine by the maximum instead, so a group of amplified units amplifies
    each of them.
    """
    n_units = unit_rows.shape[0]
    out = []
    for g, group in enumerate(groups):
        idx = [int(u) for u in group]
        if not idx:
            raise ValueError(f"groups[{g}] is empty: a variant suppresses at least one unit")
        if min(idx) < 0 or max(idx) >= n_units:
            raise ValueError(f"groups[{g}] holds unit indices outside 0..{n_units - 1}: {idx}")
        rows = unit_rows[idx]
        low = rows.amin(dim=0)
        high = rows.amax(dim=0)
        out.append(torch.where(high > 1, high, low))
    if not out:
        return unit_rows[:0]
    return torch.stack(out)
