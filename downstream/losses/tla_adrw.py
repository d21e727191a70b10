"""The two-stage VS → TLA + ADRW schedule of the DDC code (research/longtail_suite.md §3.2).

Stage 1 (epochs before the switch, 0.8·E by default): the VS loss, no weights. Stage 2: truncated logit
adjustment (TLA: the multiplicative VS term dropped, only z + τ·log π kept) with adaptive deferred
re-weighting (ADRW: w_c ∝ π_c^(−ν)). Both stages are plain functions of logits, usable with any head; the
module only decides which one applies at the current epoch. The naming follows the code (the `-T` rule and
`train_rule = ADRW` of wang22ti/DDC `cifar_train.py`); the paper's own definitions could not be read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from downstream.losses.class_balanced import deferred_switch_epoch
from downstream.losses.prior import class_prior, class_view, warn_zero_counts
from downstream.losses.vs import vs_loss


def adrw_weights(class_counts, nu: float = 0.25) -> torch.Tensor:
    """ADRW class weights w_c = π_c^(−ν), normalised to Σ_c w_c = C (float32); ν = 0 gives uniform weights.

    π is floored (`prior.PRIOR_FLOOR`), so a zero-count class has a large but finite weight. Under a weighted
    mean (`F.cross_entropy(weight=…)`) its value matters only for batches that contain that class.

    >>> [round(w, 4) for w in adrw_weights([1, 3], nu=1.0).tolist()]  # 1/0.25 : 1/0.75 = 3 : 1, sum 2
    [1.5, 0.5]
    """
    prior = class_prior(class_counts)
    weights = prior ** (-nu)
    return (weights / weights.sum() * prior.numel()).float()


def tla_adrw_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts, tau: float = 0.75, nu: float = 0.25,
                  reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Stage 2: CE(z + τ·log π, y; weight w) with w = `adrw_weights(counts, ν)` (a weighted mean).

    Defaults are the DDC stage-2 settings for CIFAR-100-LT-100 (ν = 0.25, τ = 0.75). ν = 0 gives the
    logit-adjusted loss.

    >>> z, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    >>> w = adrw_weights([3, 1], 0.5)
    >>> ref = F.cross_entropy(z + 0.75 * torch.log(torch.tensor([0.75, 0.25])), y, weight=w)
    >>> torch.allclose(tla_adrw_loss(z, y, [3, 1], tau=0.75, nu=0.5), ref)
    True
    """
    prior = class_prior(class_counts, like=logits)
    weight = adrw_weights(class_counts, nu).to(device=logits.device, dtype=logits.dtype)
    adjusted = logits + class_view(tau * torch.log(prior), logits)
    return F.cross_entropy(adjusted, targets, weight=weight, reduction=reduction, ignore_index=ignore_index)


class TLAADRWLoss(nn.Module):
    """VS before `switch_epoch`, TLA + ADRW from it on; call `set_epoch(epoch)` at the start of every epoch.

    Stage 1 takes (γ₁, τ₁), stage 2 (τ₂, ν): the DDC scripts set them independently (stage 2 is a resumed
    run). Defaults: CIFAR-100-LT-100, stage 1 γ = 0.05, τ = 1.0; stage 2 τ = 0.75, ν = 0.25.
    `switch_epoch=None` takes ⌊0.8·total_epochs⌋ (`deferred_switch_epoch`).
    """

    def __init__(self, class_counts, total_epochs: int | None = None, switch_epoch: int | None = None,
                 gamma: float = 0.05, tau: float = 1.0, stage2_tau: float = 0.75, nu: float = 0.25,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        if switch_epoch is None:
            if total_epochs is None:
                raise ValueError("give total_epochs or switch_epoch")
            switch_epoch = deferred_switch_epoch(total_epochs)
        warn_zero_counts(class_counts)
        self.register_buffer("class_counts", torch.as_tensor(class_counts, dtype=torch.float64))
        self.switch_epoch, self.epoch = switch_epoch, 0
        self.gamma, self.tau, self.stage2_tau, self.nu = gamma, tau, stage2_tau, nu
        self.reduction, self.ignore_index = reduction, ignore_index

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def stage(self) -> int:
        return 1 if self.epoch < self.switch_epoch else 2

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.stage == 1:
            return vs_loss(logits, targets, self.class_counts, self.gamma, self.tau, reduction=self.reduction,
                           ignore_index=self.ignore_index)
        return tla_adrw_loss(logits, targets, self.class_counts, self.stage2_tau, self.nu, self.reduction,
                             self.ignore_index)
