"""PCK: the share of keypoints matched within a distance threshold (semantic correspondence's score).

For a pair p with valid keypoints k = 1 … n_p, ground truth g_k and prediction ĝ_k in the target image's pixels::

    correct_k   = ‖ĝ_k − g_k‖₂ ≤ α · L_p                     (≤ as DIFT; GeoAware-SC's training code uses <)
    L_p (bbox)  = max(x2 − x1, y2 − y1) of the target's bounding box     PCK@α_bbox
    L_p (img)   = max(H, W) of the target image                          PCK@α_img
    per point   = Σ_p Σ_k correct_k / Σ_p n_p                  (pooled over keypoints)
    per image   = (1 / |P|) Σ_p (Σ_k correct_k / n_p)          (mean of per-pair fractions; DIFT's "per image")

Pairs without a valid keypoint have no per-pair fraction: they are left out of both and counted. Per category the
same sums run over that category's pairs; "overall" pools every pair (DIFT; GeoAware-SC's pair- or keypoint-weighted
category mean is the same number), and ``category_mean`` is the plain mean of the per-category values (DiTF).
Intervals: percentile bootstrap over pairs (`bootstrap_interval`).

Pure functions on arrays; nothing here knows about stores or images.

>>> import numpy as np
>>> correct = np.array([3, 0, 1]); points = np.array([3, 2, 4])
>>> pck_per_point(correct, points), pck_per_image(correct, points)  # 4/9 and (1 + 0 + 0.25) / 3
(0.4444444444444444, 0.4166666666666667)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NORMALISATIONS = ("bbox", "img")
AVERAGES = ("per_point", "per_image")


def reference_length(norm: str, bbox: Sequence[float] | None = None, size: Sequence[int] | None = None) -> float:
    """L of one pair: ``max(w, h)`` of the target `bbox` (x1, y1, x2, y2) for "bbox", ``max(H, W)`` of the
    target image `size` (H, W) for "img"."""
    if norm == "bbox":
        x1, y1, x2, y2 = (float(v) for v in bbox)
        return max(x2 - x1, y2 - y1)
    if norm == "img":
        return float(max(size[0], size[1]))
    raise ValueError(f"unknown normalisation {norm!r} (valid: {', '.join(NORMALISATIONS)})")


def correct_points(predicted: np.ndarray, truth: np.ndarray, threshold: float) -> np.ndarray:
    """``[N]`` bool: ‖predicted − truth‖₂ ≤ threshold, for ``[N, 2]`` positions."""
    d = np.linalg.norm(np.asarray(predicted, np.float64) - np.asarray(truth, np.float64), axis=-1)
    return d <= threshold


def pck_per_point(correct: np.ndarray, points: np.ndarray) -> float:
    """Σ correct / Σ points over pairs (``[P]`` counts each); NaN without any point."""
    total = np.sum(points)
    return float(np.sum(correct) / total) if total > 0 else float("nan")


def pck_per_image(correct: np.ndarray, points: np.ndarray) -> float:
    """Mean over the pairs with at least one point of correct / points; NaN without such a pair."""
    correct, points = np.asarray(correct, np.float64), np.asarray(points, np.float64)
    keep = points > 0
    return float(np.mean(correct[keep] / points[keep])) if keep.any() else float("nan")


def bootstrap_interval(correct: np.ndarray, points: np.ndarray, draws: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap interval of PCK per point and per image, pairs resampled with replacement:
    ``{"per_point": [low, high], "per_image": [low, high]}`` (NaN when `draws` is 0 or there is no point)."""
    correct, points = np.asarray(correct, np.float64), np.asarray(points, np.float64)
    keep = points > 0
    correct, points = correct[keep], points[keep]
    nan = {a: [float("nan"), float("nan")] for a in AVERAGES}
    if draws <= 0 or len(points) == 0:
        return nan
    rng = np.random.default_rng(seed)
    fraction = correct / points
    per_point, per_image = np.empty(draws), np.empty(draws)
    block = max(1, 4_000_000 // len(points))  # bounded memory: [block, P] indices at a time
    for start in range(0, draws, block):
        stop = min(draws, start + block)
        idx = rng.integers(0, len(points), size=(stop - start, len(points)))
        per_point[start:stop] = correct[idx].sum(1) / points[idx].sum(1)
        per_image[start:stop] = fraction[idx].mean(1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {"per_point": [float(v) for v in np.percentile(per_point, q)],
            "per_image": [float(v) for v in np.percentile(per_image, q)]}


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, points: np.ndarray, draws: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """PCK of A minus PCK of B on the same pairs (same ``[P]`` point counts), per point and per image, each as
    ``[difference, low, high]`` with a percentile bootstrap interval from resampling the pairs once for both (a
    paired comparison: the pairs' difficulty cancels)."""
    a, b, n = (np.asarray(v, np.float64) for v in (correct_a, correct_b, points))
    keep = n > 0
    a, b, n = a[keep], b[keep], n[keep]
    if not len(n):
        return {avg: [float("nan")] * 3 for avg in AVERAGES}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(draws, len(n))) if draws > 0 else np.zeros((0, len(n)), int)
    diff_point = (a[idx].sum(1) - b[idx].sum(1)) / n[idx].sum(1)
    diff_image = ((a - b) / n)[idx].mean(1)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = {}
    for avg, whole, boot in (("per_point", (a.sum() - b.sum()) / n.sum(), diff_point),
                             ("per_image", np.mean((a - b) / n), diff_image)):
        low, high = np.percentile(boot, q) if draws > 0 else (float("nan"), float("nan"))
        out[avg] = [float(whole), float(low), float(high)]
    return out


def pck_scores(correct: np.ndarray, points: np.ndarray, draws: int = 0, seed: int = 0) -> dict:
    """PCK per point and per image of pairs with these ``[P]`` counts, each with its bootstrap interval
    (``…_low`` / ``…_high``, when `draws` > 0), and the counts."""
    out: dict = {"per_point": pck_per_point(correct, points), "per_image": pck_per_image(correct, points),
                 "pairs": int(np.sum(np.asarray(points) > 0)), "points": int(np.sum(points)),
                 "correct": int(np.sum(correct))}
    if draws > 0:
        ci = bootstrap_interval(correct, points, draws, seed)
        for avg in AVERAGES:
            out[f"{avg}_low"], out[f"{avg}_high"] = ci[avg]
    return out


def pck_table(correct: np.ndarray, points: np.ndarray, categories: Sequence[str], draws: int = 0,
              seed: int = 0) -> dict:
    """Overall and per-category `pck_scores` of pairs with ``[P]`` counts and categories, plus ``category_mean``
    (the plain mean over categories of their per-point and per-image values)."""
    correct, points = np.asarray(correct), np.asarray(points)
    cats = np.asarray(list(categories), dtype=object)
    per_category = {}
    for c in sorted(set(cats.tolist())):
        sel = cats == c
        per_category[c] = pck_scores(correct[sel], points[sel], draws, seed)
    mean = {avg: float(np.nanmean([s[avg] for s in per_category.values()])) if per_category else float("nan")
            for avg in AVERAGES}
    return {"overall": pck_scores(correct, points, draws, seed), "category_mean": mean, "per_category": per_category}
