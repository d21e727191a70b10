"""Top-K pairwise ranking (TKPR) for multi-label ranking (Wang et al., arXiv 2407.06709; longtail_suite.md §4).

RECONSTRUCTED FROM THE ABSTRACT. TKPR has no released code (none was found on GitHub or in the paper's
pages) and only the abstract could be read, so nothing here is checked against the authors' definitions.
The abstract states: TKPR is a measure with pointwise, pairwise and listwise views, compatible with P@K,
R@K, AP@K and NDCG@K, a tight upper bound of the ranking loss, with Fisher-consistent convex surrogates and
O(C·K) cost per sample.

The definition chosen here, consistent with those facts: with P the positive labels, N the negatives and
s^N_[j] the j-th largest negative score, each positive is charged for the negatives that outrank it,
counted up to K,

    TKPR-loss_K(s, y) = 1/(K_eff·|P|) · Σ_{i∈P} Σ_{j≤K_eff} 1[s^N_[j] ≥ s_i],   K_eff = min(K, |N|),

(ties count as errors; TKPR = 1 − loss). It equals the ranking loss at K ≥ |N| and is ≥ it for every K. Its
training surrogates replace the indicator by a convex non-increasing φ of the margin, in a pairwise form
(default) or a pointwise one (`tkpr_surrogate_loss`). Check both against the paper's §3–4 before claiming
faithfulness: in particular its consistent surrogate may be the pointwise form, not the pairwise one
(pairwise convex surrogates are in general not consistent for the ranking loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SURROGATES = {
    "hinge": lambda t: F.relu(1.0 - t),
    "squared_hinge": lambda t: F.relu(1.0 - t) ** 2,
    "logistic": lambda t: F.softplus(-t),
    "exp": lambda t: torch.exp(-t),
}


def _top_negatives(scores: torch.Tensor, targets: torch.Tensor, k: int):
    """The K_eff = min(K, |N|) largest negative scores per sample ([B, min(K, C)], padded with −inf), a mask of
    the real entries, K_eff, and the positive mask."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    pos = targets.bool()
    negative_scores = scores.masked_fill(pos, -float("inf"))
    top = negative_scores.topk(min(k, scores.shape[1]), dim=1).values
    k_eff = (~pos).sum(1).clamp(max=k)
    real = torch.arange(top.shape[1], device=scores.device)[None, :] < k_eff[:, None]
    return top, real, k_eff, pos


def _reduce(per_sample: torch.Tensor, has_pos: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if not has_pos.any():
        return per_sample.sum() * 0.0
    return per_sample[has_pos].mean()


def tkpr_loss(scores: torch.Tensor, targets: torch.Tensor, k: int, reduction: str = "mean") -> torch.Tensor:
    """TKPR loss [reconstructed]: the mean over positives of min(K, #negatives scoring ≥ it) / K_eff.

    For scores s [B, C] and multi-hot targets, with s^N_[j] the j-th largest negative score,

        TKPR-loss_K(s, y) = 1/(K_eff·|P|) · Σ_{i∈P} Σ_{j≤K_eff} 1[s^N_[j] ≥ s_i],   K_eff = min(K, |N|).

    Ties count as errors. It equals the ranking loss at K ≥ |N| and is ≥ it for every K. Samples without
    positives are left out of the mean (their entry is 0 with `reduction="none"`), samples without negatives
    score 0. Not differentiable: a measure; train with `tkpr_surrogate_loss`.

    >>> s, y = torch.tensor([[0.9, 0.8, 0.1, 0.5]]), torch.tensor([[0, 1, 1, 0]])
    >>> tkpr_loss(s, y, k=1).item()  # positive 0.8: 1 negative above, capped at 1; 0.1: both above, capped at 1
    1.0
    >>> tkpr_loss(s, y, k=2).item()  # (1/2 + 2/2) / 2
    0.75
    """
    top, real, k_eff, pos = _top_negatives(scores.detach(), targets, k)
    above = (top[:, None, :] >= scores.detach()[:, :, None]) & real[:, None, :]  # [B, C, K]: negative j ≥ s_i
    per_positive = above.sum(-1).to(scores.dtype) / k_eff.clamp(min=1).to(scores.dtype)[:, None]
    n_pos = pos.sum(1)
    per_sample = (per_positive * pos).sum(1) / n_pos.clamp(min=1)
    return _reduce(per_sample, n_pos > 0, reduction)


def tkpr(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """TKPR score [reconstructed] = 1 − `tkpr_loss` (higher is better), the mean over samples with positives."""
    return 1.0 - tkpr_loss(scores, targets, k)


def ranking_loss(scores: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Ranking loss 1/(|P||N|) · Σ_{i∈P, j∈N} 1[s_j ≥ s_i] (ties are errors; O(C²)), over samples with positives
    (0 for a sample without negatives)."""
    pos = targets.bool()
    wrong = (scores[:, None, :] >= scores[:, :, None]) & pos[:, :, None] & ~pos[:, None, :]
    n_pos, n_neg = pos.sum(1), (~pos).sum(1)
    per_sample = wrong.sum((1, 2)).to(scores.dtype) / (n_pos * n_neg).clamp(min=1).to(scores.dtype)
    return _reduce(per_sample, n_pos > 0, reduction)


def tkpr_surrogate_loss(scores: torch.Tensor, targets: torch.Tensor, k: int, surrogate: str = "logistic",
                        form: str = "pairwise", reduction: str = "mean") -> torch.Tensor:
    """Convex surrogates of `tkpr_loss` [reconstructed], φ a convex non-increasing loss of a margin:

        pairwise:  1/(K_eff·|P|) · Σ_{i∈P} Σ_{j≤K_eff} φ(s_i − s^N_[j])
        pointwise: 1/|P| · Σ_{i∈P} φ(s_i) + 1/K_eff · Σ_{j≤K_eff} φ(−s^N_[j])

    φ ∈ `SURROGATES`: hinge (1 − t)₊, squared_hinge, logistic log(1 + e^(−t)), exp e^(−t). Both are convex in s
    (a sum of the K largest of convex functions is convex) and cost O(C·K) per sample (`torch.topk`). The
    pairwise form upper-bounds the loss for φ ≥ 1[t ≤ 0] (hinge, squared hinge, exp). Which form the paper
    proves Fisher-consistent is unverified. Same sample conventions as `tkpr_loss`.

    >>> s, y = torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[0, 1, 0]])
    >>> tkpr_surrogate_loss(s, y, k=1, surrogate="hinge").item()  # φ(0.5 − 1) = 1.5
    1.5
    >>> tkpr_surrogate_loss(s, y, k=2, surrogate="hinge").item()  # (φ(0.5 − 1) + φ(0.5 − 0)) / 2
    1.0
    """
    phi = SURROGATES[surrogate]
    top, real, k_eff, pos = _top_negatives(scores, targets, k)
    n_pos = pos.sum(1)
    k_div = k_eff.clamp(min=1).to(scores.dtype)
    top = torch.where(real, top, torch.zeros_like(top))  # keep −inf out of φ (and out of its gradient)
    if form == "pairwise":
        pair = phi(scores[:, :, None] - top[:, None, :]) * real[:, None, :] * pos[:, :, None]
        per_sample = pair.sum((1, 2)) / (k_div * n_pos.clamp(min=1))
    elif form == "pointwise":
        per_sample = ((phi(scores) * pos).sum(1) / n_pos.clamp(min=1)
                      + (phi(-top) * real).sum(1) / k_div)
    else:
        raise ValueError(f"form must be 'pairwise' or 'pointwise', got {form!r}")
    return _reduce(per_sample, n_pos > 0, reduction)
