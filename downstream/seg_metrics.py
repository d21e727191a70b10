"""Segmentation metrics as long-tail segmentation reports them: mIoU overall and on head / middle / tail.

Everything derives from one confusion matrix ``M`` (rows: true class, columns: predicted; ignore pixels
left out), accumulated over the whole evaluation set (torchmetrics' multiclass confusion matrix):

    IoU_c = M_cc / (Σ_j M_cj + Σ_i M_ic − M_cc)        (undefined when class c is neither true nor predicted)
    mIoU  = mean of the defined IoU_c;  group mIoU = the same over the group's classes
    pixel accuracy = Σ_c M_cc / Σ M;    mean accuracy = mean over present classes of M_cc / Σ_j M_cj

as mmsegmentation computes them (intersection and union summed over the set, then the class mean).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from difffeat.atomic import atomic_path
from downstream.seg_data import SegClasses


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """``[K, K]`` int64 counts, ``M[i, j]`` = pixels of true class i predicted as j; `ignore_index` skipped."""
    return multiclass_confusion_matrix(preds.reshape(-1), labels.reshape(-1), num_classes,
                                       ignore_index=ignore_index, validate_args=False).long()


class SegMetrics:
    """Accumulates the confusion matrix over batches: ``update(preds, labels)``, then ``compute()``."""

    def __init__(self, classes: SegClasses, device: torch.device | str | None = None):
        self.classes = classes
        k = classes.num_classes
        self.matrix = torch.zeros(k, k, dtype=torch.long, device=device)

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        self.matrix += confusion_matrix(preds, labels, self.classes.num_classes, self.classes.ignore_index).to(
            self.matrix.device)

    def compute(self) -> dict:
        return segmentation_scores(self.matrix, self.classes)


def _nanmean(values: Sequence[float]) -> float | None:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else None


def segmentation_scores(matrix: torch.Tensor, classes: SegClasses) -> dict:
    """mIoU (overall, head, middle, tail), per-class IoU (None where undefined), pixel and mean accuracy.

    >>> m = torch.tensor([[3, 1], [0, 4]])  # class 0: 3 right, 1 taken for class 1
    >>> s = segmentation_scores(m, SegClasses(["a", "b"]))
    >>> s["per_class_iou"], s["miou"], s["pixel_accuracy"]
    ({'a': 0.75, 'b': 0.8}, 0.775, 0.875)
    """
    m = matrix.double().cpu()
    tp = m.diagonal()
    true, pred = m.sum(1), m.sum(0)
    union = true + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(true > 0, tp / true.clamp(min=1), torch.full_like(tp, float("nan")))
    iou_list = iou.tolist()
    out = {
        "miou": _nanmean(iou_list),
        **{f"miou_{g}": _nanmean([iou_list[i] for i in ids]) for g, ids in classes.group_ids().items()},
        "pixel_accuracy": float(tp.sum() / m.sum()) if m.sum() > 0 else None,
        "mean_accuracy": _nanmean(acc.tolist()),
        "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(classes.names, iou_list)},
        "pixels": int(m.sum()),
    }
    return out


def save_confusion_png(matrix: torch.Tensor, names: Sequence[str], path: str | os.PathLike,
                       title: str = "confusion (rows: true, normalised per row)") -> None:
    """The row-normalised confusion matrix as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.double().cpu()
    norm = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.45 * k, 1.5 + 0.45 * k))
    im = ax.imshow(norm.numpy(), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90)
    ax.set_yticks(range(k), names)
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
    _save(fig, path)


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
    _save(fig, path)


def _save(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
