"""`ddpm-seg`: the few-shot sets of ddpm-segmentation (Bedroom-28, FFHQ-34, Cat-15, Horse-21, CelebA-19,
ADE-Bedroom-30), one set per root.

    ROOT = datasets/<name>:   ROOT/real/{train,test}/<stem>.png  with  <stem>.npy  (the mask, [H, W] integers)

The set is told by the root's folder name (``bedroom_28`` …), which picks its class list. Bedroom-28 does not score
its background (ddpm-segmentation's ``ignore_label`` 0): it is read like ADE20K's "other", 0 → ignore and the 28
classes shifted down by one (the content-shift code's 28-class form). The other sets keep every id, 255 = ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difffeat.data.images import IMAGE_SUFFIXES
from difffeat.data.label_maps import DDPM_SEG_SETS
from difffeat.data.layouts.base import IGNORE, Layout, Sample, files_in, key_of, lut_from, register_layout, subfolders
from difffeat.errors import UserError


@register_layout
class DdpmSegLayout(Layout):
    name = "ddpm-seg"
    split_aliases = {"val": "test", "validation": "test"}
    label_rule = "the .npy masks' class ids, 255 = ignore (Bedroom-28: 0 = background, ignored)"

    def __init__(self, root, split=None, names=None):
        self.set = DDPM_SEG_SETS.get(Path(root).name)
        super().__init__(root, split, names)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "real").is_dir() and any(files_in(root / "real" / s, ".npy") for s in ("train", "test"))

    @classmethod
    def canonical_lut(cls):  # any set's ids: 0…254, 255 = ignore
        return lut_from({i: i for i in range(IGNORE)}, (IGNORE,))

    def label_lut(self) -> np.ndarray:
        if self.set is not None and self.set.ignore_label == 0:
            return lut_from({k: k - 1 for k in range(1, len(self.set.classes))}, (0, IGNORE))
        return self.canonical_lut()

    def _class_names(self) -> list[str]:
        if (self.root / "classes.json").is_file() or self.set is None:
            names = super()._class_names()
            if not names:
                raise UserError(f"{self.root}: not one of the ddpm-segmentation sets ({', '.join(DDPM_SEG_SETS)}) "
                                "and no classes.json there: name the folder as the set or add a classes.json")
            return names
        classes = list(self.set.classes)
        return classes[1:] if self.set.ignore_label == 0 else classes

    def splits(self) -> list[str]:
        return [s for s in subfolders(self.root / "real") if files_in(self.root / "real" / s, ".npy")]

    def find(self, split: str) -> list[Sample]:
        images = [f for f in files_in(self.root / "real" / split, "") if f.suffix.lower() in IMAGE_SUFFIXES]
        return [Sample(key=key_of(self.root, f), split=split, image=f, target=f.with_suffix(".npy")) for f in images]

    def read_raw(self, sample: Sample) -> np.ndarray:
        if sample.target is None or not sample.target.is_file():
            raise UserError(f"{sample.target}: no such mask file")
        try:
            array = np.load(sample.target, allow_pickle=False)
        except Exception as e:  # a damaged file, or one holding Python objects
            raise UserError(f"{sample.target}: unreadable .npy mask ({type(e).__name__}: {e})") from None
        if array.ndim != 2:
            raise UserError(f"{sample.target}: mask has shape {tuple(array.shape)}; expected [H, W]")
        if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
            array = array.astype(np.int64)  # whole numbers stored as floats, as ddpm-segmentation reads them
        if array.dtype.kind not in "iub":
            raise UserError(f"{sample.target}: mask has dtype {array.dtype}; expected integer class ids")
        return array.astype(np.int64)
