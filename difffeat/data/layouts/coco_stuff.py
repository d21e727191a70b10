"""`coco-stuff` (171 classes) and `coco-stuff-27` (STEGO's coarse classes): COCO-Stuff-164k's stuffthingmaps.

    ROOT/images/{train2017,val2017}/<12 digits>.jpg   ROOT/annotations/{train2017,val2017}/<12 digits>.png

Mask values are raw COCO category ids − 1 (0…181, with 11 thing ids never used), 255 = unlabeled (ignored).
`coco-stuff` maps the 171 used ids in order to 0…170 (mmsegmentation's ``clsID_to_trID``); `coco-stuff-27` maps
each raw id to its coarse class (STEGO's ``fine_to_coarse``). A converted ``*_labelTrainIds.png`` beside a raw
mask is not read: the raw PNG is the data set's own.
"""

from __future__ import annotations

from pathlib import Path

from difffeat.data.label_maps import (
    COCO_STUFF_27_CLASSES,
    COCO_STUFF_CLASSES,
    COCO_STUFF_FINE_TO_COARSE,
    COCO_STUFF_RAW_TO_171,
)
from difffeat.data.layouts.base import IGNORE, ImagesAnnotationsLayout, lut_from, register_layout


@register_layout
class CocoStuffLayout(ImagesAnnotationsLayout):
    name = "coco-stuff"
    known_splits = ("train2017", "val2017")
    split_aliases = {"train": "train2017", "val": "val2017", "validation": "val2017"}
    class_names = COCO_STUFF_CLASSES
    label_rule = "raw ids 0…181 (11 unused) to 171 classes, 255 = unlabeled"
    profile = "coco-stuff"

    @classmethod
    def canonical_lut(cls):
        return lut_from(dict(COCO_STUFF_RAW_TO_171), (IGNORE,))


@register_layout
class CocoStuff27Layout(CocoStuffLayout):
    name = "coco-stuff-27"
    class_names = COCO_STUFF_27_CLASSES
    label_rule = "raw ids 0…181 to 27 coarse classes, 255 = unlabeled"
    profile = None  # AUCSeg's COCO-Stuff settings are for the 171 classes

    @classmethod
    def detect(cls, root: Path) -> bool:
        return False  # the same tree as `coco-stuff`: chosen by name only

    @classmethod
    def canonical_lut(cls):
        return lut_from(dict(COCO_STUFF_FINE_TO_COARSE), (IGNORE,))
