"""Canny edge maps as ControlNet control images (OpenCV; thresholds 100 / 200 as the content-shift paper's)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

DEFAULT_LOW, DEFAULT_HIGH = 100, 200


def canny_map(image: np.ndarray, low: int = DEFAULT_LOW, high: int = DEFAULT_HIGH) -> np.ndarray:
    """[H, W, 3] uint8 RGB → [H, W, 3] uint8 edge map (255 on edges), as diffusers' canny ControlNets expect.

    OpenCV's Canny takes the strongest gradient over the colour channels, so edges between equally bright
    colours are kept (a grey conversion would lose them).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"canny_map wants an [H, W, 3] uint8 image, got {image.dtype} {image.shape}")
    edges = cv2.Canny(np.ascontiguousarray(image), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def canny_tensor(images: torch.Tensor, low: int = DEFAULT_LOW, high: int = DEFAULT_HIGH) -> torch.Tensor:
    """[B, 3, H, W] images in [0, 1] → [B, 3, H, W] edge maps in {0, 1} (float32)."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    maps = np.stack([canny_map(a, low, high) for a in arr])
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 255.0
