"""Pictures of matches: source and target side by side, each match a line from the source point to where it was
matched in the target; green when correct, red when wrong, the ground truth (where known) a hollow circle."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

CORRECT, WRONG, UNSCORED, TRUTH = "#1a9850", "#d73027", "#fdae61", "white"


@dataclass
class MatchPicture:
    """One pair to draw: images, source points ``[N, 2]``, matched points ``[N, 2]`` in target pixels, and per point
    whether it is correct (None: not scored) and its ground truth (None: unknown)."""

    source: Image.Image
    target: Image.Image
    points: np.ndarray
    matched: np.ndarray
    correct: np.ndarray | None = None
    truth: np.ndarray | None = None
    title: str = ""


def _side_by_side(source: Image.Image, target: Image.Image) -> tuple[np.ndarray, float, float]:
    """The two images in one canvas at a common height (the taller's), the target's x offset and its scale."""
    h = max(source.height, target.height)
    s = source.resize((round(source.width * h / source.height), h)) if source.height != h else source
    t = target.resize((round(target.width * h / target.height), h)) if target.height != h else target
    canvas = Image.new("RGB", (s.width + t.width, h))
    canvas.paste(s.convert("RGB"), (0, 0))
    canvas.paste(t.convert("RGB"), (s.width, 0))
    return np.asarray(canvas), s.width, h / target.height


def draw_pair(ax, picture: MatchPicture) -> None:
    """Draw `picture` on a matplotlib axis."""
    canvas, offset, t_scale = _side_by_side(picture.source, picture.target)
    s_scale = canvas.shape[0] / picture.source.height
    ax.imshow(canvas)
    n = len(picture.points)
    for i in range(n):
        if picture.correct is None:
            colour = UNSCORED
        else:
            colour = CORRECT if picture.correct[i] else WRONG
        (x0, y0), (x1, y1) = picture.points[i], picture.matched[i]
        ax.plot([x0 * s_scale, offset + x1 * t_scale], [y0 * s_scale, y1 * t_scale], "-", color=colour, lw=1.0,
                alpha=0.85)
        ax.plot([x0 * s_scale], [y0 * s_scale], "o", color=colour, ms=3)
        ax.plot([offset + x1 * t_scale], [y1 * t_scale], "o", color=colour, ms=3)
        if picture.truth is not None:
            gx, gy = picture.truth[i]
            ax.plot([offset + gx * t_scale], [gy * t_scale], "o", mfc="none", mec=TRUTH, ms=6, mew=1.0)
    ax.set_title(picture.title, fontsize=8)
    ax.axis("off")


def save_pictures(pictures: Sequence[MatchPicture], path: str | os.PathLike, columns: int = 2) -> None:
    """All `pictures` in one PNG, `columns` per row, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difffeat.utils.atomic import atomic_path

    rows = max(1, -(-len(pictures) // columns))
    cols = min(columns, max(1, len(pictures)))
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture in zip(axes.flat, pictures):
        draw_pair(ax, picture)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
