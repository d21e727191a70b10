"""Vector-scaling (VS) loss (Kini et al. 2021; research/longtail_suite.md §3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from downstream.losses.prior import class_prior, class_view, warn_zero_counts


def vs_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts, gamma: float = 0.05, tau: float = 1.0,
            weight: torch.Tensor | None = None, multiplicative: bool = True, reduction: str = "mean",
            ignore_index: int = -100) -> torch.Tensor:
    """VS loss: CE(Δ ⊙ z + ι, y) with Δ_c = (π_c / max_j π_j)^γ and ι_c = τ·log π_c, π the class prior.

    Δ (multiplicative) enlarges the margin of rare classes; ι (additive) is Menon's logit adjustment. So
    γ = 0 gives the logit-adjusted loss and γ = τ = 0 plain cross-entropy. `multiplicative=False` drops Δ
    (the "truncated" stage of TLA). `weight` are per-class weights as in `F.cross_entropy` (a weighted mean).
    Logits are [B, C] or [B, C, H, W, …] with the classes on dim 1. Zero-count classes: the prior is floored
    (`prior.PRIOR_FLOOR`), so nothing is inf or NaN.

    >>> z, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    >>> torch.allclose(vs_loss(z, y, [3, 1], gamma=0.0, tau=0.0), F.cross_entropy(z, y))
    True
    """
    prior = class_prior(class_counts, like=logits)
    adjusted = logits
    if multiplicative and gamma != 0:
        adjusted = adjusted * class_view((prior / prior.max()) ** gamma, logits)
    if tau != 0:
        adjusted = adjusted + class_view(tau * torch.log(prior), logits)
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(adjusted, targets, weight=weight, reduction=reduction, ignore_index=ignore_index)


class VSLoss(nn.Module):
    """`vs_loss` with the class counts (and optional class weights) held as buffers.

    Warns once, at construction, about classes with zero training samples.
    """

    def __init__(self, class_counts, gamma: float = 0.05, tau: float = 1.0, weight: torch.Tensor | None = None,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        warn_zero_counts(counts)
        self.register_buffer("class_counts", counts)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.gamma, self.tau, self.reduction, self.ignore_index = gamma, tau, reduction, ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, multiplicative: bool = True) -> torch.Tensor:
        return vs_loss(logits, targets, self.class_counts, self.gamma, self.tau, self.weight, multiplicative,
                       self.reduction, self.ignore_index)

