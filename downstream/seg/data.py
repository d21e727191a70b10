"""Segmentation data: stored features paired with per-pixel masks, matched by image key.

A `SegDataset` reads one or several feature stores (feature *variants*, e.g. with and without a
generation technique; one store may also hold several as ``NAME/LAYER`` layers) and the masks of their images
(`downstream.seg.targets`: a data set in its native layout, or a mask root), and yields per image the list of its
feature maps (one per store and layer, each at its own grid, float32) and its mask (class ids in the frame the
features were extracted at, 255 = ignore). Features are read on demand from the memory-mapped shards (or held in
RAM when they fit `cache_bytes`) and refused when they hold NaN or Inf; masks are read and checked once, up front,
so a bad mask fails before any training starts, naming the file. Keys without a mask, without features in
every store, or whose listed mask file is missing are skipped and listed in `report`.

`original(i)` gives an image's mask at its own size with its placement in the frame: what scoring at the original
resolution reads, one image at a time (nothing of the split is held).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore
from downstream.seg.classes import SegClasses
from downstream.seg.config import MASK_SIZE_MODES
from downstream.seg.feature_spec import FeatureSpec, variant_key  # noqa: F401 (importable here as before)
from downstream.seg.targets import open_targets, to_frame


def store_resolution(store: FeatureStore) -> tuple[int, int] | None:
    res = store.manifest.get("resolution")
    if res is None:
        return None
    if isinstance(res, int):
        return (res, res)
    return (int(res[0]), int(res[1]))


def collate(items: list[dict]) -> dict:
    """A batch: per spec a ``[B, C, h, w]`` tensor, masks ``[B, H, W]`` and the item indices."""
    return {"features": [torch.stack([it["features"][i] for it in items]) for i in range(len(items[0]["features"]))],
            "mask": torch.stack([it["mask"] for it in items]), "index": torch.tensor([it["index"] for it in items])}


class SegDataset(torch.utils.data.Dataset):
    """Feature maps of one or several stores paired with masks; see the module doc.

    ``dataset[i]`` is ``{"features": [Tensor [C, h, w], …] (one per `specs` entry), "mask": LongTensor
    [H, W], "index": i}``. `report` lists keys skipped for want of a mask, of a listed mask file or of
    features in every store, and how many masks were resized. `split` keeps keys whose path starts with
    that folder ("train" keeps "train/images/0.png"); `layers` picks layers by name (default: every layer
    of every store).
    """

    def __init__(self, stores: Sequence[str | os.PathLike | FeatureStore], masks, classes: SegClasses, *,
                 split: str | None = None, layers: Sequence[str] | None = None, mask_size: str = "resize",
                 cache_bytes: int = 1 << 30, keys: Sequence[str] | None = None, read_masks: bool = True):
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
        resolutions = {store_resolution(s) for s in self.stores}
        if len(resolutions) > 1:
            raise UserError("the feature stores come from images of different sizes "
                            f"({', '.join(f'{s.path}: {store_resolution(s)}' for s in self.stores)}); masks fit one")
        self.resolution = resolutions.pop()
        self._resize_mode = str(self.stores[0].manifest.get("config", {}).get("resize", "stretch"))
        self._mask_mode = mask_size
        self.targets = open_targets(masks, self.stores[0], classes, split)
        self.keys, self.mask_files, self.report = self._pair(keys)
        self.frame_masks = read_masks
        if read_masks:
            self._read_masks(cache_bytes)
        else:  # scoring at the original size reads each mask when it scores it
            self.mask_size, self._masks, self.pixel_counts = self.resolution, None, None
        per_item = sum(math.prod(s.shape) * 4 for s in self.specs)
        self._cache: list[list[torch.Tensor]] | None = None
        if per_item * len(self.keys) <= cache_bytes:
            self._cache = [self._read_features(k) for k in self.keys]

    def _pair(self, keys: Sequence[str] | None) -> tuple[list[str], list, dict]:
        """(keys, their mask references, the report of skipped keys)."""
        first = self.stores[0]
        wanted = list(keys) if keys is not None else first.keys()
        found, files, missing_masks, missing_files = self.targets.pair(wanted)
        if self.split and not (found or missing_masks or missing_files):
            raise UserError(f"{first.path}: no keys in split {self.split!r} of {self.targets.describe} (keys look "
                            f"like {first.keys()[0]!r})")
        missing_features = [k for k in found if not all(k in s for s in self.stores[1:])]
        if missing_features:
            keep = [i for i, k in enumerate(found) if all(k in s for s in self.stores[1:])]
            found, files = [found[i] for i in keep], [files[i] for i in keep]
        if not found:
            first_missing = (missing_masks or [f["key"] for f in missing_files] or missing_features or ["-"])[0]
            raise UserError(f"{self.targets.describe}: no masks found for the {len(wanted)} feature keys (first: "
                            f"{first_missing!r})")
        report = {"keys": len(found), "missing_masks": missing_masks, "missing_mask_files": missing_files,
                  "missing_features": missing_features}
        what = []
        if missing_masks:
            what.append(f"{len(missing_masks)} without a mask (first: {missing_masks[0]})")
        if missing_files:
            what.append(f"{len(missing_files)} whose listed mask file is missing (first: {missing_files[0]['file']})")
        if missing_features:
            what.append(f"{len(missing_features)} not in every feature store (first: {missing_features[0]})")
        if what:
            warnings.warn(f"skipped feature keys: {'; '.join(what)}", stacklevel=3)
        return found, files, report

    def _frame_mask(self, i: int, size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
        ref = self.mask_files[i]
        where = self.targets.where(ref)
        return to_frame(self.targets.read(ref), self.stores[0].placement(self.keys[i]), size, self._resize_mode,
                        self._mask_mode, self.classes.ignore_index, where)

    def original(self, i: int):
        """(mask [H0, W0] at the image's own size as a LongTensor, the image's `Placement` in the frame)."""
        ref = self.mask_files[i]
        array = self.targets.read(ref)
        place = self.stores[0].placement(self.keys[i])
        if place is None:  # a store with no frame size: its masks are the frame
            from difffeat.data.geometry import placement

            place = placement(array.shape, array.shape, self._resize_mode)
        if place.identity and tuple(array.shape) != tuple(place.frame):  # a store from before placements
            from difffeat.data.geometry import placement

            place = placement(array.shape, place.frame, self._resize_mode)
        elif tuple(array.shape) != tuple(place.size):
            raise UserError(f"{self.targets.where(ref)}: mask is {array.shape[0]}×{array.shape[1]} but its image is "
                            f"{place.size[0]}×{place.size[1]}")
        return torch.from_numpy(array.astype(np.int64)), place

    def _read_masks(self, cache_bytes: int) -> None:
        """Read every mask once: bad ones fail now, naming the file; counts feed the tail grouping."""
        classes, size = self.classes, self.resolution
        counts = np.zeros(classes.num_classes, np.int64)
        mask_bytes, resized, in_ram = 0, 0, []
        for i, file in enumerate(self.mask_files):
            array, was_resized = self._frame_mask(i, size)
            bad = (array >= classes.num_classes) & (array != classes.ignore_index)
            if bad.any():
                raise UserError(f"{self.targets.where(file)}: label value {int(array[bad].flat[0])} is not a class id "
                                f"(0..{classes.num_classes - 1}) or the ignore label {classes.ignore_index}")
            if size is None:
                size = array.shape
            elif array.shape != tuple(size):  # masks of a store with no resolution must agree with each other
                raise UserError(f"{file}: mask is {array.shape[0]}×{array.shape[1]}, others {size[0]}×{size[1]}")
            resized += was_resized
            valid = array[array != classes.ignore_index]
            counts += np.bincount(valid.ravel(), minlength=classes.num_classes)[: classes.num_classes]
            mask_bytes += array.size
            if mask_bytes <= cache_bytes:
                in_ram.append(array.astype(np.uint8) if classes.ignore_index < 256 else array)
        self.mask_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self._masks = in_ram if len(in_ram) == len(self.keys) else None
        self.pixel_counts = counts
        self.report["resized_masks"] = resized

    def _read_features(self, key: str) -> list[torch.Tensor]:
        by_variant = [store[key] for store in self.stores]
        maps = [torch.from_numpy(np.asarray(by_variant[s.variant][s.layer], dtype=np.float32)) for s in self.specs]
        for spec, x in zip(self.specs, maps):  # a head trained on NaN learns NaN: refuse such features up front
            if not torch.isfinite(x).all():
                raise UserError(f"{self.stores[spec.variant].path}: the features of {key!r} (layer {spec.layer}) "
                                "hold NaN or Inf; re-extract them or leave the image out")
        return maps

    def __len__(self) -> int:
        return len(self.keys)

    def mask(self, i: int) -> torch.Tensor:
        if self._masks is not None:
            array = self._masks[i]
        else:
            array, _ = self._frame_mask(i, self.mask_size)
        return torch.from_numpy(array.astype(np.int64))

    def features(self, i: int) -> list[torch.Tensor]:
        if self._cache is not None:
            return [t.clone() for t in self._cache[i]]  # a consumer (memory bank) may write into them
        return self._read_features(self.keys[i])

    def __getitem__(self, i: int) -> dict:
        mask = self.mask(i) if self.frame_masks else torch.zeros(0, dtype=torch.long)
        return {"features": self.features(i), "mask": mask, "index": i}
