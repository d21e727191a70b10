"""Logit adjustment (Menon et al., research/longtail_suite.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from downstream.losses.prior import class_prior


def logit_adjusted_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted cross-entropy (Menon et al.): CE(logits + τ·log π, y), π = counts / Σ counts.

    A class with no training samples gets the floored prior `PRIOR_FLOOR`, so the loss stays finite.

    Adding the log prior during training makes the raw logits a balanced (prior-free) classifier.

    >>> logit_adjusted_loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([1.0, 1.0])).item() == F.cross_entropy(
    ...     torch.zeros(1, 2), torch.tensor([0])).item()
    True
    """
    prior = class_prior(class_counts, like=logits).to(logits.dtype)  # zero counts floored: no inf
    return F.cross_entropy(logits + tau * torch.log(prior), targets)
