"""The head / tail class split of ImbSAM and SSE-SAM, and the group losses their closures produce."""

from __future__ import annotations

from typing import NamedTuple

import torch

from difffeat.errors import UserError


class GroupLosses(NamedTuple):
    """The head-class and tail-class parts of a batch loss (scalars); `n_*` are sample counts when known."""

    head: torch.Tensor
    tail: torch.Tensor
    n_head: int | None = None
    n_tail: int | None = None


IMBSAM_ETA = 20.0
"""ImbSAM's tail threshold (cool-xuan/Imbalanced_SAM `scripts/train.py`, `--eta 20`): 30 tail classes of
CIFAR-100-LT at imbalance 100."""

RELATIVE_TAIL_FRACTION = 0.2
"""The former difffeat rule η = 0.2·n_max: the SSE-SAM README's η = 100 on CIFAR-100-LT (n_max = 500), as a
ratio so that it carries over to data sets of other sizes (65 tail classes on CIFAR-100-LT)."""

TAIL_RULES = ("imbsam", "relative")


def tail_classes(class_counts, eta: float = IMBSAM_ETA) -> list[int]:
    """T = {c : n_c < η}, from training (or labelled-pixel) counts. ImbSAM uses η = 20, the SSE-SAM README 100.

    >>> tail_classes([500, 100, 19, 3], eta=20)
    [2, 3]
    """
    counts = torch.as_tensor(class_counts).flatten()
    return [int(c) for c in torch.nonzero(counts < eta).flatten()]


def tail_eta(class_counts, rule: str = "imbsam", fraction: float = RELATIVE_TAIL_FRACTION) -> float:
    """The tail threshold η of a rule: "imbsam" η = 20 (released; absolute, whatever the data set's size),
    "relative" η = `fraction`·n_max (difffeat's former default; η = 100 on CIFAR-100-LT, as SSE-SAM's README).

    >>> tail_eta([500, 99, 19, 3]), tail_eta([500, 99, 19, 3], "relative")
    (20.0, 100.0)
    >>> tail_classes([500, 99, 19, 3], tail_eta([500, 99, 19, 3], "relative"))
    [1, 2, 3]
    """
    if rule == "imbsam":
        return IMBSAM_ETA
    if rule == "relative":
        return fraction * float(torch.as_tensor(class_counts, dtype=torch.float64).max())
    raise UserError(f"tail rule must be one of {', '.join(TAIL_RULES)}, got {rule!r}")


def tail_tensor(tail_classes) -> torch.Tensor:
    """Tail classes as a 1-D int64 tensor of class ids, from ids or a boolean mask over the classes."""
    tail = torch.as_tensor(tail_classes)
    if tail.dtype == torch.bool:
        tail = torch.nonzero(tail).flatten()
    return tail.long().flatten()


def split_losses(losses: torch.Tensor, targets: torch.Tensor, tail: torch.Tensor, normalization: str = "batch",
                 tail_weight: float = 1.0, ignore_index: int | None = None) -> GroupLosses:
    """Split per-sample (or per-pixel) losses into the head and tail group losses.

    With B the valid samples (targets ≠ `ignore_index`), H and T its head and tail parts:
    `normalization="batch"` (SSE-SAM): L_H = Σ_H ℓ / |B|, L_T = w·Σ_T ℓ / |B|, so L_H + L_T is the batch mean
    when w = 1; `"group"` (the ImbSAM variant in the SSE-SAM repo): L_H = Σ_H ℓ / |H|, L_T = w·Σ_T ℓ / |T|.
    w = `tail_weight` (the official ImbSAM code hard-codes 2). An empty group's loss is 0, never NaN.
    """
    losses, targets = losses.reshape(-1), targets.reshape(-1)
    if losses.shape != targets.shape:
        raise UserError(f"per-sample losses {tuple(losses.shape)} and targets {tuple(targets.shape)} differ in size")
    valid = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None else targets != ignore_index
    is_tail = torch.isin(targets, tail.to(targets.device)) & valid
    is_head = valid & ~is_tail
    n_head, n_tail = int(is_head.sum()), int(is_tail.sum())
    zero = losses.sum() * 0.0
    head_sum = torch.where(is_head, losses, zero).sum()
    tail_sum = torch.where(is_tail, losses, zero).sum()
    if normalization == "batch":
        n = max(n_head + n_tail, 1)
        head_loss, tail_loss = head_sum / n, tail_sum / n
    elif normalization == "group":
        head_loss, tail_loss = head_sum / max(n_head, 1), tail_sum / max(n_tail, 1)
    else:
        raise ValueError(f"normalization must be 'batch' or 'group', got {normalization!r}")
    return GroupLosses(head_loss, tail_weight * tail_loss, n_head, n_tail)
