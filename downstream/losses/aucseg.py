"""AUCSeg's objective: cross-entropy plus λ times the pixel AUC loss (research/aucseg_dirmixe.md A.3).

The AUCSeg code sums ``w_auc · ½ · L_ovo + CE`` (its AUC value carries a hidden ½; A.2). Our
`pixel_auc_loss` is the plain mean OvO loss ``L_ovo``, so λ = 0.5 here reproduces their Cityscapes and
COCO-Stuff setting (w_auc = 1) and λ = 2 their ADE20K setting (w_auc = 4). Both terms are on from the first
iteration, with no ramp, as there.

CE averaging (`ce_average`): mmseg's CE, the one in AUCSeg's configs (`avg_non_ignore=False`), divides the
summed pixel losses by *all* pixels of the batch, ignored ones included ("all"); torch's divides by the
valid pixels ("valid", our default and difffeat's behaviour so far). With "valid" CE is larger by
r = n_all/n_valid ≥ 1, so CE_valid + λ·AUC = r·(CE_all + (λ/r)·AUC). Relative to AUCSeg's configs, the
effective λ under "valid" is therefore λ·n_all/n_valid in this sense: a config's λ_A is reproduced by
λ = λ_A·n_all/n_valid, and a given λ weighs the AUC term as λ·n_valid/n_all would in AUCSeg (less, the more
pixels are ignored). r changes from batch to batch, so no single λ does it for a whole run: use "all" to
reproduce AUCSeg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from downstream.losses.distributed import distributed_pixel_auc_loss, is_distributed
from downstream.losses.pixel_auc import pixel_auc_loss

DEFAULT_AUC_WEIGHT = 0.5  # ≙ AUCSeg's w_auc = 1 (Cityscapes, COCO-Stuff) with its ½ folded in
DEFAULT_MARGIN = 1.0  # γ of the square surrogate; no released config changes it
CE_AVERAGES = ("valid", "all")


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


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None,
                      ignore_index: int = 255, average: str = "valid") -> torch.Tensor:
    """Pixel cross-entropy ℓ_p = −w_{y_p}·log softmax(z_p)_{y_p} (w = `class_weights`, else 1), averaged:

        "valid" (torch):  Σ_{p valid} ℓ_p / Σ_{p valid} w_{y_p}   (the mean over non-ignored pixels)
        "all"   (mmseg):  Σ_{p valid} ℓ_p / n_all                  (every pixel counts, ignored ones too)

    "all" is mmseg's `cross_entropy` with `avg_non_ignore=False` (AUCSeg's configs): class weights scale the
    pixel losses but do not enter the denominator there. All pixels ignored: "valid" gives NaN (as torch),
    "all" gives 0.

    >>> z, y = torch.zeros(1, 2, 1, 4), torch.tensor([[[0, 1, 255, 255]]])  # each valid pixel: log 2
    >>> [round(seg_cross_entropy(z, y, average=a).item(), 4) for a in ("valid", "all")]  # log 2, log 2 · 2/4
    [0.6931, 0.3466]
    """
    if average == "valid":
        return F.cross_entropy(logits, labels, weight=class_weights, ignore_index=ignore_index)
    if average == "all":
        pixel = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=ignore_index, reduction="none")
        return pixel.sum() / labels.numel()
    raise ValueError(f"ce_average must be one of {', '.join(CE_AVERAGES)}, got {average!r}")


def aucseg_loss(logits: torch.Tensor, labels: torch.Tensor, auc_weight: float = DEFAULT_AUC_WEIGHT,
                margin: float = DEFAULT_MARGIN, class_weights: torch.Tensor | None = None,
                ignore_index: int = 255, ce_average: str = "valid") -> torch.Tensor:
    """``CE(logits, labels; class_weights) + λ · pixel_auc_loss(logits, labels, margin)``.

    `logits` ``[B, K, H, W]`` at the labels' resolution, `labels` ``[B, H, W]``. CE is `seg_cross_entropy`
    with `ce_average`: "valid" (torch: the mean over non-ignored pixels, weighted mean with `class_weights`)
    or "all" (mmseg, as AUCSeg: divided by all pixels); see the module docstring for the effective λ.

    >>> logits = torch.tensor([[[[3.0, -3.0]], [[-3.0, 3.0]]]])
    >>> labels = torch.tensor([[[0, 1]]])
    >>> ce = F.cross_entropy(logits, labels); auc = pixel_auc_loss(logits, labels)
    >>> bool(torch.isclose(aucseg_loss(logits, labels, auc_weight=0.5), ce + 0.5 * auc))
    True
    """
    return SegLoss("aucseg", auc_weight, margin, class_weights, ignore_index, ce_average)(logits, labels)[0]


class SegLoss(nn.Module):
    """The training loss of `train_seg`: "ce" or "aucseg" (= CE + λ·AUC); returns (total, parts).

    `parts` holds the detached CE and AUC (0-d tensors) for logging; under "ce" the AUC is still reported
    (computed without a graph) so that both runs log the same numbers. `ce_average`: "valid" (default) or
    "all" (AUCSeg's mmseg CE), see `seg_cross_entropy`.

    `sync_moments`: the AUC of the global batch under data-parallel training, from every process's class
    moments (`downstream.losses.distributed.distributed_pixel_auc_loss`; each process alone would pair only its
    own pixels). None (default): whenever a process group of more than one process runs, as under
    `accelerate launch` / torchrun; every process must then call the loss at each step. CE stays per process
    (data-parallel averaging makes it the mean of the processes' means).
    """

    def __init__(self, kind: str = "aucseg", auc_weight: float = DEFAULT_AUC_WEIGHT, margin: float = DEFAULT_MARGIN,
                 class_weights: torch.Tensor | None = None, ignore_index: int = 255, ce_average: str = "valid",
                 sync_moments: bool | None = None):
        super().__init__()
        if kind not in ("ce", "aucseg"):
            raise ValueError(f"unknown loss {kind!r} (valid: ce, aucseg)")
        if ce_average not in CE_AVERAGES:
            raise ValueError(f"ce_average must be one of {', '.join(CE_AVERAGES)}, got {ce_average!r}")
        self.kind, self.auc_weight, self.margin, self.ignore_index = kind, auc_weight, margin, ignore_index
        self.ce_average, self.sync_moments = ce_average, sync_moments
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weight = None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)
        ce = seg_cross_entropy(logits, labels, weight, self.ignore_index, self.ce_average)
        sync = is_distributed() if self.sync_moments is None else self.sync_moments
        auc_loss = distributed_pixel_auc_loss if sync else pixel_auc_loss
        if self.kind == "aucseg" and self.auc_weight != 0:
            auc = auc_loss(logits, labels, self.margin, self.ignore_index)
            total = ce + self.auc_weight * auc
        else:
            with torch.no_grad():
                auc = auc_loss(logits.detach(), labels, self.margin, self.ignore_index)
            total = ce
        return total, {"ce": ce.detach(), "auc": auc.detach()}  # tensors: no device sync per step
