"""Class priors from training counts, with a floor for classes that have no training samples."""

from __future__ import annotations

import warnings

import torch

from difffeat.errors import UserError

PRIOR_FLOOR = 1e-8
"""Smallest class prior the losses use. A class with zero training samples gets this prior (then the vector is
renormalised), so that log π, π^(−ν) and (π_c/π_max)^γ stay finite: no inf or NaN reaches a loss."""


def as_counts(class_counts, like: torch.Tensor | None = None) -> torch.Tensor:
    """Class counts as a float64 vector, checked: 1-D, finite, non-negative, not all zero (else UserError)."""
    kwargs = {} if like is None else {"device": like.device}
    counts = torch.as_tensor(class_counts, dtype=torch.float64, **kwargs).detach()
    if counts.ndim != 1 or counts.numel() == 0:
        raise UserError(f"class_counts: expected a non-empty 1-D vector, got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise UserError("class_counts: counts must be finite and non-negative")
    if counts.sum() <= 0:
        raise UserError("class_counts: every class count is zero")
    return counts


def class_prior(class_counts, floor: float = PRIOR_FLOOR, like: torch.Tensor | None = None) -> torch.Tensor:
    """π = counts / Σ counts, floored at `floor` and renormalised (float64, on `like`'s device if given).

    Counts may be sample counts, pixel counts or an already normalised prior: only their ratios matter.

    >>> [round(p, 6) for p in class_prior([3, 1, 0]).tolist()]
    [0.75, 0.25, 0.0]
    >>> bool(class_prior([3, 1, 0])[2] > 0)
    True
    """
    counts = as_counts(class_counts, like)
    prior = (counts / counts.sum()).clamp(min=floor)
    return prior / prior.sum()


def zero_count_classes(class_counts) -> list[int]:
    """Indices of classes with no training samples (to report; their prior is floored at PRIOR_FLOOR)."""
    return [int(c) for c in torch.nonzero(as_counts(class_counts) == 0).flatten()]


def warn_zero_counts(class_counts) -> list[int]:
    """Warn about (report) classes with no training samples; returns their indices."""
    missing = zero_count_classes(class_counts)
    if missing:
        warnings.warn(f"classes {missing} have no training samples; their prior is floored at {PRIOR_FLOOR:g}",
                      stacklevel=3)
    return missing


def class_view(vector: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A per-class vector shaped to broadcast against logits [B, C] or [B, C, H, W, …] (classes on dim 1)."""
    return vector.to(logits.dtype).view(1, -1, *([1] * (logits.ndim - 2)))
