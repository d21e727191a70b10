"""What every data-set layout reader is: a split's (image, mask) samples, and raw mask values turned into train ids.

A `Layout` reads one data set in the folder layout it ships in (mmsegmentation's one-class-per-data-set design):
it lists the samples of a split, each known by a *key* (the image's path relative to the root, or
``SPLIT/NAME`` for a row of a data set), loads an image as RGB, and reads a mask as train ids through a 256-entry
look-up table (`lut`): raw value → train id, `IGNORE` for pixels that are not scored, `INVALID` for values the
layout does not define. A value that is not defined is an error naming the file, the value and the layouts whose
raw values would fit.

Class names are the layout's own (ADE20K's 150, Cityscapes' 19 …) unless the data-set root holds a difffeat
``classes.json`` (what `difffeat data synth --layout` writes): then its names are the train ids, and train ids
beyond them are refused like undefined values.

Layouts register by name (`register_layout`); `difffeat.data.layouts.open_data` opens a data spec
``LAYOUT:ROOT[:SPLIT]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from difffeat.data.images import IMAGE_SUFFIXES
from difffeat.data.walk import walk_once
from difffeat.errors import UserError

IGNORE = 255
INVALID = -1
CLASSES_FILE = "classes.json"

LAYOUTS: dict[str, type[Layout]] = {}
# What users call a split → what data sets call it, tried when a data set has no split of the user's name.
COMMON_SPLITS = (("val", "validation"), ("validation", "val"), ("train", "training"))


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: make a layout reader known by its `name` (and its `aliases`)."""
    for name in (cls.name, *cls.aliases):
        if name in LAYOUTS:
            raise ValueError(f"layout {name!r} is registered twice")
        LAYOUTS[name] = cls
    return cls


@dataclass(frozen=True)
class Sample:
    """One (image, mask) pair of a split: files (`image`, `target`) or a row (`index`) of the split's data set."""

    key: str
    split: str
    image: Path | None = None
    target: Path | None = None
    index: int | None = None


def lut_from(mapping: dict[int, int], ignore_raw: Iterable[int] = (), size: int = 256) -> np.ndarray:
    """A look-up table: `mapping` raw → train id, `ignore_raw` → IGNORE, every other value INVALID."""
    lut = np.full(size, INVALID, np.int16)
    for raw in ignore_raw:
        lut[raw] = IGNORE
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


class Layout:
    """A data set in its native layout (see the module doc). Subclasses set the class attributes and `find`."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the layout's own split folder (or list) names, by the names users give ("val" for "validation" …)
    split_aliases: ClassVar[dict[str, str]] = {}
    class_names: ClassVar[tuple[str, ...]] = ()
    #: how raw values become train ids, in words (for messages)
    label_rule: ClassVar[str] = ""
    #: the train-seg profile holding this data set's released long-tail settings and tail classes (AUCSeg's
    #: `small_index`, numbered by this layout's train ids): `train-seg --profile NAME`
    profile: ClassVar[str | None] = None
    ignore_index: ClassVar[int] = IGNORE
    #: a plain folder's layout (imagefolder): what a root no other layout detects is read as, never detected itself
    fallback: ClassVar[bool] = False

    def __init__(self, root: str | os.PathLike, split: str | None = None, names: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{root}: no such data-set folder (for layout {self.name})")
        self.split = None if split in (None, "") else self.split_aliases.get(split, split)
        self.names = list(names) if names else self._class_names()
        self.lut = self.label_lut()
        if len(self.names) < 255:  # train ids past the named classes are not classes of this data set
            self.lut = np.where(self.lut >= len(self.names), np.where(self.lut == IGNORE, IGNORE, INVALID),
                                self.lut).astype(np.int16)
        self._samples: list[Sample] | None = None

    # ------------------------------------------------------------------------------------------ to override
    @classmethod
    def detect(cls, root: Path) -> bool:
        """Whether `root` looks like this layout's root (for `--masks ROOT` and image folders given as is)."""
        return False

    @classmethod
    def canonical_lut(cls) -> np.ndarray:
        """raw value → train id of the layout as published (no classes.json)."""
        return lut_from({i: i for i in range(len(cls.class_names))}, (IGNORE,))

    def label_lut(self) -> np.ndarray:
        return self.canonical_lut()

    def splits(self) -> list[str]:
        """The split names found on disk."""
        raise NotImplementedError

    def find(self, split: str) -> list[Sample]:
        """The samples of one split (any order; `samples` sorts them)."""
        raise NotImplementedError

    def read_raw(self, sample: Sample) -> np.ndarray:
        """The mask of `sample` as stored: an integer [H, W] array (a PNG of one channel by default)."""
        return read_png_mask(sample.target)

    def load_image(self, sample: Sample) -> Image.Image:
        from difffeat.data.images import load_image

        return load_image(sample.image)

    # ------------------------------------------------------------------------------------------------ shared
    @property
    def samples(self) -> list[Sample]:
        """The samples of the split (every split when none was named), sorted by key."""
        if self._samples is None:
            splits = self.splits()
            if self.split is not None and self.split not in splits:  # a user's word for a split this data set names
                self.split = next((alias for word, alias in COMMON_SPLITS if word == self.split and alias in splits),
                                  self.split)
            if self.split is not None and self.split not in splits:
                other = detect_layout(self.root)
                hint = f"; the folder looks like layout {other}" if other and other != self.name else ""
                raise UserError(f"{self.root}: layout {self.name} has no split {self.split!r} here (found: "
                                f"{', '.join(splits) or 'none'}){hint}")
            chosen = [self.split] if self.split is not None else splits
            # one sample per key: VOC's trainval list repeats train and val
            found = list({s.key: s for split in chosen for s in reversed(self.find(split))}.values())
            if not found:
                raise UserError(f"{self.root}: no images of layout {self.name} in split "
                                f"{self.split or ', '.join(chosen) or '(none)'}")
            self._samples = sorted(found, key=lambda s: s.key)
        return self._samples

    def sample(self, key: str) -> Sample | None:
        if not hasattr(self, "_by_key"):
            self._by_key = {s.key: s for s in self.samples}
        return self._by_key.get(key)

    def target(self, sample: Sample) -> np.ndarray:
        """The mask of `sample` as uint8 train ids (IGNORE where not scored); UserError naming the file and any
        value the layout does not define."""
        raw = self.read_raw(sample)
        where = sample.target if sample.target is not None else f"{sample.key} (mask)"
        return self.to_train_ids(raw, where)

    def to_train_ids(self, raw: np.ndarray, where) -> np.ndarray:
        if raw.size and (raw.min() < 0 or raw.max() >= len(self.lut)):
            bad = int(raw.min()) if raw.min() < 0 else int(raw.max())
            raise UserError(self._bad_value(where, bad, raw))
        ids = self.lut[raw]
        if (ids == INVALID).any():
            raise UserError(self._bad_value(where, int(raw[ids == INVALID].flat[0]), raw))
        return ids.astype(np.uint8)

    def _bad_value(self, where, value: int, raw: np.ndarray) -> str:
        values = np.unique(raw)
        fits = [n for n in fitting_layouts(values) if n != self.name]
        hint = f"; its values would fit layout {' or '.join(fits[:3])}" if fits else ""
        return (f"{where}: label value {value} is not defined in layout {self.name} ({self.label_rule}; "
                f"{len(self.names)} classes){hint}")

    def _class_names(self) -> list[str]:
        file = self.root / CLASSES_FILE
        if not file.is_file():
            return list(self.class_names)
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{file}: unreadable classes file ({e})") from None
        names = data.get("names") if isinstance(data, dict) else data
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise UserError(f"{file}: a classes file needs a list of class \"names\"")
        if len(names) > len(self.class_names) > 0:
            raise UserError(f"{file}: {len(names)} class names, but layout {self.name} has {len(self.class_names)} "
                            "train ids")
        return names

    def classes_file(self) -> Path | None:
        """The root's classes.json (counts and groups of the world it describes), when there is one."""
        file = self.root / CLASSES_FILE
        return file if file.is_file() else None

    def describe(self) -> dict:
        """What a store's manifest records of the data set its images came from (and its profile, if any)."""
        described = {"layout": self.name, "root": os.path.abspath(self.root), "split": self.split}
        return {**described, "profile": self.profile} if self.profile else described


class ImagesAnnotationsLayout(Layout):
    """mmsegmentation's folder pair, as ADE20K and COCO-Stuff ship: ``ROOT/images/SPLIT/…/NAME.jpg`` and its mask
    ``ROOT/annotations/SPLIT/…/NAME.png``. A split is a folder of both; `known_splits` are the names that
    recognise the layout."""

    known_splits: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any((root / "images" / s).is_dir() for s in cls.known_splits) and (root / "annotations").is_dir()

    def splits(self) -> list[str]:
        return [s for s in subfolders(self.root / "images") if (self.root / "annotations" / s).is_dir()]

    def find(self, split: str) -> list[Sample]:
        images = [f for f in files_in(self.root / "images" / split, "") if f.suffix.lower() in IMAGE_SUFFIXES]
        masks = self.root / "annotations" / split
        return [Sample(key=key_of(self.root, f), split=split, image=f,
                       target=masks / f.relative_to(self.root / "images" / split).with_suffix(".png"))
                for f in images]


def detect_layout(root: str | os.PathLike) -> str | None:
    """The name of the layout whose tree `root` holds, or None (a plain folder of images)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for name, cls in LAYOUTS.items():
        if name == cls.name and not cls.fallback and cls.detect(root):
            return name
    return None


def fitting_layouts(values: np.ndarray) -> list[str]:
    """Names of the layouts whose published raw values include all of `values`."""
    out = []
    for name, cls in LAYOUTS.items():
        if name != cls.name:
            continue
        lut = cls.canonical_lut()
        if values.size and values.min() >= 0 and values.max() < len(lut) and (lut[values] != INVALID).all():
            out.append(name)
    return out


def read_png_mask(file: Path | None) -> np.ndarray:
    """A one-channel mask image as its stored integers (palette PNGs as indices, never as colours)."""
    if file is None or not Path(file).is_file():
        raise UserError(f"{file}: no such mask file")
    try:
        with Image.open(file) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"{file}: mask has mode {img.mode}; expected one channel of label ids (8- or 16-bit "
                                "grey or palette)")
            return np.asarray(img)
    except UserError:
        raise
    except Exception as e:  # whatever PIL raises for a damaged or non-image file
        raise UserError(f"{file}: unreadable mask ({type(e).__name__}: {e})") from None


def files_in(folder: Path, suffix: str) -> list[Path]:
    """Files under `folder` (recursive, following links, each real folder once, no hidden names) whose name ends
    with `suffix`."""
    if not folder.is_dir():
        return []
    found = []
    for dirpath, _, filenames in walk_once(folder):
        found += [Path(dirpath) / f for f in filenames if f.endswith(suffix) and not f.startswith(".")]
    return sorted(found)


def subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []


def key_of(root: Path, file: Path) -> str:
    return file.relative_to(root).as_posix()

