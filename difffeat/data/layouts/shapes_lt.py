"""`shapes-lt` (alias `imagefolder`): difffeat's own layout, an HF imagefolder whose ``metadata.csv`` names each
image's mask.

    ROOT/<split>/images/<id>.png   ROOT/<split>/masks/<id>.png (uint8 ids, 255 = ignore)
    ROOT/<split>/metadata.csv      file_name, mask_file_name, …      ROOT/classes.json (names, counts, groups)

Keys are image paths relative to ROOT (``train/images/000000.png``), as `difffeat extract ROOT` names them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from difffeat.data.layouts.base import Layout, Sample, register_layout, subfolders
from difffeat.data.shapes_lt import CLASS_NAMES
from difffeat.errors import UserError
from difffeat.spine.run import confine_name


@register_layout
class ShapesLtLayout(Layout):
    name = "shapes-lt"
    aliases = ("imagefolder",)
    fallback = True
    split_aliases = {"validation": "val"}
    class_names = CLASS_NAMES
    label_rule = "mask values are the class ids, 255 = ignore"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / s / "metadata.csv").is_file() for s in subfolders(root))

    def __init__(self, root, split=None, names=None):
        self.rows: dict[str, dict] = {}
        super().__init__(root, split, names)

    def splits(self) -> list[str]:
        return [s for s in subfolders(self.root) if (self.root / s / "metadata.csv").is_file()]

    def find(self, split: str) -> list[Sample]:
        table = self.root / split / "metadata.csv"
        try:
            with open(table, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{table}: unreadable metadata ({e})") from None
        if rows and "file_name" not in rows[0]:
            raise UserError(f"{table}: an imagefolder metadata.csv needs a file_name column")
        samples = []
        for row in rows:  # names come from a file: both stay inside the split's folder
            image = confine_name(table.parent, row["file_name"], what=f"{table}: file_name")
            mask = row.get("mask_file_name")
            target = confine_name(table.parent, mask, what=f"{table}: mask_file_name") if mask else None
            key = f"{split}/{Path(row['file_name']).as_posix()}"
            self.rows[key] = row  # captions and labels: what --prompt-from and train-cls read
            samples.append(Sample(key=key, split=split, image=image, target=target))
        return samples
