"""Metrics of ``eval_quality.py``: ranking quality against a ground-truth token set, and the
area under deletion/insertion curves.

Conventions (the same for every method):

- ``scores`` is a 1-D tensor over the *candidate* tokens (for question answering: the context
  tokens; see eval_quality.py), higher = more important; ``relevant`` a bool tensor of the same
  length (the evidence sentence's tokens).
- A ranking sorts by descending score; equal scores are ordered by a seeded random permutation
  (:func:`ranking`), so that ties never favour early or late tokens.
- Average precision: AP = (1/|G|) * sum over ranks k holding a relevant token of precision@k.
- Average recall (the paper reports "mAR" without defining it; this is our definition):
  AR = (1/n) * sum_{k=1..n} recall@k, the normalised area under the recall-vs-cut-off curve.
  A perfect ranking scores 1 - (|G| - 1) / (2n); a random one (n + 1) / (2n) on average.
- Top-1 accuracy (document task, one relevant sentence): 1 when the first-ranked unit is
  relevant, else 0; :func:`relevant_rank` gives the 1-based rank of the best-ranked relevant
  unit (with one relevant unit, AP = 1 / that rank).
- Mass precision and recall (the paper's image metrics, docs/semantics.md), with
  x = max(score, 0): precision = sum(x*y) / sum(x), recall = sum((x / max x) * y) / sum(y).
  Both are 0 when no score is positive.
"""

from __future__ import annotations

import math

import torch


def _check(scores: torch.Tensor, relevant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got {getattr(scores, 'shape', scores)}")
    if not isinstance(relevant, torch.Tensor) or relevant.shape != scores.shape:
        raise ValueError(f"relevant must be a tensor of the scores' shape {tuple(scores.shape)}, "
                         f"got {getattr(relevant, 'shape', relevant)}")
    if scores.numel() == 0:
        raise ValueError("scores is empty: nothing to rank")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    relevant = relevant.bool()
    if not relevant.any():
        raise ValueError("relevant holds no True entry: the ground truth is empty")
    return scores.double(), relevant


def ranking(scores: torch.Tensor, tie_seed: int = 0) -> torch.Tensor:
    """Indices of ``scores`` [n] in descending order; ties in a seeded random order. -> [n]."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got {getattr(scores, 'shape', scores)}")
    gen = torch.Generator().manual_seed(int(tie_seed))
    perm = torch.randperm(scores.numel(), generator=gen)
    order = torch.argsort(scores.double()[perm], descending=True, stable=True)
    return perm[order]


def average_precision(scores: torch.Tensor, relevant: torch.Tensor, tie_seed: int = 0) -> float:
    """AP of the ranking of ``scores`` [n] against the ``relevant`` [n] set."""
    scores, relevant = _check(scores, relevant)
    hits = relevant[ranking(scores, tie_seed)].double()
    precision_at_k = hits.cumsum(0) / torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    return float((precision_at_k * hits).sum() / hits.sum())


def top1(scores: torch.Tensor, relevant: torch.Tensor, tie_seed: int = 0) -> float:
    """1.0 when the first unit of the ranking of ``scores`` [n] is relevant, else 0.0."""
    scores, relevant = _check(scores, relevant)
    return float(relevant[ranking(scores, tie_seed)[0]])


def relevant_rank(scores: torch.Tensor, relevant: torch.Tensor, tie_seed: int = 0) -> int:
    """1-based rank of the best-ranked relevant unit in the ranking of ``scores`` [n]."""
    scores, relevant = _check(scores, relevant)
    return int(torch.nonzero(relevant[ranking(scores, tie_seed)])[0, 0]) + 1


def average_recall(scores: torch.Tensor, relevant: torch.Tensor, tie_seed: int = 0) -> float:
    """AR = mean over cut-offs k = 1..n of recall@k (see the module docstring)."""
    scores, relevant = _check(scores, relevant)
    hits = relevant[ranking(scores, tie_seed)].double()
    return float((hits.cumsum(0) / hits.sum()).mean())


def mass_precision_recall(scores: torch.Tensor, relevant: torch.Tensor) -> tuple[float, float]:
    """The paper's (precision, recall) of the clipped score mass (see the module docstring)."""
    scores, relevant = _check(scores, relevant)
    x = scores.clamp(min=0)
    y = relevant.double()
    if float(x.max()) <= 0:
        return 0.0, 0.0
    precision = float((x * y).sum() / x.sum())
    recall = float(((x / x.max()) * y).sum() / y.sum())
    return precision, recall


def removal_counts(n: int, steps: int) -> list[int]:
    """How many tokens are removed (or restored) at each of ``steps + 1`` curve points:
    round(i * n / steps) for i = 0..steps (0 first, n last)."""
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be >= 1, got n={n}, steps={steps}")
    return [int(round(i * n / steps)) for i in range(steps + 1)]


def curve_auc(values: torch.Tensor | list[float]) -> float:
    """Area under a curve sampled at equally spaced fractions 0, 1/s, ..., 1 (trapezoid rule);
    for a constant curve c the area is c."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() != 1 or v.numel() < 2:
        raise ValueError(f"values must be a 1-D curve of at least 2 points, got {tuple(v.shape)}")
    return float(((v[1:] + v[:-1]) / 2).sum() / (v.numel() - 1))


# ------------------------------------------------------------------ intervals (contrast task)
def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default z): (low, high)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: list[float] | torch.Tensor, seed: int = 0, n_boot: int = 2000,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled ``n_boot`` times with
    a seeded generator): (low, high)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() < 1 or n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need at least one value, n_boot >= 1 and 0 < level < 1, got "
                         f"{v.numel()} values, n_boot={n_boot}, level={level}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(v.numel(), (n_boot, v.numel()), generator=gen)
    means = v[idx].mean(dim=1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(lo), float(hi)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes: ``only_a`` pairs where A
    succeeds and B fails, ``only_b`` the reverse (a binomial test of only_a ~ Bin(sum, 1/2))."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
