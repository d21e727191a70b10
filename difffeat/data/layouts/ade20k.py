"""`ade20k`: ADEChallengeData2016 (SceneParse150) as it ships.

    ROOT/images/{training,validation}/ADE_*.jpg   ROOT/annotations/{training,validation}/ADE_*.png (same stem)

Mask values: 0 = "other objects" (not scored), 1…150 the classes. mmsegmentation's ``reduce_zero_label``:
0 → ignore, k → k − 1, 255 stays ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difffeat.data.images import IMAGE_SUFFIXES
from difffeat.data.label_maps import ADE20K_CLASSES
from difffeat.data.layouts.base import IGNORE, Layout, Sample, files_in, key_of, lut_from, register_layout, subfolders

SPLITS = ("training", "validation")


def reduce_zero_label_lut(classes: int) -> np.ndarray:
    """0 → ignore, k → k − 1 for k = 1…classes, 255 → ignore."""
    return lut_from({k: k - 1 for k in range(1, classes + 1)}, (0, IGNORE))


@register_layout
class Ade20kLayout(Layout):
    name = "ade20k"
    split_aliases = {"train": "training", "val": "validation"}
    class_names = ADE20K_CLASSES
    label_rule = "0 = other (ignored), 1…150 = classes, reduced by one"
    profile = "ade20k"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / "images" / s).is_dir() for s in SPLITS) and (root / "annotations").is_dir()

    @classmethod
    def canonical_lut(cls):
        return reduce_zero_label_lut(len(cls.class_names))

    def splits(self) -> list[str]:
        return [s for s in subfolders(self.root / "images") if (self.root / "annotations" / s).is_dir()]

    def find(self, split: str) -> list[Sample]:
        images = [f for f in files_in(self.root / "images" / split, "") if f.suffix.lower() in IMAGE_SUFFIXES]
        masks = self.root / "annotations" / split
        return [Sample(key=key_of(self.root, f), split=split, image=f,
                       target=masks / f.relative_to(self.root / "images" / split).with_suffix(".png"))
                for f in images]
