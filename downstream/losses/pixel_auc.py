"""AUCSeg's pixel-level AUC loss (research/aucseg_dirmixe.md A.2–A.5)."""

from __future__ import annotations

import torch


def pixel_auc_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                   ignore_index: int = 255) -> torch.Tensor:
    """AUCSeg's one-vs-one square-surrogate pixel AUC loss, in O(nK) by class moments.

    With scores s = sigmoid(logits) ([B,K,H,W] → n pixels × K channels, ignored pixels removed) and P the
    classes present in the batch (K_b = |P|), for every ordered pair (c, d) of distinct present classes

        ℓ(c|d) = mean over p with y_p = c and q with y_q = d of (margin − s[p,c] + s[q,c])²
               = (margin − μ_cc + μ_dc)² + σ²_cc + σ²_dc,

    where μ_dc and σ²_dc are the mean and population variance of channel c over the pixels of class d.
    The loss is the mean of ℓ over the K_b(K_b − 1) pairs (no ½, unlike the AUCSeg code). The moment form
    is an identity (brief A.5): same value and gradients as the pairwise mean, without forming pairs.
    With fewer than two classes present it is 0, still connected to `logits` so backward works.

    >>> logits = torch.tensor([[[[3.0, -3.0]], [[-3.0, 3.0]]]])  # [1, 2, 1, 2]: pixel 0 → class 0, 1 → 1
    >>> round(pixel_auc_loss(logits, torch.tensor([[[0, 1]]])).item(), 4)
    0.009
    """
    k = logits.shape[1]
    s = torch.sigmoid(logits).movedim(1, -1).reshape(-1, k)
    y = labels.reshape(-1)
    keep = y != ignore_index
    s, y = s[keep], y[keep].long()
    counts = torch.bincount(y, minlength=k)[:k]
    present = counts > 0
    kb = int(present.sum())
    if kb < 2:
        return logits.sum() * 0.0
    # Class moments in float64: sums of squares of scores in [0, 1] over up to 10⁶ pixels.
    s64 = s.double()
    sum1 = torch.zeros(k, k, dtype=torch.float64, device=s.device).index_add_(0, y, s64)
    sum2 = torch.zeros(k, k, dtype=torch.float64, device=s.device).index_add_(0, y, s64 * s64)
    n = counts.clamp(min=1).double()[:, None]
    mu, m2 = sum1 / n, sum2 / n  # row d: pixels of class d; column c: channel c
    var = m2 - mu * mu
    mu_cc, var_cc = mu.diagonal(), var.diagonal()
    pair = (margin - mu_cc[None, :] + mu) ** 2 + var_cc[None, :] + var  # pair[d, c] = ℓ(c|d)
    mask = present[:, None] & present[None, :] & ~torch.eye(k, dtype=torch.bool, device=s.device)
    return (pair[mask].sum() / (kb * (kb - 1))).to(logits.dtype)


def pixel_auc_loss_pairwise(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                            ignore_index: int = 255) -> torch.Tensor:
    """The definition of `pixel_auc_loss`, pair by pair (O(n²) memory): the reference for tests only."""
    k = logits.shape[1]
    s = torch.sigmoid(logits).movedim(1, -1).reshape(-1, k)
    y = labels.reshape(-1)
    keep = y != ignore_index
    s, y = s[keep], y[keep]
    classes = [c for c in range(k) if (y == c).any()]
    if len(classes) < 2:
        return logits.sum() * 0.0
    terms = [((margin - s[y == c, c][:, None] + s[y == d, c][None, :]) ** 2).mean()
             for c in classes for d in classes if c != d]
    return torch.stack(terms).mean()
