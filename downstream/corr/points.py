"""Where a keypoint lies in the frame the model saw, and back: image pixels ↔ frame ↔ feature grid.

Three coordinate systems, one convention each:

- **image pixels** (x, y): a keypoint as SPair annotates it and DIFT indexes it, pixel (i, j)'s centre at (i, j);
  the image of size (H0, W0) spans [-0.5, W0 - 0.5] × [-0.5, H0 - 0.5].
- **frame** (u, v) in [0, 1]²: the extraction frame the image was resized / cropped / padded into, normalised. A
  `difffeat.data.geometry.Placement` records the box (x0, y0, x1, y1), in image pixel *edges*, that the frame covers,
  so ``u = (x + 0.5 − x0) / (x1 − x0)``. A point of a centre-cropped image may fall outside [0, 1]: the model never
  saw it.
- **grid** of n cells along an axis (a feature map, or a working lattice): cell i's centre at ``u = (i + 0.5) / n``,
  the convention of bilinear resizing with ``align_corners=False`` (DIFT's `nn.Upsample`).

A store whose image is a resized copy of the pair's (its recorded size differs) is read by scaling the pair's
points to the stored size (`rescale`). Pure functions on arrays.
"""

from __future__ import annotations

import numpy as np

from difffeat.data.geometry import Placement, placement


def image_to_frame(points: np.ndarray, place: Placement) -> np.ndarray:
    """``[N, 2]`` image pixel positions (x, y) → frame positions (u, v)."""
    x0, y0, x1, y1 = place.box
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return np.stack([(p[:, 0] + 0.5 - x0) / (x1 - x0), (p[:, 1] + 0.5 - y0) / (y1 - y0)], axis=1)


def frame_to_image(uv: np.ndarray, place: Placement) -> np.ndarray:
    """``[N, 2]`` frame positions (u, v) → image pixel positions (x, y); the inverse of `image_to_frame`."""
    x0, y0, x1, y1 = place.box
    q = np.asarray(uv, np.float64).reshape(-1, 2)
    return np.stack([q[:, 0] * (x1 - x0) + x0 - 0.5, q[:, 1] * (y1 - y0) + y0 - 0.5], axis=1)


def grid_to_frame(index: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[N, 2]`` (column, row) positions on a grid of `size` = (h, w) cells (fractional for a sub-cell position)
    → frame positions (u, v)."""
    h, w = size
    i = np.asarray(index, np.float64).reshape(-1, 2)
    return np.stack([(i[:, 0] + 0.5) / w, (i[:, 1] + 0.5) / h], axis=1)


def frame_to_grid(uv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[N, 2]`` frame positions → fractional (column, row) positions on a grid of `size` = (h, w)."""
    h, w = size
    q = np.asarray(uv, np.float64).reshape(-1, 2)
    return np.stack([q[:, 0] * w - 0.5, q[:, 1] * h - 0.5], axis=1)


def in_frame(uv: np.ndarray) -> np.ndarray:
    """``[N]`` bool: the frame position lies inside the frame (the model saw it)."""
    q = np.asarray(uv, np.float64).reshape(-1, 2)
    return np.all((q >= 0) & (q <= 1), axis=1)


def in_image(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[N]`` bool: the pixel position lies inside an image of `size` = (H0, W0) and is finite."""
    h0, w0 = size
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return (np.isfinite(p).all(axis=1) & (p[:, 0] >= -0.5) & (p[:, 0] <= w0 - 0.5) & (p[:, 1] >= -0.5)
            & (p[:, 1] <= h0 - 0.5))


def rescale(points: np.ndarray, size: tuple[int, int], to: tuple[int, int]) -> np.ndarray:
    """Pixel positions in an image of `size` = (H, W) → the same places in a resized copy of size `to`."""
    (h, w), (h2, w2) = size, to
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return np.stack([(p[:, 0] + 0.5) * w2 / w - 0.5, (p[:, 1] + 0.5) * h2 / h - 0.5], axis=1)


def whole_image(size: tuple[int, int]) -> Placement:
    """The placement of an image that *is* the frame (features over the whole image, no crop or pad)."""
    return placement(size, size, "stretch")


def image_lattice(place: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Frame positions of every pixel centre of the image: ``(u [W0], v [H0])``, the lattice on which features are
    read at the image's own size (DIFT). The lattice is affine in the pixel index, as `image_to_frame` is."""
    h0, w0 = place.size
    x0, y0, x1, y1 = place.box
    return (np.arange(w0) + 0.5 - x0) / (x1 - x0), (np.arange(h0) + 0.5 - y0) / (y1 - y0)
