"""Estimators: from the rises of joint suppressions to scores per unit.

The sampled design (:mod:`.design.sampled`) suppresses random subsets of the units and fits a
sparse linear surrogate to the measured rises (ContextCite's estimator, on AtMan's own
perturbation): rise(mask) ~ b + sum_j w_j * suppressed_j. The coefficient w_j estimates the
rise that suppressing unit j alone would cause; it is an *estimate*, and the Explanation says
so, with the fit's quality measured on masks the fit did not see (k-fold cross-validation:
the Spearman correlation of the out-of-fold predictions with the measured rises, ContextCite's
LDS).

The fit is the LASSO on standardised columns, min_W (1 / 2K) ||Y - X W||^2 + alpha ||W||_1
(scikit-learn's objective), solved by FISTA for every target row at once, in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LassoFit:
    """A fitted surrogate: ``coef`` [U, R] in the raw (unstandardised) units of the masks,
    ``intercept`` [R], and the solver's iterations."""

    coef: torch.Tensor
    intercept: torch.Tensor
    iterations: int

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """[K, R] predicted rises of the masks ``x`` [K, U] (1 = suppressed)."""
        return x.to(torch.float64) @ self.coef + self.intercept


def fit_lasso(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.01, *,
              max_iter: int = 5000, tol: float = 1e-10) -> LassoFit:
    """LASSO of ``y`` [K, R] on ``x`` [K, U] (columns standardised, y centred).

    A column that never varies (a unit suppressed in every mask or in none) gets coefficient
    0: nothing in the data tells its effect apart from the intercept.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x must be [K, U] and y [K, R] with the same K, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
            and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    k = x.shape[0]
    mean_x, mean_y = x.mean(dim=0), y.mean(dim=0)
    sd = x.std(dim=0, unbiased=False)
    live = sd > 1e-12
    z = torch.zeros_like(x)
    z[:, live] = (x[:, live] - mean_x[live]) / sd[live]
    yc = y - mean_y
    gram = z.T @ z / k
    xty = z.T @ yc / k
    lipschitz = float(torch.linalg.eigvalsh(gram).max()) if gram.numel() else 0.0
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
    it = 0
    if lipschitz > 0:
        step = 1.0 / lipschitz
        v, t = w.clone(), 1.0
        while it < max_iter:
            it += 1
            grad = gram @ v - xty
            u = v - step * grad
            w_new = torch.sign(u) * torch.clamp(u.abs() - step * alpha, min=0.0)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            v = w_new + ((t - 1) / t_new) * (w_new - w)
            delta = float((w_new - w).abs().max())
            w, t = w_new, t_new
            if delta < tol:
                break
    coef = torch.zeros_like(w)
    coef[live] = w[live] / sd[live, None]
    intercept = mean_y - mean_x @ coef
    return LassoFit(coef=coef, intercept=intercept, iterations=it)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two [K] vectors (average ranks for ties); NaN when
    either is constant."""
    ra, rb = _ranks(a.to(torch.float64)), _ranks(b.to(torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def _ranks(v: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=torch.float64)
    # ties: the mean rank of each group of equal values
    values = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and values[j + 1] == values[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def cross_validated_spearman(x: torch.Tensor, y: torch.Tensor, alpha: float,
                             folds: int = 5) -> float:
    """Spearman correlation between out-of-fold predictions and measured ``y`` [K] (the
    combined rise of each mask), masks assigned to folds in order (the masks are random
    already); NaN when there are fewer masks than 2 per fold."""
    k = x.shape[0]
    folds = min(folds, k // 2)
    if folds < 2:
        return math.nan
    pred = torch.empty(k, dtype=torch.float64)
    fold_of = torch.arange(k) % folds
    for f in range(folds):
        test = fold_of == f
        fit = fit_lasso(x[~test], y[~test, None], alpha)
        pred[test] = fit.predict(x[test])[:, 0]
    return spearman(pred, y)
