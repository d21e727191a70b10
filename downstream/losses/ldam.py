"""LDAM loss with a cosine classifier (Cao et al. 2019; research/longtail_suite.md §3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from downstream.losses.prior import as_counts, warn_zero_counts


class CosineClassifier(nn.Module):
    """z = scale · cos(x, w_c) = scale · (x / ‖x‖)ᵀ (w_c / ‖w_c‖): a linear head on the unit sphere, no bias.

    LDAM's `NormedLinear` (scale 1, the loss multiplies by s) and DirMixE's experts (scale 30) are this head.
    `weight` is [C, d] like `nn.Linear`.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.uniform_(self.weight, -1.0, 1.0)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def ldam_margins(class_counts, max_margin: float = 0.5) -> torch.Tensor:
    """m_c = max_margin · n_c^(−1/4) / max_j n_j^(−1/4) (float64): rarer classes get larger margins.

    The max runs over classes with samples; a class with zero samples gets `max_margin` (the margin of the
    rarest class it could be), never inf. Counts may be a prior: the margins depend only on ratios.

    >>> ldam_margins([16, 1, 0]).tolist()
    [0.25, 0.5, 0.5]
    """
    counts = as_counts(class_counts)
    present = counts > 0
    raw = torch.where(present, counts.clamp(min=1e-300) ** -0.25, torch.zeros_like(counts))
    return torch.where(present, max_margin * raw / raw[present].max(), torch.full_like(counts, max_margin))


def ldam_loss(cosine_logits: torch.Tensor, targets: torch.Tensor, margins: torch.Tensor, scale: float = 30.0,
              weight: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """LDAM: CE(s·(z − m_y·e_y), y; weight), z the cosine logits (in [−1, 1]) of a `CosineClassifier`.

    The target logit of each sample is lowered by its class margin m_y (`ldam_margins`) before scaling by s,
    so the classifier must beat the other classes by m_y in cosine. `weight` are optional per-class weights
    (DRW: `drw_weights`), a weighted mean as in `F.cross_entropy`. Logits are [B, C] or [B, C, H, W, …].

    >>> z, y, m = torch.tensor([[0.5, 0.2]]), torch.tensor([0]), torch.tensor([0.1, 0.3])
    >>> torch.allclose(ldam_loss(z, y, m, scale=2.0), F.cross_entropy(2.0 * torch.tensor([[0.4, 0.2]]), y))
    True
    """
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    onehot = F.one_hot(safe, cosine_logits.shape[1]).movedim(-1, 1).to(cosine_logits.dtype)
    onehot = onehot * valid.unsqueeze(1).to(cosine_logits.dtype)
    margin = margins.to(device=cosine_logits.device, dtype=cosine_logits.dtype)[safe].unsqueeze(1)
    shifted = scale * (cosine_logits - margin * onehot)
    if weight is not None:
        weight = weight.to(device=cosine_logits.device, dtype=cosine_logits.dtype)
    return F.cross_entropy(shifted, targets, weight=weight, reduction=reduction, ignore_index=ignore_index)


class LDAMLoss(nn.Module):
    """`ldam_loss` with the margins (from class counts) and optional class weights held as buffers.

    For LDAM-DRW set `loss.weight = drw_weights(counts, epoch, switch_epoch)` at each epoch.
    """

    def __init__(self, class_counts, max_margin: float = 0.5, scale: float = 30.0,
                 weight: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        warn_zero_counts(class_counts)
        self.register_buffer("margins", ldam_margins(class_counts, max_margin).float())
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.scale, self.reduction, self.ignore_index = scale, reduction, ignore_index

    def forward(self, cosine_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ldam_loss(cosine_logits, targets, self.margins, self.scale, self.weight, self.reduction,
                         self.ignore_index)
