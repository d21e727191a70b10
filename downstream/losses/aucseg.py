"""AUCSeg's objective: cross-entropy plus λ times the pixel AUC loss (research/aucseg_dirmixe.md A.3).

The AUCSeg code sums ``w_auc · ½ · L_ovo + CE`` (its AUC value carries a hidden ½; A.2). Our
`pixel_auc_loss` is the plain mean OvO loss ``L_ovo``, so λ = 0.5 here reproduces their Cityscapes and
COCO-Stuff setting (w_auc = 1) and λ = 2 their ADE20K setting (w_auc = 4). Both terms are on from the first
iteration, with no ramp, as there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from downstream.losses.pixel_auc import pixel_auc_loss

DEFAULT_AUC_WEIGHT = 0.5  # ≙ AUCSeg's w_auc = 1 (Cityscapes, COCO-Stuff) with its ½ folded in
DEFAULT_MARGIN = 1.0  # γ of the square surrogate; no released config changes it


def class_weights_from_counts(counts: Sequence[float] | torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Cross-entropy class weights ``w_c ∝ (N_c / ΣN)^(−power)``, scaled to mean 1 over classes seen.

    power 1 is inverse frequency, 0.5 its square root; a class with no pixels gets weight 0.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    seen = n > 0
    w = torch.zeros_like(n)
    w[seen] = (n[seen] / n.sum()) ** (-power)
    w[seen] /= w[seen].mean()
    return w.float()


def aucseg_loss(logits: torch.Tensor, labels: torch.Tensor, auc_weight: float = DEFAULT_AUC_WEIGHT,
                margin: float = DEFAULT_MARGIN, class_weights: torch.Tensor | None = None,
                ignore_index: int = 255) -> torch.Tensor:
    """``CE(logits, labels; class_weights) + λ · pixel_auc_loss(logits, labels, margin)``.

    `logits` ``[B, K, H, W]`` at the labels' resolution, `labels` ``[B, H, W]``. CE is torch's: the mean
    over non-ignored pixels (weighted mean with `class_weights`).

    >>> logits = torch.tensor([[[[3.0, -3.0]], [[-3.0, 3.0]]]])
    >>> labels = torch.tensor([[[0, 1]]])
    >>> ce = F.cross_entropy(logits, labels); auc = pixel_auc_loss(logits, labels)
    >>> bool(torch.isclose(aucseg_loss(logits, labels, auc_weight=0.5), ce + 0.5 * auc))
    True
    """
    return SegLoss("aucseg", auc_weight, margin, class_weights, ignore_index)(logits, labels)[0]


class SegLoss(nn.Module):
    """The training loss of `train_seg`: "ce" or "aucseg" (= CE + λ·AUC); returns (total, parts).

    `parts` holds the detached CE and AUC (0-d tensors) for logging; under "ce" the AUC is still reported
    (computed without a graph) so that both runs log the same numbers.
    """

    def __init__(self, kind: str = "aucseg", auc_weight: float = DEFAULT_AUC_WEIGHT, margin: float = DEFAULT_MARGIN,
                 class_weights: torch.Tensor | None = None, ignore_index: int = 255):
        super().__init__()
        if kind not in ("ce", "aucseg"):
            raise ValueError(f"unknown loss {kind!r} (valid: ce, aucseg)")
        self.kind, self.auc_weight, self.margin, self.ignore_index = kind, auc_weight, margin, ignore_index
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        ce = F.cross_entropy(logits, labels, weight=weight, ignore_index=self.ignore_index)
        if self.kind == "aucseg" and self.auc_weight != 0:
            auc = pixel_auc_loss(logits, labels, self.margin, self.ignore_index)
            total = ce + self.auc_weight * auc
        else:
            with torch.no_grad():
                auc = pixel_auc_loss(logits.detach(), labels, self.margin, self.ignore_index)
            total = ce
        return total, {"ce": ce.detach(), "auc": auc.detach()}  # tensors: no device sync per step
