"""Sharpness-aware optimizers for long-tailed training: SAM, ImbSAM and SSE-SAM, each wrapping any base
optimizer and usable with any loss (the closure returns the loss; see `downstream.optim.sam`)."""

from downstream.optim.head_tail import GroupLosses, split_losses, tail_classes
from downstream.optim.imbsam import ImbSAM
from downstream.optim.sam import SAM, SharpnessAware
from downstream.optim.ssesam import SSESAM

__all__ = ["SAM", "SSESAM", "GroupLosses", "ImbSAM", "SharpnessAware", "split_losses", "tail_classes"]
