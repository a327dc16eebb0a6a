"""Random joint suppressions and a sparse linear surrogate (ContextCite's estimator on AtMan's
own perturbation: no re-tokenisation, so it works for any unit and modality).

K masks (K = the budget), each unit suppressed with probability 1 - ``keep_prob``
independently (seeded: the same seed gives the same masks and bit-identical scores); one
variant per mask suppresses all its units together. A LASSO fit of the rises on the
suppression indicators (:func:`..estimate.fit_lasso`, every target row at once) gives each
unit's coefficient: the estimated rise of suppressing it alone. The scores are surrogate
coefficients, not single-unit rises, and the Explanation's ``estimate`` says so, with the
fit's quality: "lds", the Spearman correlation between out-of-fold predictions and measured
combined rises over ``folds``-fold cross-validation of the K masks (no extra forward), and
"r2" in sample. A mask that keeps every unit has rise 0 and runs no forward.
"""

from __future__ import annotations

import math

import torch

from ..estimate import cross_validated_spearman, fit_lasso
from ..units import Span
from .base import DEFAULT_BUDGET, Outcome, Problem


class Sampled:
    """K random joint suppressions, a LASSO surrogate (see the module doc).

    Args:
        keep_prob: probability that a unit is kept (not suppressed) in a mask, in (0, 1).
        seed: the masks' seed.
        alpha: the LASSO's L1 weight on standardised columns (ContextCite's 0.01).
        folds: cross-validation folds for the fit quality.
    """

    name = "sampled"

    def __init__(self, keep_prob: float = 0.5, seed: int = 0, alpha: float = 0.01,
                 folds: int = 5) -> None:
        if isinstance(keep_prob, bool) or not isinstance(keep_prob, (int, float)) or not (
                0.0 < float(keep_prob) < 1.0):
            raise ValueError(f"keep_prob must be a number in (0, 1) (the probability a unit "
                             f"is kept in a mask), got {keep_prob!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
                math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        self.keep_prob, self.seed, self.alpha, self.folds = float(keep_prob), seed, alpha, folds

    def masks(self, k: int, n_units: int) -> torch.Tensor:
        """[K, U] float64 suppression indicators (1 = suppressed) of the seeded masks."""
        gen = torch.Generator().manual_seed(self.seed)
        return (torch.rand(k, n_units, generator=gen, dtype=torch.float64)
                >= self.keep_prob).to(torch.float64)

    def check(self, units: list[Span], prompt: str | None, granularity: str,
              budget: int | None) -> None:
        """Refuse (before any forward) a budget below 2 masks."""
        k = DEFAULT_BUDGET if budget is None else budget
        if k < 2:
            raise ValueError(f"design 'sampled' needs budget >= 2 masks to fit a surrogate, "
                             f"got budget={k}")

    def run(self, problem: Problem) -> Outcome:
        self.check(problem.units, problem.prompt, problem.granularity, problem.budget)
        k = DEFAULT_BUDGET if problem.budget is None else problem.budget
        n = len(problem.units)
        x = self.masks(k, n)
        run = [i for i in range(k) if bool(x[i].any())]
        rows = problem.evaluate([torch.nonzero(x[i]).flatten().tolist() for i in run])
        y = torch.zeros(k, rows.shape[1], dtype=torch.float64)
        if run:
            y[torch.as_tensor(run)] = rows
        fit = fit_lasso(x, y, self.alpha)
        combined = problem.rank(y)  # [K] the combined rise of each mask
        pred = problem.rank(fit.predict(x))
        resid = float(((combined - pred) ** 2).sum())
        total = float(((combined - combined.mean()) ** 2).sum())
        estimate = {
            "method": "lasso", "design": self.name, "masks": k, "keep_prob": self.keep_prob,
            "seed": self.seed, "alpha": self.alpha, "folds": self.folds,
            "lds": cross_validated_spearman(x, combined, self.alpha, self.folds),
            "r2": 1.0 - resid / total if total > 0 else math.nan,
            "iterations": fit.iterations,
            "meaning": "scores are LASSO coefficients of a linear surrogate fit to the rises "
                       "of random joint suppressions (the estimated rise of suppressing a "
                       "unit alone), not measured single-unit rises; lds is the Spearman "
                       "correlation of out-of-fold predictions with measured rises",
        }
        return Outcome(spans=list(problem.units), rise=fit.coef, estimate=estimate,
                       settings={"design": self.name, "budget": k, "variants": len(run),
                                 "keep_prob": self.keep_prob, "seed": self.seed})
