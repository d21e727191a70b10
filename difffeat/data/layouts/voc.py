"""`voc`: Pascal VOC 2012 (and the SBD "aug" masks mmsegmentation's converter adds).

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png      palette PNG: indices 0…20, 255 = object boundary / void (ignored)
    ROOT/SegmentationClassAug/<id>.png   the SBD masks (uint8), for ids not in SegmentationClass
    ROOT/ImageSets/Segmentation/<split>.txt   one id per line (train, val, trainval, trainaug, aug …)

Palette masks are read as their indices, never as colours.
"""

from __future__ import annotations

from pathlib import Path

from difffeat.data.label_maps import VOC_CLASSES
from difffeat.data.layouts.base import Layout, Sample, register_layout
from difffeat.errors import UserError
from difffeat.spine.run import confine_name

LISTS = Path("ImageSets") / "Segmentation"
MASK_FOLDERS = ("SegmentationClass", "SegmentationClassAug")


@register_layout
class VocLayout(Layout):
    name = "voc"
    split_aliases = {"validation": "val"}
    class_names = VOC_CLASSES
    label_rule = "palette indices 0…20, 255 = boundary (ignored)"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "JPEGImages").is_dir() and (root / LISTS).is_dir()

    def splits(self) -> list[str]:
        folder = self.root / LISTS
        return sorted(f.stem for f in folder.glob("*.txt")) if folder.is_dir() else []

    def find(self, split: str) -> list[Sample]:
        table = self.root / LISTS / f"{split}.txt"
        try:
            lines = table.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{table}: unreadable split list ({e})") from None
        samples = []
        for number, line in enumerate(lines, 1):
            stem = line.split()[0] if line.strip() else ""
            if not stem:
                continue
            image = confine_name(self.root / "JPEGImages", f"{stem}.jpg", what=f"{table}: line {number}")
            if not image.is_file():
                raise UserError(f"{table}: line {number} names {stem!r}, but {image} does not exist")
            mask = next((m for folder in MASK_FOLDERS if (m := self.root / folder / f"{stem}.png").is_file()),
                        self.root / MASK_FOLDERS[0] / f"{stem}.png")
            samples.append(Sample(key=image.relative_to(self.root).as_posix(), split=split, image=image, target=mask))
        return samples
