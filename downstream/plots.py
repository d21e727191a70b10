"""Pictures of a training run shared by both tasks: loss / learning-rate / validation curves, a confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from difffeat.utils.atomic import atomic_path


def save_confusion_png(matrix: torch.Tensor, names: Sequence[str], path: str | os.PathLike,
                       title: str = "confusion (rows: true, normalised per row)") -> None:
    """The row-normalised confusion matrix as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.double().cpu()
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    # At most 20 inches a side: ADE's 150 classes at 0.45 inch each made a 70-inch figure and a 2.6 GiB peak.
    side = min(0.45 * k, 18.0)
    fig, ax = plt.subplots(figsize=(2 + side, 1.5 + side))
    im = ax.imshow(norm.numpy(), vmin=0, vmax=1, cmap="Blues")
    tick_size = min(10.0, max(3.0, 320.0 / k))
    ax.set_xticks(range(k), names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(k), names, fontsize=tick_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)


def save_curves_png(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Training curves (loss and its CE / AUC parts, learning rate, validation mIoU when logged) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_miou" in h]
    panels = 3 if val else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2))
    it = [h["iteration"] for h in train]
    for name in ("loss", "ce", "auc"):
        if train and name in train[0]:
            axes[0].plot(it, [h[name] for h in train], label=name)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(it, [h.get("lr", float("nan")) for h in train])
    axes[1].set_xlabel("iteration")
    axes[1].set_title("learning rate")
    if val:
        for name in ("val_miou", "val_miou_head", "val_miou_middle", "val_miou_tail"):
            pts = [(h["iteration"], h[name]) for h in val if h.get(name) is not None]
            if pts:
                axes[2].plot(*zip(*pts), marker="o", label=name.removeprefix("val_"))
        axes[2].set_xlabel("iteration")
        axes[2].set_title("validation mIoU")
        axes[2].legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
