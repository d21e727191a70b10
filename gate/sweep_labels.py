"""The labels a sweep scores features against: segmentation masks from a folder, or image labels from a CSV.

`LABELS` is either

- a **folder of masks**: a Shapes-LT / imagefolder root whose ``metadata.csv`` rows pair ``file_name`` with
  ``mask_file_name`` (the image file is matched by path, so IMAGES may be the root, a split or its
  ``images/`` folder), or a plain folder holding one mask per image under the image's key (``KEY``, ``KEY``
  with a ``.png`` suffix, or ``KEY`` with ``images/`` read as ``masks/``); a mask is one channel of class ids,
  255 = ignore. Task: segmentation. The file name alone is never enough: data sets number each split from 0,
  so another split's masks would match silently.
- a **CSV with ``key`` and ``label`` columns** (the format `difffeat train-cls --labels` reads), keys being
  the image keys of IMAGES. Task: classification.

Images without a label are left out of the sweep; when no image has one, the error names the first keys of
both sides, which is how a wrong prefix or split shows. Every path read from a file is confined to its folder.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from difffeat.data.label_csv import read_label_csv
from difffeat.errors import UserError
from difffeat.spine.run import confine

IGNORE = 255
EXAMPLES = 3  # keys shown when labels and images do not match


@dataclass
class LabelSet:
    """Which images of a source carry a label, and the label of each: a mask file (seg) or a class name (cls)."""

    task: str  # "seg" | "cls"
    path: str  # the LABELS argument
    masks: dict[str, Path] = field(default_factory=dict)  # image key → mask file (seg)
    labels: dict[str, str] = field(default_factory=dict)  # image key → class name (cls)
    unlabelled: int = 0  # images of the source without a label (left out)

    @property
    def keys(self) -> list[str]:
        return list(self.masks if self.task == "seg" else self.labels)

    @property
    def metric(self) -> str:
        return "miou" if self.task == "seg" else "accuracy"


def _examples(keys) -> str:
    keys = list(keys)
    more = f" … ({len(keys)} in all)" if len(keys) > EXAMPLES else ""
    return ", ".join(repr(k) for k in keys[:EXAMPLES]) + more


def _mask_tables(root: Path) -> dict[Path, Path]:
    """Resolved image file → mask file, from every imagefolder ``metadata.csv`` under `root` that names masks."""
    table: dict[Path, Path] = {}
    for meta in sorted(root.rglob("metadata.csv")):
        try:
            with open(meta, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{meta}: unreadable metadata ({e})") from None
        if not rows or "file_name" not in rows[0] or "mask_file_name" not in rows[0]:
            continue
        for row in rows:
            if row.get("file_name") and row.get("mask_file_name"):
                try:  # both names are read from a file: they must stay inside its folder
                    image = confine(meta.parent, row["file_name"], what=f"{meta}: file_name")
                    mask = confine(meta.parent, row["mask_file_name"], what=f"{meta}: mask_file_name")
                except UserError:
                    continue
                table[image] = mask
    return table


def _mask_by_key(root: Path, key: str, image: Path | None) -> Path | None:
    """The mask stored under the image's key in a plain mask folder (never the image file itself)."""
    p = PurePosixPath(key)
    swapped = PurePosixPath(*["masks" if part == "images" else part for part in p.parts])
    for cand in dict.fromkeys([p, p.with_suffix(".png"), swapped, swapped.with_suffix(".png")]):
        try:
            file = confine(root, cand.as_posix(), what="mask")
        except UserError:
            continue
        if file.is_file() and (image is None or file != image):
            return file
    return None


def match_labels(labels: str | os.PathLike, source, images: str = "IMAGES") -> LabelSet:
    """The `LabelSet` of `source` (a `difffeat.data.sources.ImageSource`) under LABELS; UserError when LABELS is
    unusable or labels no image of the source (naming the first keys of each)."""
    path = Path(labels)
    keys = [item.key for item in source.items]
    if path.is_file():
        table, _ = read_label_csv(path)
        found = {k: table[k] for k in keys if k in table}
        if not found:
            raise UserError(f"{path}: no label key matches an image of {images} (labels: {_examples(table)}; "
                            f"images: {_examples(keys)})")
        return LabelSet("cls", str(labels), labels=found, unlabelled=len(keys) - len(found))
    if not path.is_dir():
        raise UserError(f"{path}: no such labels file or mask folder")
    tables = _mask_tables(path)
    masks: dict[str, Path] = {}
    for item in source.items:
        image = Path(item.path).resolve() if item.path else None
        mask = tables.get(image) if image is not None else None
        mask = mask or _mask_by_key(path, item.key, image)
        if mask is not None:
            masks[item.key] = mask
    if not masks:
        found = [m.relative_to(path.resolve()).as_posix() for m in tables.values()] or \
            sorted(p.relative_to(path).as_posix() for p in path.rglob("*.png"))
        raise UserError(f"{path}: no mask matches an image of {images} (masks: {_examples(found) or 'none'}; "
                        f"images: {_examples(keys)})")
    return LabelSet("seg", str(labels), masks=masks, unlabelled=len(keys) - len(masks))


def load_mask(path: Path, size: tuple[int, int]):
    """The mask at `size` = (height, width) as int64 class ids, cropped and resized (nearest) the way
    `difffeat.data.images.resize_image` crops images (centre crop), so pixels stay aligned."""
    import numpy as np
    from PIL import Image, ImageOps

    from difffeat.data.images import BadImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.size != (size[1], size[0]):
                im = ImageOps.fit(im, (size[1], size[0]), method=Image.Resampling.NEAREST)
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise BadImageError(path, f"cannot read mask ({e})") from None
    if arr.ndim != 2:
        raise BadImageError(path, f"mask must be one channel of class ids, got shape {arr.shape}")
    return arr.astype(np.int64)


def grid_labels(mask, grid: tuple[int, int], n_classes: int, ignore: int = IGNORE):
    """A mask [H, W] reduced to a feature grid (h, w) by majority vote of each cell's pixels: the label a cell
    of that layer is fitted to. A cell whose pixels are mostly `ignore` (or all) is `ignore`."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.asarray(mask))
    valid = m != ignore
    onehot = torch.zeros(n_classes + 1, *m.shape, dtype=torch.float64)  # the last channel counts `ignore`
    onehot.scatter_(0, torch.where(valid, m, torch.full_like(m, n_classes))[None], 1.0)
    share = F.adaptive_avg_pool2d(onehot[None], grid)[0]  # [K + 1, h, w] fraction of each class per cell
    label = share[:n_classes].argmax(0)
    label[share[n_classes] >= 0.5] = ignore
    return label.numpy().astype(np.int64)
