"""`ade20k`: ADEChallengeData2016 (SceneParse150) as it ships.

    ROOT/images/{training,validation}/ADE_*.jpg   ROOT/annotations/{training,validation}/ADE_*.png (same stem)

Mask values: 0 = "other objects" (not scored), 1…150 the classes. mmsegmentation's ``reduce_zero_label``:
0 → ignore, k → k − 1, 255 stays ignore.
"""

from __future__ import annotations

import numpy as np

from difffeat.data.label_maps import ADE20K_CLASSES
from difffeat.data.layouts.base import IGNORE, ImagesAnnotationsLayout, lut_from, register_layout

SPLITS = ("training", "validation")


def reduce_zero_label_lut(classes: int) -> np.ndarray:
    """0 → ignore, k → k − 1 for k = 1…classes, 255 → ignore."""
    return lut_from({k: k - 1 for k in range(1, classes + 1)}, (0, IGNORE))


@register_layout
class Ade20kLayout(ImagesAnnotationsLayout):
    name = "ade20k"
    known_splits = SPLITS
    split_aliases = {"train": "training", "val": "validation"}
    class_names = ADE20K_CLASSES
    label_rule = "0 = other (ignored), 1…150 = classes, reduced by one"
    profile = "ade20k"

    @classmethod
    def canonical_lut(cls):
        return reduce_zero_label_lut(len(cls.class_names))
