"""`cityscapes` and `cityscapes-trainids`: Cityscapes as it ships, and as mmsegmentation's converter leaves it.

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       (shipped: labelIds 0…33)
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (made by csCreateTrainIdLabelImgs)

`cityscapes` maps labelIds to the 19 trainIds by labels.py (every id with trainId 255 is ignored, as the official
evaluation ignores `ignoreInEval` ids); `cityscapes-trainids` reads labelTrainIds as they are.
"""

from __future__ import annotations

from pathlib import Path

from difffeat.data.label_maps import CITYSCAPES_CLASSES, CITYSCAPES_LABELS
from difffeat.data.layouts.base import IGNORE, Layout, Sample, files_in, key_of, lut_from, register_layout, subfolders

IMAGE_SUFFIX = "_leftImg8bit.png"


@register_layout
class CityscapesLayout(Layout):
    name = "cityscapes"
    split_aliases = {"validation": "val"}
    class_names = CITYSCAPES_CLASSES
    label_rule = "gtFine labelIds 0…33, mapped to the 19 trainIds (others ignored)"
    profile = "cityscapes"
    mask_suffix = "_gtFine_labelIds.png"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()

    @classmethod
    def canonical_lut(cls):
        labels = [lab for lab in CITYSCAPES_LABELS if lab.id >= 0]
        return lut_from({lab.id: lab.train_id for lab in labels if lab.train_id not in (IGNORE, -1)},
                        [lab.id for lab in labels if lab.train_id in (IGNORE, -1)])

    def splits(self) -> list[str]:
        return [s for s in subfolders(self.root / "leftImg8bit") if (self.root / "gtFine" / s).is_dir()]

    def find(self, split: str) -> list[Sample]:
        images = files_in(self.root / "leftImg8bit" / split, IMAGE_SUFFIX)
        samples = []
        for f in images:
            rel = f.relative_to(self.root / "leftImg8bit" / split)
            mask = self.root / "gtFine" / split / rel.parent / (f.name[: -len(IMAGE_SUFFIX)] + self.mask_suffix)
            samples.append(Sample(key=key_of(self.root, f), split=split, image=f, target=mask))
        return samples


@register_layout
class CityscapesTrainIdsLayout(CityscapesLayout):
    name = "cityscapes-trainids"
    label_rule = "gtFine labelTrainIds 0…18, 255 = ignore"
    mask_suffix = "_gtFine_labelTrainIds.png"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return False  # the same tree as `cityscapes`: chosen by name only

    @classmethod
    def canonical_lut(cls):
        return lut_from({i: i for i in range(len(cls.class_names))}, (IGNORE,))

