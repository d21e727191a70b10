"""Optimizers for long-tailed training: the sharpness-aware SAM, ImbSAM and SSE-SAM, each wrapping any base
optimizer and usable with any loss (the closure returns the loss; see `downstream.optim.sam`), and PESG, DRAUC's
optimizer of the AUC min-max problem."""

from downstream.optim.head_tail import (
    IMBSAM_ETA,
    RELATIVE_TAIL_FRACTION,
    TAIL_RULES,
    GroupLosses,
    split_losses,
    tail_classes,
    tail_eta,
    tail_tensor,
)
from downstream.optim.imbsam import RELEASED_TAIL_WEIGHT, ImbSAM
from downstream.optim.pesg import PESG
from downstream.optim.sam import SAM, SharpnessAware
from downstream.optim.ssesam import SSESAM

__all__ = ["PESG", "SAM", "SSESAM", "GroupLosses", "IMBSAM_ETA", "ImbSAM", "RELATIVE_TAIL_FRACTION",
           "RELEASED_TAIL_WEIGHT", "SharpnessAware", "TAIL_RULES", "split_losses", "tail_classes", "tail_eta",
           "tail_tensor"]
