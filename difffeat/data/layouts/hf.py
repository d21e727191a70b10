"""`hf`: a local Hugging Face data set with image and annotation columns, read with `datasets`, offline.

    ROOT/data/<split>-00000-of-00001.parquet …   (parquet shards, as Hub repositories such as scene_parse_150 hold
                                                  them; a shard's split is its name's first part or its folder)
    ROOT/dataset_dict.json, ROOT/<split>/…       (a `DatasetDict.save_to_disk` folder)

The image column is ``image``; the mask column the first image column among ``annotation``, ``mask``, ``label``,
``segmentation``, ``semantic_map``. Keys are ``SPLIT/NAME`` (NAME from a ``file_name`` column or the row index).
Mask values follow another layout's rule when the spec names one: ``hf/ade20k:ROOT`` reads scene_parse_150's
annotations (0 = other, 1…150) as ADE20K's; plain ``hf:ROOT`` takes them as class ids (255 = ignore), named by the
root's classes.json.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from difffeat.data.layouts.base import IGNORE, LAYOUTS, Layout, Sample, lut_from, register_layout
from difffeat.errors import UserError

MASK_COLUMNS = ("annotation", "mask", "label", "segmentation", "semantic_map")
SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)(-\d+-of-\d+)?(-[0-9a-f]{6,})?\.parquet$")


@register_layout
class HfLayout(Layout):
    name = "hf"
    label_rule = "mask values are class ids, 255 = ignore (or another layout's rule: hf/LAYOUT)"

    def __init__(self, root, split=None, names=None, labels: str | None = None):
        if labels is not None and (labels not in LAYOUTS or labels == self.name):
            raise UserError(f"hf/{labels}: no layout {labels!r} to read the masks by (layouts: "
                            f"{', '.join(n for n in LAYOUTS if n != self.name)})")
        self.labels = LAYOUTS[labels] if labels else None
        if self.labels is not None:
            self.class_names, self.label_rule = self.labels.class_names, self.labels.label_rule
        self._datasets: dict[str, object] = {}
        self._columns: dict[str, tuple[str, str]] = {}
        super().__init__(root, split, names)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "dataset_dict.json").is_file() or any(root.glob("data/*.parquet"))

    def label_lut(self) -> np.ndarray:
        return self.labels.canonical_lut() if self.labels else super().label_lut()

    @classmethod
    def canonical_lut(cls):
        return lut_from({i: i for i in range(IGNORE)}, (IGNORE,))

    def describe(self) -> dict:
        return {**super().describe(), "layout": f"hf/{self.labels.name}" if self.labels else self.name}

    # ------------------------------------------------------------------------------------------- splits
    def _shards(self) -> dict[str, list[str]]:
        shards: dict[str, list[str]] = {}
        for file in sorted(self.root.rglob("*.parquet")):
            match = SHARD.match(file.name)
            parent = file.parent.name
            split = parent if parent not in ("data", self.root.name) and file.parent != self.root else \
                (match.group("split") if match else file.stem)
            shards.setdefault(split, []).append(str(file))
        return shards

    def splits(self) -> list[str]:
        if (self.root / "dataset_dict.json").is_file():
            import json

            return list(json.loads((self.root / "dataset_dict.json").read_text()).get("splits", []))
        return sorted(self._shards())

    def dataset(self, split: str):
        if split not in self._datasets:
            import datasets

            try:
                if (self.root / "dataset_dict.json").is_file():
                    ds = datasets.load_from_disk(str(self.root / split))
                else:
                    ds = datasets.load_dataset("parquet", data_files={split: self._shards()[split]}, split=split)
            except UserError:
                raise
            except Exception as e:  # a damaged shard or folder: one line naming it
                raise UserError(f"{self.root}: cannot read split {split!r} as a Hugging Face data set "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
            self._columns[split] = self._find_columns(ds, split)
            self._datasets[split] = ds
        return self._datasets[split]

    def _find_columns(self, ds, split: str) -> tuple[str, str]:
        import datasets

        if "image" not in ds.column_names:
            raise UserError(f"{self.root}: split {split!r} has no image column (columns: {', '.join(ds.column_names)})")
        masks = [c for c in MASK_COLUMNS if c in ds.column_names and isinstance(ds.features[c], datasets.Image)]
        if not masks:
            raise UserError(f"{self.root}: split {split!r} has no annotation column (an image column named one of "
                            f"{', '.join(MASK_COLUMNS)}; columns: {', '.join(ds.column_names)})")
        return "image", masks[0]

    def find(self, split: str) -> list[Sample]:
        from difffeat.data.images import discover_hf

        ds = self.dataset(split)
        items = discover_hf(ds)
        names = [it.key.split("/", 1)[1] if getattr(ds, "split", None) else it.key for it in items]
        return [Sample(key=f"{split}/{name}", split=split, index=it.index) for name, it in zip(names, items)]

    # ------------------------------------------------------------------------------------------- reading
    def load_image(self, sample: Sample) -> Image.Image:
        from difffeat.data.images import ImageItem, load_hf_image

        return load_hf_image(self.dataset(sample.split), ImageItem(key=sample.key, index=sample.index))

    def read_raw(self, sample: Sample) -> np.ndarray:
        ds = self.dataset(sample.split)
        column = self._columns[sample.split][1]
        value = ds.with_format("arrow", columns=[column])[sample.index : sample.index + 1].column(column).to_pylist()[0]
        where = f"{self.root}: {sample.key} ({column})"
        try:
            if isinstance(value, dict) and value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif isinstance(value, dict) and value.get("path"):
                img = Image.open(value["path"])
            else:
                raise UserError(f"{where}: no mask in this row")
            img.load()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{where}: unreadable mask ({type(e).__name__}: {e})") from None
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise UserError(f"{where}: mask has mode {img.mode}; expected one channel of label ids")
        return np.asarray(img)

    def target(self, sample: Sample) -> np.ndarray:
        if not self.names:
            raise UserError(f"{self.root}: no class names for this data set: add a classes.json there, or name the "
                            "label rule as hf/LAYOUT (e.g. hf/ade20k for scene_parse_150)")
        return self.to_train_ids(self.read_raw(sample), f"{self.root}: {sample.key}")
