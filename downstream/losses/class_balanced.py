"""Class-balanced weights by the effective number of samples (Cui et al. 2019) and their deferred use (DRW)."""

from __future__ import annotations

import torch

from downstream.losses.prior import as_counts


def class_balanced_weights(class_counts, beta: float = 0.9999) -> torch.Tensor:
    """w_c = (1 − β) / (1 − β^{n_c}), normalised to Σ_c w_c = C (float32).

    (1 − β^n)/(1 − β) is the effective number of samples of a class with n samples; β = 0 gives uniform weights
    and β → 1 inverse-frequency weights. The counts must be real sample (or pixel) counts, since β^n is not
    scale-free. A class with zero samples is counted as one sample (the largest weight any class can get), so
    no weight is inf. Use as `F.cross_entropy(..., weight=w)` (a weighted mean, as in the LDAM-DRW code).

    >>> class_balanced_weights([1, 1], beta=0.5).tolist()
    [1.0, 1.0]
    >>> [round(w, 4) for w in class_balanced_weights([1, 3], beta=0.5).tolist()]  # 1/0.5 : 1/0.875, sum 2
    [1.2727, 0.7273]
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = as_counts(class_counts).clamp(min=1.0)
    weights = (1.0 - beta) / (1.0 - beta ** counts)
    return (weights / weights.sum() * counts.numel()).float()


def drw_weights(class_counts, epoch: int, switch_epoch: int, beta: float = 0.9999) -> torch.Tensor:
    """Deferred re-weighting (Cao et al. 2019): uniform weights before `switch_epoch`, CB weights (β) from it on.

    The LDAM-DRW and DDC code switch at epoch 160 of 200 (`deferred_switch_epoch`).
    """
    return class_balanced_weights(class_counts, beta if epoch >= switch_epoch else 0.0)


def deferred_switch_epoch(total_epochs: int, fraction: float = 0.8) -> int:
    """The epoch at which deferred schemes (DRW, ADRW, TLA) switch: ⌊0.8·E⌋, i.e. 160 of 200, 320 of 400.

    The DDC code computes (E // 200)·160, which is 0 for E < 200; this is the intended 0.8·E for any E.
    """
    return int(fraction * total_epochs + 1e-9)
