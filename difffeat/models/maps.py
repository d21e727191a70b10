"""Module outputs as feature maps ``[B, C, h, w]``: what a hook sees (a tensor, a tuple, a diffusers output, a token
sequence over the latent grid) turned into one map, for every backbone."""

from __future__ import annotations

import math

import torch


def first_tensor(output):
    """The tensor a module produced: itself, the first element of a tuple, or a diffusers output's first field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple())
    return None


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) of a token sequence of length n: the latent grid downsampled by a power of two."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == n_tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


def as_map(t: torch.Tensor | None, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """A module output as a [B, C, h, w] map: 4-D as is, token sequences [B, h·w, C] reshaped (a transformer's
    image tokens laid back on the patch grid), else None."""
    if t is None:
        return None
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        grid = token_grid(t.shape[1], latent_hw)
        if grid is not None:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
    return None


def image_tokens(output, index: int | None):
    """The image-token tensor of a module's output: element `index` of a tuple (None: the output itself)."""
    if index is None:
        return first_tensor(output)
    return output[index] if isinstance(output, (tuple, list)) else None
