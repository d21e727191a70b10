"""Bootstrap intervals over images, the paired test GATE decides by, and Spearman's rank correlation.

Every score is a statistic of per-image values; resampling images with replacement (percentile bootstrap)
gives its 95% interval without assuming a distribution, and resampling the *same* images for a candidate
and for `reference` gives the interval of their paired difference: a candidate is significantly better
when that interval lies above 0 (a two-sided 95% paired bootstrap test). Across several candidates, Holm's
step-down correction of the bootstrap p-values keeps the chance of accepting any useless candidate at 5%.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# A statistic of resampled images: index rows [k, n] → k values (row 0 of `arange(n)[None]` is the estimate).
Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def resample(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot, n] image indices drawn with replacement; share one draw across candidates to pair them."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap(stat: Statistic, idx: np.ndarray, level: float = 0.95) -> Interval:
    """The statistic on all images and its percentile interval over the resamples `idx` [n_boot, n]."""
    n = idx.shape[1]
    value = float(stat(np.arange(n)[None])[0])
    samples = np.asarray(stat(idx), dtype=np.float64)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(value, float(low), float(high))


def mean_of(values) -> Statistic:
    """The mean of per-image values as a `Statistic`."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: v[idx].mean(axis=1)


def difference(a: Statistic, b: Statistic) -> Statistic:
    """``a − b`` on the same resampled images (the paired difference)."""
    return lambda idx: a(idx) - b(idx)


def rankdata(x) -> np.ndarray:
    """Ranks 1…n of x, ties given the mean of the ranks they span (as scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 … end
            start = end
    return ranks


def spearman(x, y) -> float:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks; NaN when either side is constant
    or there are fewer than 3 pairs (a correlation of 2 points is always ±1 and says nothing)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs, got {len(x)} and {len(y)} values")
    if len(x) < 3:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def bootstrap_p(stat: Statistic, idx: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0" (a paired difference): twice the smaller share of
    resamples on either side of 0, each share counted as (k + 1) / (n_boot + 1) so that p is never 0."""
    samples = np.asarray(stat(idx), dtype=np.float64)
    n = len(samples)
    low, high = (np.sum(samples <= 0) + 1) / (n + 1), (np.sum(samples >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(low, high)))


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, float]:
    """Holm's step-down adjusted p-values: with the m p-values sorted, p_(i) becomes max_{j ≤ i} min(1,
    (m − j + 1)·p_(j)); a hypothesis is rejected at family-wise error `alpha` when its adjusted p ≤ alpha."""
    names = sorted(pvalues, key=pvalues.get)
    m, running, adjusted = len(names), 0.0, {}
    for i, name in enumerate(names):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        adjusted[name] = running
    return adjusted
