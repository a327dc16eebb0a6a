"""Suppression factors for AtMan variants, plain and conceptual (docs/semantics.md).

Conceptual suppression: tokens that carry the same concept leak it back when only one of them
is suppressed, so suppressing position j also lowers the positions whose layer-0 input
embedding is similar to j's:

- sim_jk = cos(e_j, e_k), rows L2-normalised with eps 1e-8, clipped to [-1, 1];
- j gets the factor c; every k != j with sim_jk >= kappa gets 1 - (1 - c) * sim_jk;
- where several suppressed positions reach the same key, the minimum factor wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .factors import first_changed_position

__all__ = [
    "check_factor",
    "check_threshold",
    "cosine_similarity_matrix",
    "first_changed_position",
    "suppression_factors",
    "unit_factors",
]


def check_factor(factor: float) -> float:
    """Validate the suppression factor c (finite, >= 0) and return it as a float."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"factor must be a number, got {type(factor).__name__}")
    factor = float(factor)
    if not math.isfinite(factor) or factor < 0:
        raise ValueError(f"factor must be finite and >= 0 (0.1 suppresses to 10%), got {factor}")
    return factor


def check_threshold(threshold: float | None) -> float | None:
    """Validate the conceptual threshold kappa (None = off, else in [0, 1])."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"conceptual_threshold must be a number in [0, 1] or None, got "
            f"{type(threshold).__name__}"
        )
    threshold = float(threshold)
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(
            f"conceptual_threshold must be in [0, 1] (or None to turn it off), got {threshold}"
        )
    return threshold


def cosine_similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """[N, N] cosine similarity of the rows of ``embeddings`` [N, D], clipped to [-1, 1].

    Rows are L2-normalised with eps 1e-8 (a zero row has similarity 0 to everything).
    Computed in float32 (float64 for float64 input).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape [N, D], got {tuple(embeddings.shape)}")
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    e = embeddings.detach().to(dtype)
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (e @ e.T).clamp(-1.0, 1.0)


def unit_factors(
    seq_len: int,
    units: Sequence[Sequence[int]],
    factor: float,
    *,
    similarity: torch.Tensor | None = None,
    threshold: float | None = None,
    eligible: Sequence[int] | None = None,
) -> torch.Tensor:
    """Factors [V, seq_len] for V variants, variant v suppressing every position of ``units[v]``.

    Without ``similarity``/``threshold`` a variant has ``factor`` at its unit's positions and 1
    elsewhere. With both (conceptual suppression), suppressing a unit is the union of
    suppressing each of its positions: a key k outside the unit, in ``eligible`` (default:
    every position), whose similarity to some position j of the unit is >= ``threshold`` gets
    1 - (1 - factor) * sim_jk, and where several positions reach k the smallest factor (the
    largest similarity) wins. A unit of one position is the paper's definition.

    Args:
        seq_len: number of key positions N.
        units: the positions of each variant's unit (V non-empty lists, each in [0, N)).
        factor: c, finite and >= 0.
        similarity: [N, N] similarity of the positions (``cosine_similarity_matrix``).
        threshold: kappa in [0, 1], or None for plain suppression.
        eligible: positions that conceptual suppression may touch.
    """
    factor = check_factor(factor)
    threshold = check_threshold(threshold)
    members = torch.zeros(len(units), seq_len, dtype=torch.bool)
    for v, unit in enumerate(units):
        idx = torch.as_tensor(list(unit), dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError(f"unit {v} has no positions: every variant suppresses at least one")
        if int(idx.min()) < 0 or int(idx.max()) >= seq_len:
            raise ValueError(f"unit positions must lie in [0, {seq_len}), got {idx.tolist()}")
        members[v, idx] = True
    dtype = similarity.dtype if similarity is not None else torch.float32
    out = torch.ones(len(units), seq_len, dtype=dtype)
    if threshold is not None and similarity is not None:
        if tuple(similarity.shape) != (seq_len, seq_len):
            raise ValueError(
                f"similarity must have shape [{seq_len}, {seq_len}], got {tuple(similarity.shape)}"
            )
        sim = similarity.detach().cpu()
        # largest similarity of each key to any position of the unit: [V, N]
        reach = torch.stack([sim[m].amax(dim=0) for m in members]) if len(units) else out
        related = (reach >= threshold) & ~members
        if eligible is not None:
            allowed = torch.zeros(seq_len, dtype=torch.bool)
            allowed[torch.as_tensor(list(eligible), dtype=torch.long)] = True
            related &= allowed[None, :]
        # min with 1: an amplifying factor (> 1) amplifies the unit only, never its neighbours
        out = torch.where(related, torch.clamp(1.0 - (1.0 - factor) * reach, max=1.0), out)
    return torch.where(members, torch.full_like(out, factor), out)


def suppression_factors(
    seq_len: int,
    suppressed: Sequence[int],
    factor: float,
    *,
    similarity: torch.Tensor | None = None,
    threshold: float | None = None,
    eligible: Sequence[int] | None = None,
) -> torch.Tensor:
    """Factors [V, seq_len], variant v suppressing the single position ``suppressed[v]``.

    :func:`unit_factors` with units of one position (the paper's per-token variants).
    """
    return unit_factors(seq_len, [[int(j)] for j in suppressed], factor, similarity=similarity,
                        threshold=threshold, eligible=eligible)
