"""Segmentation data: stored features paired with per-pixel masks, matched by image key.

A `SegDataset` reads one or several feature stores (feature *variants*, e.g. with and without a
generation technique) and a mask source, and yields per image the list of its feature maps (one per
variant and layer, each at its own grid, float32) and its mask (class ids at the resolution of the
images the features came from, 255 = ignore). Features are read on demand from the memory-mapped
shards (or held in RAM when they fit `cache_bytes`); masks are read and checked once, up front, so a
bad mask fails before any training starts, naming the file.

Masks are found per key from a mask root: an HF imagefolder / Shapes-LT root (its ``metadata.csv``
files map ``file_name`` to ``mask_file_name``), or a plain folder holding masks under the key's
relative path or stem (``.png``), or the key's path with its ``images`` component turned into ``masks``.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from difffeat.errors import UserError
from difffeat.store import FeatureStore
from downstream.groups import head_middle_tail

IGNORE_INDEX = 255
MASK_SIZE_MODES = ("resize", "refuse")
GROUPS = ("head", "middle", "tail")


# --------------------------------------------------------------------------------------------- classes
@dataclass
class SegClasses:
    """Class names, the ignore label, train pixel counts and the head / middle / tail grouping (by name)."""

    names: list[str]
    ignore_index: int = IGNORE_INDEX
    pixel_counts: list[int] | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def group_ids(self) -> dict[str, list[int]]:
        """Group → class ids; empty when no grouping is known."""
        index = {name: i for i, name in enumerate(self.names)}
        return {g: [index[n] for n in self.groups.get(g, [])] for g in GROUPS if g in self.groups}

    def tail_ids(self) -> list[int]:
        return self.group_ids().get("tail", [])

    def with_counts(self, counts: Sequence[int]) -> SegClasses:
        """These classes with `counts` as pixel counts and, when no grouping was given, the grouping from them."""
        counts = [int(c) for c in counts]
        groups = self.groups or head_middle_tail(self.names, counts)
        return SegClasses(list(self.names), self.ignore_index, counts, groups)

    def to_dict(self) -> dict:
        return {"names": self.names, "ignore_index": self.ignore_index, "pixel_counts": self.pixel_counts,
                "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> SegClasses:
        return cls(list(d["names"]), int(d.get("ignore_index", IGNORE_INDEX)), d.get("pixel_counts"),
                   dict(d.get("groups") or {}))


def load_classes(spec: str | os.PathLike | Sequence[str]) -> SegClasses:
    """Classes from a ``classes.json`` (Shapes-LT's, or any JSON with "names" or a plain list of names),
    a text file with one name per line, a comma-separated string of names, or a list of names.

    Groups in the JSON may be given by name or by class id.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return _checked_classes(SegClasses([str(n) for n in spec]), "class list")
    path = Path(spec)
    if not path.is_file():
        if isinstance(spec, str) and "," in spec and not path.suffix:
            return _checked_classes(SegClasses([n.strip() for n in spec.split(",") if n.strip()]), "class list")
        raise UserError(f"{spec}: no such classes file (give classes.json, a names file, or a,b,c)")
    if path.suffix.lower() != ".json":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return _checked_classes(SegClasses(names), str(path))
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable classes file ({e})") from None
    if isinstance(data, list):
        data = {"names": data}
    if not isinstance(data, dict) or not isinstance(data.get("names"), list):
        raise UserError(f"{path}: a classes file needs a list \"names\"")
    names = [str(n) for n in data["names"]]
    counts = data.get("train_pixel_counts", data.get("pixel_counts"))
    if counts is not None and len(counts) != len(names):
        raise UserError(f"{path}: {len(counts)} pixel counts for {len(names)} classes")
    groups = {}
    for g, members in (data.get("groups") or {}).items():
        if g in GROUPS:
            groups[g] = [names[m] if isinstance(m, int) and 0 <= m < len(names) else str(m) for m in members]
    ignore = int(data.get("ignore_index", IGNORE_INDEX))
    return _checked_classes(SegClasses(names, ignore, counts, groups), str(path))


def _checked_classes(classes: SegClasses, where: str) -> SegClasses:
    if not classes.names:
        raise UserError(f"{where}: no class names")
    if len(set(classes.names)) != len(classes.names):
        raise UserError(f"{where}: class names repeat")
    if classes.ignore_index < len(classes.names) and classes.ignore_index >= 0:
        raise UserError(f"{where}: ignore index {classes.ignore_index} is a class id (there are "
                        f"{len(classes.names)} classes)")
    unknown = sorted({n for members in classes.groups.values() for n in members} - set(classes.names))
    if unknown:
        raise UserError(f"{where}: groups name unknown classes {unknown[:5]}")
    return classes


# ------------------------------------------------------------------------------------------ mask files
def _parts(path: str) -> tuple[str, ...]:
    return PurePosixPath(path).parts


class MaskFinder:
    """Finds the mask file of an image key under a mask root (see the module doc for the rules).

    `image_root` is the folder the features were extracted from (the store manifest's "images"); when it
    lies inside the mask root, keys are first read relative to the mask root through it, which resolves
    keys like "images/0.png" that would otherwise match every split.
    """

    def __init__(self, root: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{root}: no such mask folder")
        self.prefix = ""
        if image_root:
            try:
                rel = Path(image_root).resolve().relative_to(self.root.resolve())
                self.prefix = "" if str(rel) == "." else rel.as_posix()
            except (ValueError, OSError):
                pass
        self.table: dict[str, Path] = {}  # image path relative to root → mask path
        for meta in sorted(self.root.rglob("metadata.csv")):
            try:
                with open(meta, newline="") as f:
                    rows = list(csv.DictReader(f))
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise UserError(f"{meta}: unreadable metadata ({e})") from None
            if not rows or "file_name" not in rows[0] or "mask_file_name" not in rows[0]:
                continue
            base = meta.parent.relative_to(self.root)
            for row in rows:
                if row.get("file_name") and row.get("mask_file_name"):
                    key = (PurePosixPath(base.as_posix()) / row["file_name"]).as_posix().removeprefix("./")
                    self.table[key] = meta.parent / row["mask_file_name"]
        self.suffixes: dict[tuple[str, ...], list[str]] = {}
        for key in self.table:
            parts = _parts(key)
            for i in range(1, len(parts)):
                self.suffixes.setdefault(parts[i:], []).append(key)

    def find(self, key: str) -> Path | None:
        """The mask file for image `key`, or None when there is none."""
        bases = [b for b in dict.fromkeys([f"{self.prefix}/{key}" if self.prefix else key, key])]
        for base in bases:
            if base in self.table:
                return self.table[base]
        for base in bases:
            hits = self.suffixes.get(_parts(base), [])
            if len(hits) == 1:
                return self.table[hits[0]]
        for base in bases:
            p = PurePosixPath(base)
            swapped = PurePosixPath(*["masks" if part == "images" else part for part in p.parts])
            for cand in (p, p.with_suffix(".png"), swapped, swapped.with_suffix(".png")):
                file = self.root / cand
                if file.is_file():
                    return file
        for name in (PurePosixPath(key).name, PurePosixPath(key).stem + ".png"):
            file = self.root / name
            if file.is_file():
                return file
        return None


def read_mask(file: Path, size: tuple[int, int] | None, num_classes: int, ignore_index: int = IGNORE_INDEX,
              mask_size: str = "resize", resize_mode: str = "stretch") -> tuple[np.ndarray, bool]:
    """A mask as a uint8/int64 [H, W] array of class ids, checked; and whether it was resized.

    `size` = (H, W) the features' source images had; a mask of another size is resized (nearest, with
    the same geometry `resize_mode` the extraction used on the images) or refused, by `mask_size`.
    """
    try:
        with Image.open(file) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"{file}: mask has mode {img.mode}; expected one channel of class ids "
                                "(8- or 16-bit grey or palette)")
            resized = False
            if size is not None and (img.height, img.width) != tuple(size):
                if mask_size == "refuse":
                    raise UserError(f"{file}: mask is {img.height}×{img.width} but the features come from "
                                    f"{size[0]}×{size[1]} images; resize it or pass --mask-size resize")
                img = _resize_mask(img, size, resize_mode, ignore_index)
                resized = True
            array = np.asarray(img)
    except UserError:
        raise
    except Exception as e:  # whatever PIL raises for a damaged or non-image file
        raise UserError(f"{file}: unreadable mask ({e})") from None
    array = array.astype(np.int64) if array.dtype != np.uint8 else array
    bad = (array >= num_classes) & (array != ignore_index)
    if bad.any() or (array < 0).any():
        value = int(array[bad][0]) if bad.any() else int(array[array < 0][0])
        raise UserError(f"{file}: label value {value} is not a class id (0..{num_classes - 1}) or the "
                        f"ignore label {ignore_index}")
    return array, resized


def _resize_mask(img: Image.Image, size: tuple[int, int], mode: str, ignore_index: int) -> Image.Image:
    height, width = size
    if img.mode in ("P", "1"):
        img = img.convert("L") if img.mode == "1" else Image.fromarray(np.asarray(img))
    if mode == "center-crop":
        return ImageOps.fit(img, (width, height), method=Image.NEAREST)
    if mode == "pad":  # padding is no class: ignore it, as the images were padded black
        return ImageOps.pad(img, (width, height), method=Image.NEAREST, color=ignore_index)
    return img.resize((width, height), Image.NEAREST)


# -------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureSpec:
    """One feature map of each item: which variant (store) and layer it is, and its [C, h, w] shape."""

    variant: int
    layer: str
    shape: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {"variant": self.variant, "layer": self.layer, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(int(d["variant"]), str(d["layer"]), tuple(int(x) for x in d["shape"]))


def _resolution(store: FeatureStore) -> tuple[int, int] | None:
    res = store.manifest.get("resolution")
    if res is None:
        return None
    if isinstance(res, int):
        return (res, res)
    return (int(res[0]), int(res[1]))


class SegDataset(torch.utils.data.Dataset):
    """Feature maps of one or several stores paired with masks; see the module doc.

    ``dataset[i]`` is ``{"features": [Tensor [C, h, w], …] (one per `specs` entry), "mask": LongTensor
    [H, W], "index": i}``. `report` lists keys skipped for want of a mask or of features in every store,
    and how many masks were resized. `split` keeps keys whose path starts with that folder ("train" keeps
    "train/images/0.png"); `layers` picks layers by name (default: every layer of every store).
    """

    def __init__(self, stores: Sequence[str | os.PathLike | FeatureStore], masks: str | os.PathLike,
                 classes: SegClasses, *, split: str | None = None, layers: Sequence[str] | None = None,
                 mask_size: str = "resize", cache_bytes: int = 1 << 30, keys: Sequence[str] | None = None):
        if mask_size not in MASK_SIZE_MODES:
            raise UserError(f"mask size mode must be one of {', '.join(MASK_SIZE_MODES)}, got {mask_size!r}")
        if not stores:
            raise UserError("give at least one feature store")
        self.stores = [s if isinstance(s, FeatureStore) else FeatureStore(s) for s in stores]
        self.classes = classes
        self.split = split
        self.specs: list[FeatureSpec] = []
        for v, store in enumerate(self.stores):
            if len(store) == 0:
                raise UserError(f"{store.path}: the feature store is empty")
            chosen = [lay for lay in store.layers if layers is None or lay in layers]
            if not chosen:
                raise UserError(f"{store.path}: none of the layers {list(layers or [])} (it has "
                                f"{', '.join(store.layers)})")
            self.specs += [FeatureSpec(v, lay, tuple(store.shapes[lay])) for lay in chosen]
        resolutions = {_resolution(s) for s in self.stores}
        if len(resolutions) > 1:
            raise UserError("the feature stores come from images of different sizes "
                            f"({', '.join(f'{s.path}: {_resolution(s)}' for s in self.stores)}); masks fit one")
        self.resolution = resolutions.pop()

        wanted = list(keys) if keys is not None else self.stores[0].keys()
        if split:
            prefix = split.strip("/") + "/"
            wanted = [k for k in wanted if k.startswith(prefix)]
            if not wanted:
                raise UserError(f"{self.stores[0].path}: no keys in split {split!r} (keys look like "
                                f"{self.stores[0].keys()[0]!r})")
        missing_features = [k for k in wanted if not all(k in s for s in self.stores[1:])]
        wanted = [k for k in wanted if all(k in s for s in self.stores[1:])]

        finder = MaskFinder(masks, self.stores[0].manifest.get("config", {}).get("images"))
        resize_mode = str(self.stores[0].manifest.get("config", {}).get("resize", "stretch"))
        self.keys: list[str] = []
        self.mask_files: list[Path] = []
        missing_masks = []
        for k in wanted:
            file = finder.find(k)
            if file is None:
                missing_masks.append(k)
            else:
                self.keys.append(k)
                self.mask_files.append(file)
        if not self.keys:
            raise UserError(f"{masks}: no masks found for the {len(wanted)} feature keys (first: "
                            f"{(missing_masks or ['-'])[0]!r})")

        # Read every mask once: bad ones fail now, naming the file; counts feed the tail grouping.
        size = self.resolution
        counts = np.zeros(classes.num_classes, np.int64)
        mask_bytes = 0
        masks_ram: list[np.ndarray] = []
        resized = 0
        for file in self.mask_files:
            array, was_resized = read_mask(file, size, classes.num_classes, classes.ignore_index, mask_size,
                                           resize_mode)
            if size is None:
                size = array.shape
            elif array.shape != tuple(size):  # masks of a store with no resolution must agree with each other
                raise UserError(f"{file}: mask is {array.shape[0]}×{array.shape[1]}, others "
                                f"{size[0]}×{size[1]}")
            resized += was_resized
            valid = array[array != classes.ignore_index]
            counts += np.bincount(valid.ravel(), minlength=classes.num_classes)[: classes.num_classes]
            mask_bytes += array.size
            if mask_bytes <= cache_bytes:
                masks_ram.append(array.astype(np.uint8) if classes.ignore_index < 256 else array)
        self.mask_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self._masks = masks_ram if len(masks_ram) == len(self.keys) else None
        self._resize_mode, self._mask_mode = resize_mode, mask_size
        self.pixel_counts = counts
        self.report = {"keys": len(self.keys), "missing_masks": missing_masks,
                       "missing_features": missing_features, "resized_masks": resized}
        if missing_masks or missing_features:
            what = []
            if missing_masks:
                what.append(f"{len(missing_masks)} without a mask (first: {missing_masks[0]})")
            if missing_features:
                what.append(f"{len(missing_features)} not in every feature store (first: {missing_features[0]})")
            warnings.warn(f"skipped feature keys: {'; '.join(what)}", stacklevel=2)

        per_item = sum(math.prod(s.shape) * 4 for s in self.specs)
        self._cache: list[list[torch.Tensor]] | None = None
        if per_item * len(self.keys) <= cache_bytes:
            self._cache = [self._read_features(k) for k in self.keys]

    def _read_features(self, key: str) -> list[torch.Tensor]:
        by_variant = [store[key] for store in self.stores]
        return [torch.from_numpy(np.asarray(by_variant[s.variant][s.layer], dtype=np.float32)) for s in self.specs]

    def __len__(self) -> int:
        return len(self.keys)

    def mask(self, i: int) -> torch.Tensor:
        if self._masks is not None:
            array = self._masks[i]
        else:
            array, _ = read_mask(self.mask_files[i], self.mask_size, self.classes.num_classes,
                                 self.classes.ignore_index, self._mask_mode, self._resize_mode)
        return torch.from_numpy(array.astype(np.int64))

    def features(self, i: int) -> list[torch.Tensor]:
        if self._cache is not None:
            return [t.clone() for t in self._cache[i]]  # a consumer (memory bank) may write into them
        return self._read_features(self.keys[i])

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features(i), "mask": self.mask(i), "index": i}
