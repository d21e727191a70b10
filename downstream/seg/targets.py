"""Where the masks of a feature store's images come from, read at their own size as train ids.

Two sources, one interface (`pair` store keys with mask references, `read` one as a checked ``[H0, W0]`` array of
class ids, `where` names it in messages):

- `LayoutTargets`: a data set in its native layout (`difffeat.data.layouts`): ADE20K, Cityscapes, VOC, COCO-Stuff,
  the ddpm-segmentation sets, a local HF data set, Shapes-LT. Its reader turns raw values into train ids; a split
  names the layout's own split.
- `FolderTargets`: a mask root as before layouts existed (an imagefolder's ``mask_file_name``, a ``masks/`` twin of
  ``images/``, a file by the key's path or stem: `downstream.seg.masks.MaskFinder`); a split is a key prefix.

`open_targets` picks one: a data spec (``LAYOUT:ROOT[:SPLIT]``), a folder that holds a known layout's tree, any
other folder, or, with neither, the data set the store's manifest says its images came from.

`to_frame` brings a mask to the frame the features were extracted at, with the placement the store recorded (the
same resize, crop or pad the image had; nearest neighbour, padding ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from difffeat.data.geometry import Placement
from difffeat.data.layouts import Layout, detect_layout, open_data, parse_data_spec
from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore
from downstream.seg.masks import MaskFinder, read_mask, resize_mask


class LayoutTargets:
    """The masks of a data set in its native layout, by the keys its reader gives its images."""

    def __init__(self, layout: Layout, image_root: str | None = None):
        self.layout = layout
        self.prefix = ""
        if image_root:  # features of ROOT/images/... extracted from that folder: keys relative to it
            try:
                rel = Path(image_root).resolve().relative_to(layout.root.resolve()).as_posix()
                self.prefix = "" if rel == "." else rel
            except (ValueError, OSError):
                pass

    @property
    def describe(self) -> str:
        from difffeat.data.layouts import data_spec

        return data_spec(self.layout)

    def pair(self, keys: Sequence[str]) -> tuple[list[str], list, list[str], list[dict]]:
        """(keys with a mask, their samples, keys of the split without a mask, keys whose mask file is missing);
        keys of other splits are left out silently."""
        found, refs, missing_files = [], [], []
        for key in keys:
            sample = self.layout.sample(key) or (self.layout.sample(f"{self.prefix}/{key}") if self.prefix else None)
            if sample is None:
                continue
            if sample.target is not None and not Path(sample.target).is_file():
                missing_files.append({"key": key, "file": str(sample.target)})
                continue
            found.append(key)
            refs.append(sample)
        return found, refs, [], missing_files

    def read(self, sample) -> np.ndarray:
        return self.layout.target(sample)

    def where(self, sample) -> str:
        return str(sample.target) if sample.target is not None else f"{self.layout.root}: {sample.key}"


class FolderTargets:
    """Mask files under a mask root, found by `MaskFinder` and checked by `read_mask`."""

    def __init__(self, root: str | os.PathLike, image_root: str | None, num_classes: int, ignore_index: int,
                 split: str | None = None):
        self.finder = MaskFinder(root, image_root)
        self.root, self.num_classes, self.ignore_index, self.split = str(root), num_classes, ignore_index, split
        self.describe = str(root)

    def pair(self, keys: Sequence[str]) -> tuple[list[str], list, list[str], list[dict]]:
        if self.split:
            prefix = self.split.strip("/") + "/"
            keys = [k for k in keys if k.startswith(prefix)]
        found, refs, missing, missing_files = [], [], [], []
        for key in keys:
            file = self.finder.find(key)
            if file is None:
                missing.append(key)
            elif not file.is_file():  # listed in a metadata.csv but not there: skip the image, keep going
                missing_files.append({"key": key, "file": str(file)})
            else:
                found.append(key)
                refs.append(file)
        return found, refs, missing, missing_files

    def read(self, file: Path) -> np.ndarray:
        return read_mask(file, None, self.num_classes, self.ignore_index)[0]

    def where(self, file: Path) -> str:
        return str(file)


def open_targets(masks: str | os.PathLike | Layout | None, store: FeatureStore, classes, split: str | None):
    """The mask source for `store` (see the module doc); `classes` are the run's (their names name the train ids)."""
    config = store.manifest.get("config", {})
    image_root = config.get("images")
    if isinstance(masks, Layout):
        return LayoutTargets(masks, image_root)
    names = classes.names if classes is not None else None
    if masks is None:
        data = config.get("data")
        if not data:
            raise UserError(f"{store.path}: the store does not say which data set its images came from; give the "
                            "masks (--data LAYOUT:ROOT or --masks DIR)")
        spec = f"{data['layout']}:{data['root']}"
        return LayoutTargets(open_data(spec, split or data.get("split"), names), image_root)
    text = os.fspath(masks)
    if parse_data_spec(text) is not None:
        return LayoutTargets(open_data(text, split, names), image_root)
    found = detect_layout(text)
    if found is not None:
        return LayoutTargets(open_data(f"{found}:{text}", split, names), image_root)
    if classes is None:
        raise UserError(f"{masks}: a mask folder needs its classes (--classes or MASKS/classes.json)")
    return FolderTargets(text, image_root, classes.num_classes, classes.ignore_index, split)


def to_frame(mask: np.ndarray, place: Placement | None, frame: tuple[int, int] | None, store_resize: str,
             mask_size: str, ignore_index: int, where: str) -> tuple[np.ndarray, bool]:
    """`mask` (class ids at the image's own size) in the extraction frame, and whether it was resized.

    With a recorded placement the mask must have the image's size, and gets the image's resize, crop or pad. A
    store without one (its images had the frame's size, or it predates placements) takes a mask of the frame's
    size as it is and resizes another one by the store's resize mode, or refuses it (`mask_size` "refuse")."""
    shape = tuple(mask.shape)
    if frame is None or shape == tuple(frame):
        if place is not None and not place.identity and shape != tuple(place.size):
            raise UserError(f"{where}: mask is {shape[0]}×{shape[1]} but its image is {place.size[0]}×{place.size[1]}")
        return mask, False
    if place is not None and not place.identity:
        if shape != tuple(place.size):
            raise UserError(f"{where}: mask is {shape[0]}×{shape[1]} but its image is {place.size[0]}×{place.size[1]}")
        mode = place.mode
    else:
        if mask_size == "refuse":
            raise UserError(f"{where}: mask is {shape[0]}×{shape[1]} but the features come from {frame[0]}×{frame[1]} "
                            "images; resize it or pass --mask-size resize")
        mode = store_resize
    img = Image.fromarray(mask.astype(np.uint8), "L") if mask.dtype == np.uint8 or mask.max(initial=0) < 256 else \
        Image.fromarray(mask.astype(np.int32), "I")
    return np.asarray(resize_mask(img, frame, mode, ignore_index)), True


def layout_of(masks, store: FeatureStore, split: str | None = None) -> Layout | None:
    """The layout reader `open_targets` would read `masks` (a spec, a folder, or None: the store's own data set)
    by, or None for a plain mask folder."""
    if isinstance(masks, Layout):
        return masks
    if masks is None:
        data = store.manifest.get("config", {}).get("data")
        return open_data(f"{data['layout']}:{data['root']}", split or data.get("split")) if data else None
    text = os.fspath(masks)
    if parse_data_spec(text) is not None:
        return open_data(text, split)
    found = detect_layout(text)
    return open_data(f"{found}:{text}", split) if found else None


def resolve_seg_classes(spec, masks, store: FeatureStore, split: str | None = None):
    """The run's classes: `spec` (--classes) when given; else the data set's (its names, and the counts and groups
    of the root's classes.json when it has one); else a mask folder's classes.json."""
    from downstream.seg.classes import SegClasses, load_classes, resolve_classes

    if spec is not None:
        return load_classes(spec)
    layout = layout_of(masks, store, split)
    if layout is None:
        if masks is None:
            raise UserError(f"{store.path}: the store does not say which data set its images came from; give the "
                            "masks (--data LAYOUT:ROOT or --masks DIR)")
        return resolve_classes(None, masks)
    file = layout.classes_file()
    if file is not None:
        classes = load_classes(file)
        if classes.names == layout.names:
            return classes
    return SegClasses(list(layout.names), layout.ignore_index)

