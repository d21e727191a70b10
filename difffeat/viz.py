"""Pictures of feature maps: the first principal components of the channels shown as RGB.

This is the standard way to look at diffusion features: pixels with similar features get similar
colours, so parts and objects show up as coloured regions. One PCA is fitted over all the maps given,
so colours mean the same thing across images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from difffeat.atomic import atomic_path
from difffeat.errors import UserError


def _as_maps(features) -> tuple[list[np.ndarray], bool]:
    single = not isinstance(features, (list, tuple))
    maps = [np.asarray(f, dtype=np.float64) for f in ([features] if single else features)]
    if not maps:
        raise ValueError("pca_rgb needs at least one feature map")
    for f in maps:
        if f.ndim != 3:
            raise ValueError(f"feature maps must be [C, h, w], got shape {f.shape}")
        if f.shape[0] != maps[0].shape[0]:
            raise ValueError(f"feature maps differ in channels: {f.shape[0]} and {maps[0].shape[0]}")
    return maps, single


def pca_rgb(features: np.ndarray | list[np.ndarray], n_components: int = 3) -> np.ndarray | list[np.ndarray]:
    """Project [C, h, w] feature maps on their first principal components; uint8 [h, w, n_components].

    The PCA is fitted over all pixels of all maps; each component is scaled to [0, 255] by its 1st and
    99th percentile over all maps (clipped), and its sign fixed so that its largest-magnitude channel
    loading is positive, which makes the picture deterministic. Returns one array for one map, else a
    list. Components beyond the number of channels are black.
    """
    maps, single = _as_maps(features)
    c = maps[0].shape[0]
    x = np.concatenate([f.reshape(c, -1).T for f in maps])  # [pixels, C]
    x = x - x.mean(axis=0)
    # The SVD of the C×C scatter matrix gives the same axes as that of x, in C×C memory instead of pixels×C.
    _, _, vt = np.linalg.svd(x.T @ x if len(x) > c else x, full_matrices=False)
    k = min(n_components, vt.shape[0])
    axes = vt[:k].T  # [C, k]
    biggest = np.abs(axes).argmax(axis=0)
    axes = axes * np.where(axes[biggest, np.arange(k)] < 0, -1.0, 1.0)
    proj = x @ axes  # [pixels, k]
    lo, hi = np.percentile(proj, [1, 99], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)  # a constant component maps to 0
    scaled = np.clip((proj - lo) / span, 0, 1) * 255
    scaled = np.concatenate([scaled, np.zeros((len(scaled), n_components - k))], axis=1)
    pixels = np.rint(scaled).astype(np.uint8)

    out, start = [], 0
    for f in maps:
        h, w = f.shape[1:]
        out.append(pixels[start : start + h * w].reshape(h, w, n_components))
        start += h * w
    return out[0] if single else out


def save_pca_image(features: np.ndarray | list[np.ndarray], out_png: str | os.PathLike, scale: int = 4) -> Path:
    """Write the PCA picture of one map, or of several side by side, as a PNG upscaled `scale`×.

    Several maps share one PCA (see `pca_rgb`) and are separated by white gaps; the file is written
    to a temporary name and renamed, so it is never half-written.
    """
    from PIL import Image

    if scale < 1:
        raise ValueError(f"scale must be ≥ 1, got {scale}")
    images = pca_rgb(features, 3)
    images = [images] if isinstance(images, np.ndarray) else images
    images = [im.repeat(scale, axis=0).repeat(scale, axis=1) for im in images]  # nearest neighbour
    gap = scale
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in images:
        canvas[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    out = Path(out_png)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out.parent}: cannot create folder ({e.strerror or e})") from None
    with atomic_path(out, what="image") as tmp:
        Image.fromarray(canvas, "RGB").save(tmp, format="PNG")
    return out
