"""`coco-stuff` (171 classes) and `coco-stuff-27` (STEGO's coarse classes): COCO-Stuff-164k's stuffthingmaps.

    ROOT/images/{train2017,val2017}/<12 digits>.jpg   ROOT/annotations/{train2017,val2017}/<12 digits>.png

Mask values are raw COCO category ids − 1 (0…181, with 11 thing ids never used), 255 = unlabeled (ignored).
`coco-stuff` maps the 171 used ids in order to 0…170 (mmsegmentation's ``clsID_to_trID``); `coco-stuff-27` maps
each raw id to its coarse class (STEGO's ``fine_to_coarse``). A converted ``*_labelTrainIds.png`` beside a raw
mask is not read: the raw PNG is the data set's own.
"""

from __future__ import annotations

from pathlib import Path

from difffeat.data.images import IMAGE_SUFFIXES
from difffeat.data.label_maps import (
    COCO_STUFF_27_CLASSES,
    COCO_STUFF_CLASSES,
    COCO_STUFF_FINE_TO_COARSE,
    COCO_STUFF_RAW_TO_171,
)
from difffeat.data.layouts.base import IGNORE, Layout, Sample, files_in, key_of, lut_from, register_layout, subfolders


@register_layout
class CocoStuffLayout(Layout):
    name = "coco-stuff"
    split_aliases = {"train": "train2017", "val": "val2017", "validation": "val2017"}
    class_names = COCO_STUFF_CLASSES
    label_rule = "raw ids 0…181 (11 unused) to 171 classes, 255 = unlabeled"
    profile = "coco-stuff"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / "images" / s).is_dir() for s in ("train2017", "val2017")) and \
            (root / "annotations").is_dir()

    @classmethod
    def canonical_lut(cls):
        return lut_from(dict(COCO_STUFF_RAW_TO_171), (IGNORE,))

    def splits(self) -> list[str]:
        return [s for s in subfolders(self.root / "images") if (self.root / "annotations" / s).is_dir()]

    def find(self, split: str) -> list[Sample]:
        images = [f for f in files_in(self.root / "images" / split, "") if f.suffix.lower() in IMAGE_SUFFIXES]
        masks = self.root / "annotations" / split
        return [Sample(key=key_of(self.root, f), split=split, image=f,
                       target=masks / f.relative_to(self.root / "images" / split).with_suffix(".png"))
                for f in images]


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
