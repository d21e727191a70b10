"""Mask files: finding the mask of an image key under a mask root, and reading it as checked class ids.

A mask root is an HF imagefolder / Shapes-LT root (its ``metadata.csv`` files map ``file_name`` to
``mask_file_name``), or a plain folder holding masks under the key's path with its ``images`` component
turned into ``masks``, under the key's own relative path, or by its stem (``.png``).

Keys come from a feature store and mask names from ``metadata.csv``: both are read from files, so every
name they make stays inside the mask root as written (`difffeat.spine.run.confine_name`: no absolute name, no ``..`` out
of it); symbolic links in the mask root are followed, as image discovery follows them (a data set assembled from links
is its owner's choice, a name climbing out of it is not). An image is never taken for its own
mask: a key's ``masks/`` twin is tried before the key's own path, and no file under an ``images`` folder,
nor the very image the features came from, is ever a mask.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

from difffeat.data.walk import walk_once
from difffeat.errors import UserError
from difffeat.spine.run import confine_name, is_inside

IGNORE_INDEX = 255
IMAGES, MASKS = "images", "masks"


def path_parts(path: str) -> tuple[str, ...]:
    return PurePosixPath(path).parts


class MaskFinder:
    """Finds the mask file of an image key under a mask root (see the module doc for the rules).

    `image_root` is the folder the features were extracted from (the store manifest's "images"); when it
    lies inside the mask root, keys are first read relative to the mask root through it, which resolves
    keys like "images/0.png" that would otherwise match every split. It also names the image files, which
    are never taken for masks.
    """

    def __init__(self, root: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{root}: no such mask folder")
        self.image_root = Path(image_root) if image_root else None
        # Files under an images/ folder of the mask root are the images themselves, unless the features came
        # from a folder elsewhere (then the mask root may mirror its layout, images/ included).
        self.images_elsewhere = (self.image_root is not None and self.image_root.is_dir()
                                 and not _inside(self.image_root, self.root)
                                 and not _inside(self.root, self.image_root))
        self.prefix = ""
        if image_root:  # where the images lie in the mask root: as written (links kept), else as resolved
            for rel in (_relative(image_root, self.root), _relative(Path(image_root).resolve(), self.root.resolve())):
                if rel is not None:
                    self.prefix = "" if rel == "." else rel
                    break
        self.table: dict[str, Path] = {}  # image path relative to root → mask path (maybe missing on disk)
        for meta in _metadata_files(self.root):
            self._read_metadata(meta)
        self.suffixes: dict[tuple[str, ...], list[str]] = {}
        for key in self.table:
            parts = path_parts(key)
            for i in range(1, len(parts)):
                self.suffixes.setdefault(parts[i:], []).append(key)

    def _read_metadata(self, meta: Path) -> None:
        try:
            with open(meta, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{meta}: unreadable metadata ({e})") from None
        if not rows or "file_name" not in rows[0] or "mask_file_name" not in rows[0]:
            return
        base = PurePosixPath(meta.parent.relative_to(self.root).as_posix())
        for row in rows:
            if row.get("file_name") and row.get("mask_file_name"):
                key = (base / row["file_name"]).as_posix().removeprefix("./")
                mask = (base / row["mask_file_name"]).as_posix()
                # refuses ../ and absolute names
                self.table[key] = confine_name(self.root, mask, what=f"{meta}: mask_file_name")

    def find(self, key: str) -> Path | None:
        """The mask file for image `key` (a listed one may be missing on disk), or None when there is none.

        UserError when the key would make a path outside the mask root."""
        bases = list(dict.fromkeys([f"{self.prefix}/{key}" if self.prefix else key, key]))
        for base in bases:
            if base in self.table:
                return self.table[base]
        for base in bases:
            hits = self.suffixes.get(path_parts(base), [])
            if len(hits) == 1:
                return self.table[hits[0]]
        for base in bases:
            p = PurePosixPath(base)
            swapped = PurePosixPath(*[MASKS if part == IMAGES else part for part in p.parts])
            # The masks/ twin first: the key's own path is the image itself in an images/ + masks/ root.
            for cand in dict.fromkeys((swapped, swapped.with_suffix(".png"), p, p.with_suffix(".png"))):
                file = self._mask_file(cand.as_posix(), key)
                if file is not None:
                    return file
        for name in (PurePosixPath(key).name, PurePosixPath(key).stem + ".png"):
            file = self._mask_file(name, key)
            if file is not None:
                return file
        return None

    def _mask_file(self, relative: str, key: str) -> Path | None:
        """``root / relative`` when it is a file that may be a mask: inside the root, not an image."""
        try:
            confine_name(self.root, relative)
        except UserError:
            raise UserError(f"feature key {key!r}: its mask path {relative!r} leads outside the mask folder "
                            f"{self.root} (a ../ or absolute key); refusing it") from None
        file = self.root / relative
        if IMAGES in path_parts(relative) and not self.images_elsewhere:
            return None
        if not file.is_file() or self._is_image(file, key):
            return None
        return file

    def _is_image(self, file: Path, key: str) -> bool:
        if self.image_root is None:
            return False
        image = self.image_root / key
        try:
            return image.is_file() and os.path.samefile(file, image)
        except OSError:
            return False


def _metadata_files(root: Path) -> list[Path]:
    """Every ``metadata.csv`` under `root`, in sorted order, following linked folders (each real folder once; hidden
    folders left out, as in every other walk of a data set)."""
    found = []
    for folder, _, files in walk_once(root):
        if "metadata.csv" in files:
            found.append(Path(folder) / "metadata.csv")
    return sorted(found)


def _relative(path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """`path` relative to `root` (POSIX, "." for the root itself) when it lies inside it as written, else None."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return None if rel == ".." or rel.startswith(".." + os.sep) else Path(rel).as_posix()


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` lies in `folder` as written or once links are resolved."""
    return _relative(path, folder) is not None or is_inside(path, folder)


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
                img = resize_mask(img, size, resize_mode, ignore_index)
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


def resize_mask(img: Image.Image, size: tuple[int, int], mode: str, ignore_index: int) -> Image.Image:
    """A mask brought to `size` = (H, W) with the geometry the images had (`mode`), nearest neighbour."""
    height, width = size
    if img.mode in ("P", "1"):
        img = img.convert("L") if img.mode == "1" else Image.fromarray(np.asarray(img))
    if mode == "center-crop":
        return ImageOps.fit(img, (width, height), method=Image.NEAREST)
    if mode == "pad":  # padding is no class: ignore it, as the images were padded black
        return ImageOps.pad(img, (width, height), method=Image.NEAREST, color=ignore_index)
    return img.resize((width, height), Image.NEAREST)
