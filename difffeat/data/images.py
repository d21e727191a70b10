"""Image input for feature extraction: find images, decode them safely to RGB, resize, and read captions.

Every image reaches the model the same way, whatever its file format or colour mode: decoded in full
(so a corrupt file fails here, where it can be named, not inside a batch), turned upright by its EXIF
orientation, and converted to 8-bit RGB. A file that cannot be read raises `BadImageError`, one line
naming the file and the reason, so that batch jobs can skip it, record it and go on.

Sources are a folder, a glob pattern, a single file, or a `datasets.Dataset`. Each image has a *key*,
its identity in feature stores: the POSIX path relative to the input folder, or for a data set its file
name or its split and index. A listing never descends into what difffeat wrote (a feature store, a run
folder: `is_difffeat_output`) nor into the folders it is told to `exclude` (the run's own output), so a
store kept inside its own input folder never takes its own pictures for inputs.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from difffeat.data.walk import walk_once
from difffeat.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Pictures of formats difffeat does not read (an animated GIF has no one image to take; the others need a decoder
# difffeat does not ship, or are JPEG under another name): a listing skips them and says so (`SkippedImagesWarning`).
# Any other file (a caption sidecar `.txt`, a `metadata.csv`, notes) is not an image and is left out without a word.
OTHER_IMAGE_SUFFIXES = (".gif", ".apng", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jfif", ".jpe", ".ico",
                        ".icns", ".tga", ".psd", ".ppm", ".pgm", ".pbm", ".pnm", ".pcx", ".dds", ".qoi", ".svg",
                        ".exr", ".hdr", ".raw", ".dng", ".cr2", ".nef", ".arw")
RESIZE_MODES = ("center-crop", "pad", "stretch")
DEFAULT_MAX_PIXELS = 64_000_000  # 8000×8000: above any photo a diffusion model is run on, far below a bomb

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_RESAMPLE = Image.Resampling.BICUBIC


class SkippedImagesWarning(UserWarning):
    """A listing left out pictures of a format difffeat does not read (`OTHER_IMAGE_SUFFIXES`): once per listing,
    with how many, which formats and one of them by name."""


class BadImageError(UserError):
    """An image file (or data set row) that cannot be read; `str(e)` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = path
        self.reason = " ".join(str(reason).split())  # one line, whatever the decoder's message held
        super().__init__(f"{path}: {self.reason}")

    def __reduce__(self):  # picklable across worker processes, which rebuild it from its arguments
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class ImageItem:
    """One input image: a file (`path`) or a row of a data set (`index`), known by its `key`."""

    key: str
    path: Path | None = None
    index: int | None = None


# ------------------------------------------------------------------------------------------- discovery
def has_image_suffix(name: str | os.PathLike) -> bool:
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_SUFFIXES


def is_unread_image(name: str | os.PathLike) -> bool:
    """Whether `name` is a picture of a format difffeat does not read (a GIF, a HEIC photo, …)."""
    return os.path.splitext(os.fspath(name))[1].lower() in OTHER_IMAGE_SUFFIXES


def _skipped_note(skipped: list[str]) -> str:
    """'3 files of a format difffeat does not read (.gif, .heic; first: a/x.gif); convert to PNG or JPEG …'."""
    suffixes = sorted({os.path.splitext(name)[1].lower() for name in skipped})
    first = sorted(skipped)[0]
    return (f"{len(skipped)} file{'s' if len(skipped) != 1 else ''} of a format difffeat does not read "
            f"({', '.join(suffixes)}; first: {first}); convert to PNG or JPEG to include "
            f"{'them' if len(skipped) != 1 else 'it'}")


def is_difffeat_output(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds what difffeat wrote: a feature store (a difffeat ``manifest.json``) or a run
    (a ``config.json`` run marker). Its pictures are results (a PCA picture, samples), not inputs."""
    from difffeat.spine.run import RUN_FORMAT, STORE_FORMAT

    for name, fmt in (("manifest.json", STORE_FORMAT), ("config.json", RUN_FORMAT)):
        file = Path(folder) / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(data, dict) and data.get("format") == fmt:
                return True
    return False


class _Skip:
    """The folders a listing leaves out: those given, and every difffeat output below the root."""

    def __init__(self, exclude: Iterable[str | os.PathLike]):
        self.exclude = {os.path.realpath(os.path.expanduser(os.fspath(e))) for e in exclude}
        self.seen: dict[str, bool] = {}

    def __call__(self, folder: str) -> bool:
        real = os.path.realpath(folder)
        if real not in self.seen:
            self.seen[real] = real in self.exclude or is_difffeat_output(real)
        return self.seen[real]

    def inside(self, file: str, root: str) -> bool:
        """Whether `file` lies in a left-out folder below `root` (the root itself is what the user named)."""
        folder, top = os.path.dirname(os.path.abspath(file)), os.path.abspath(root)
        while folder.startswith(top) and folder != top:
            if self(folder):
                return True
            folder = os.path.dirname(folder)
        return os.path.realpath(top) in self.exclude


def discover_images(source: str | os.PathLike, recursive: bool = True,
                    exclude: Iterable[str | os.PathLike] = ()) -> list[ImageItem]:
    """The images under a folder, matching a glob pattern, or a single image file, sorted by key.

    Folders are walked (recursively unless told not to) skipping hidden files and folders, the folders in
    `exclude` and every folder below the root that holds a difffeat output (`is_difffeat_output`); keys are
    POSIX paths relative to the folder, or to a pattern's longest folder without wildcards. Files are
    chosen by suffix alone: a corrupt one is listed here and reported when it is loaded. Pictures of a format
    difffeat does not read (a `.gif`, a `.heic`: `OTHER_IMAGE_SUFFIXES`) are left out with one
    `SkippedImagesWarning` per listing (how many, which formats, the first by name); other files (captions,
    tables) are not images and are left out without a word.
    """
    text = os.path.expanduser(os.fspath(source))
    path = Path(text)
    skip = _Skip(exclude)
    skipped: list[str] = []  # pictures of a format difffeat does not read: said once, below
    if path.is_file():
        if not has_image_suffix(path):
            raise UserError(f"{source}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        return [ImageItem(key=path.name, path=path)]
    if path.is_dir():
        items = [ImageItem(key=rel, path=path / rel) for rel in _walk(path, recursive, skip, skipped)]
        where = "in this folder" + (" or its sub-folders" if recursive else "")
    elif glob.has_magic(text):
        items = _glob(text, recursive, skip, skipped)
        where = "match this pattern"
    else:
        raise UserError(f"{source}: no such folder")
    if not items:
        also = f"; skipped {_skipped_note(skipped)}" if skipped else ""
        raise UserError(f"{source}: no images found {where} (looked for {', '.join(IMAGE_SUFFIXES)}){also}")
    if skipped:
        warnings.warn(f"{source}: skipped {_skipped_note(skipped)}", SkippedImagesWarning, stacklevel=2)
    return sorted(items, key=lambda item: item.key)


def _walk(root: Path, recursive: bool, skip: _Skip, skipped: list[str] | None = None) -> Iterator[str]:
    if skip.exclude and os.path.realpath(root) in skip.exclude:
        return
    for folder, dirs, files in walk_once(root):
        dirs[:] = [d for d in dirs if not skip(os.path.join(folder, d))] if recursive else []
        rel = Path(folder).relative_to(root)
        for name in files:
            if not name.startswith(".") and has_image_suffix(name):
                yield (rel / name).as_posix()
            elif skipped is not None and not name.startswith(".") and is_unread_image(name):
                skipped.append((rel / name).as_posix())


def _glob(pattern: str, recursive: bool, skip: _Skip, skipped: list[str] | None = None) -> list[ImageItem]:
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    # glob (unlike pathlib) skips hidden names for wildcards, as the folder walk does.
    matches = [m for m in glob.glob(pattern, recursive=recursive)
               if os.path.isfile(m) and not skip.inside(m, str(root))]
    if skipped is not None:
        skipped += [Path(os.path.relpath(m, root)).as_posix() for m in matches if is_unread_image(m)]
    return [ImageItem(key=Path(os.path.relpath(m, root)).as_posix(), path=Path(m)) for m in matches
            if has_image_suffix(m)]


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file: what a resumed run compares to see that an input changed; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------------------------- loading
def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file in full to upright 8-bit RGB; `BadImageError` names the file and the reason.

    The pixel count is checked against `max_pixels` from the header, before any pixel is decoded, so a
    small file declaring a huge image (a decompression bomb) is refused cheaply; None lifts this limit
    (Pillow's own hard limit, `2 * Image.MAX_IMAGE_PIXELS`, still applies).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(path, "no such file") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
    if path.is_dir():
        raise BadImageError(path, "is a folder, not an image file")
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    return _decode(path, path, max_pixels)


def _decode(source: Path | IO[bytes], label: str | os.PathLike, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS; our own check below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImageError(label, _too_large(f"{w}×{h}", max_pixels))
                im.load()
                return to_rgb(_exif_upright(im))
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(label, _bomb_reason(str(e), max_pixels)) from None
    except UnidentifiedImageError:
        raise BadImageError(label, "not an image (cannot identify format)") from None
    except MemoryError:
        raise
    except _UnsupportedMode as e:
        raise BadImageError(label, str(e)) from None
    except Exception as e:  # Pillow's plugins raise many types for malformed data
        raise BadImageError(label, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _too_large(size: str, limit: int) -> str:
    return f"image too large: {size} pixels exceeds the limit of {limit} (possible decompression bomb)"


def _bomb_reason(message: str, max_pixels: int | None) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", message)]
    if len(numbers) < 2:  # not the message we know: keep Pillow's words
        return f"image too large: {message}"
    pixels, pillow_limit = numbers[:2]
    return _too_large(str(pixels), pillow_limit if max_pixels is None else min(max_pixels, pillow_limit))


def _exif_upright(im: Image.Image, in_place: bool = True) -> Image.Image:
    """`im` turned upright by its EXIF orientation; `in_place` for images this module owns."""
    try:
        out = ImageOps.exif_transpose(im, in_place=in_place)
    except Exception:
        # A damaged EXIF block says nothing about the pixels, which decoded fine: keep them as stored.
        return im
    return im if out is None else out


class _UnsupportedMode(ValueError):
    pass


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB (the same object when it already is); alpha is flattened onto white.

    16-bit and 32-bit integer grey (I;16*, I) maps the full 16-bit range onto 8 bits (v / 257), so
    that a 16-bit image keeps its contrast instead of clipping to white. Float grey (F) is taken as
    [0, 1] when all its values lie there, else as 0…255 (Pillow's convention), clipped.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img if mode in ("I;16", "I;16L", "I;16B", "I") else img.convert("I"))
        grey = np.rint(np.clip(arr.astype(np.float64), 0, 65535) / 257.0)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.rint(np.clip(arr, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or mode == "P" or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # Transparent areas have no colour of their own. Documents, icons and logos are drawn to be seen
        # on white, and white is the usual convention (browsers, viewers), so flatten onto white.
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, …
    except ValueError:
        raise _UnsupportedMode(f"unsupported colour mode {mode}") from None


# ----------------------------------------------------------------------------------- Hugging Face data
def discover_hf(dataset: Any, image_column: str = "image") -> list[ImageItem]:
    """One item per row of a `datasets.Dataset`, in row order.

    Keys are ``"<split>/<name>"`` (just ``<name>`` when the data set has no split): `name` is the row's
    `file_name` column if there is one, else its image file's path relative to the folder shared by
    all the rows' files; when names are missing or not unique, it is the row index as ``f"{index:08d}"``.
    """
    _check_column(dataset, image_column)
    names = _hf_names(dataset, image_column)
    split = str(dataset.split) if getattr(dataset, "split", None) else None
    if names is None:
        names = [f"{i:08d}" for i in range(len(dataset))]
    return [ImageItem(key=f"{split}/{name}" if split else name, index=i) for i, name in enumerate(names)]


def load_hf_image(dataset: Any, item: ImageItem, image_column: str = "image",
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image of row `item.index`, decoded like `load_image`; errors name `item.key`."""
    if item.index is None:
        raise ValueError(f"{item.key}: not a data set item (index is None)")
    _check_column(dataset, image_column)
    if _is_image_feature(dataset, image_column):
        # Decode the stored bytes ourselves (not via `datasets`), for the same size check and errors.
        value = _arrow_rows(dataset, image_column, item.index, item.index + 1).to_pylist()[0]
    else:
        value = dataset[item.index][image_column]
    if isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
        if not data:
            raise BadImageError(item.key, "empty file (0 bytes)")
        return _decode(io.BytesIO(data), item.key, max_pixels)
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        if os.path.exists(value):
            return load_image(value, max_pixels)
        feature = dataset.features[image_column]
        if not hasattr(feature, "decode_example"):
            raise BadImageError(item.key, f"no such file ({value})")
        try:  # a remote file: only `datasets` knows how to fetch it
            value = feature.decode_example({"path": os.fspath(value), "bytes": None})
        except Exception as e:
            raise BadImageError(item.key, f"cannot read image ({type(e).__name__}: {e})") from None
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise BadImageError(item.key, f"column {image_column!r} holds {type(value).__name__}, not an image")
    value = _exif_upright(value, in_place=False)  # never turn the caller's own image object
    try:
        return to_rgb(value)
    except _UnsupportedMode as e:
        raise BadImageError(item.key, str(e)) from None


def _check_column(dataset: Any, column: str) -> None:
    if column not in dataset.column_names:
        raise UserError(f"data set has no column {column!r} (columns: {', '.join(dataset.column_names)})")


def _is_image_feature(dataset: Any, column: str) -> bool:
    import datasets

    return isinstance(dataset.features[column], datasets.Image)


def _is_string_feature(dataset: Any, column: str) -> bool:
    return getattr(dataset.features[column], "dtype", None) in ("string", "large_string")


def _arrow_rows(dataset: Any, column: str, start: int, stop: int):
    """Rows [start, stop) of `column` as stored (no image decoding)."""
    return dataset.with_format("arrow", columns=[column])[start:stop].column(column)


def _hf_names(dataset: Any, image_column: str) -> list[str] | None:
    import pyarrow as pa

    n = len(dataset)
    if "file_name" in dataset.column_names and _is_string_feature(dataset, "file_name"):
        names = [_posix(str(v)) for v in dataset["file_name"]]
    elif _is_image_feature(dataset, image_column) or _is_string_feature(dataset, image_column):
        paths: list[str | None] = []
        for start in range(0, n, 4096):  # in batches: a column of embedded images may be large
            rows = _arrow_rows(dataset, image_column, start, min(start + 4096, n))
            if pa.types.is_string(rows.type) or pa.types.is_large_string(rows.type):
                paths += rows.to_pylist()
            else:
                paths += rows.combine_chunks().field("path").to_pylist()
        names = _relative_names(paths)
        if names is None:
            return None
    else:
        return None
    return names if len(set(names)) == n and all(names) else None


def _relative_names(paths: list[str | None]) -> list[str] | None:
    if not paths or any(not p for p in paths):
        return None
    # Remote files look like "zip://a/b.png::https://…": keep the path inside the archive.
    local = [_posix(p.split("::")[0].split("://")[-1]) for p in paths]
    try:
        parent = posixpath.commonpath([posixpath.dirname(p) for p in local])
    except ValueError:  # absolute and relative paths mixed
        return None
    return [posixpath.relpath(p, parent) if parent else p for p in local]


def _posix(path: str) -> str:
    path = path.replace("\\", "/")
    return path[2:] if path.startswith("./") else path


# -------------------------------------------------------------------------------------------- resizing
def resize_image(img: Image.Image, size: tuple[int, int], mode: str = "center-crop") -> Image.Image:
    """`img` at `size` = (height, width), bicubic; an image already that size is returned as is.

    "center-crop" scales to cover the target and keeps the centre, "pad" scales to fit inside and pads
    with black around the centred image, "stretch" resizes without keeping the aspect ratio.
    """
    if mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode {mode!r} (valid: {', '.join(RESIZE_MODES)})")
    height, width = size
    if img.size == (width, height):
        return img
    if mode == "center-crop":
        return ImageOps.fit(img, (width, height), method=_RESAMPLE)
    if mode == "pad":
        return ImageOps.pad(img, (width, height), method=_RESAMPLE, color=0)
    return img.resize((width, height), _RESAMPLE)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """A float32 `[B, 3, H, W]` tensor in [0, 1] from same-size images (converted to RGB if need be)."""
    import torch

    if not images:
        raise ValueError("to_tensor needs at least one image")
    sizes = {img.size for img in images}
    if len(sizes) > 1:
        raise ValueError(f"images differ in size {sorted(sizes)}; resize them first (resize_image)")
    arr = np.stack([np.asarray(to_rgb(img), dtype=np.uint8) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


# -------------------------------------------------------------------------------------------- captions
def sidecar_caption(path: Path) -> str | None:
    """The caption in the `.txt` file beside an image (same stem), stripped; None when there is none.

    An empty sidecar gives "" (an explicit empty prompt), not None.
    """
    txt = Path(path).with_suffix(".txt")
    try:
        return txt.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:  # this image's own input is bad: a run skips the image and names it
        raise BadImageError(path, f"its caption file {txt.name} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{txt}: cannot read caption file ({e.strerror or e})") from None


def read_caption_table(csv_path: str | os.PathLike, column: str, key_column: str = "file_name") -> dict[str, str]:
    """`{key: caption}` from a CSV table (e.g. an HF `metadata.csv`); keys as in `key_column`, POSIX."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for name in (key_column, column):
                if name not in header:
                    raise UserError(f"{csv_path}: no column {name!r} (columns: {', '.join(header) or 'none'})")
            table: dict[str, str] = {}
            for row in reader:
                key = _posix((row[key_column] or "").strip())
                if key in table:
                    raise UserError(f"{csv_path}: line {reader.line_num}: key {key!r} appears twice")
                table[key] = (row[column] or "").strip()
    except FileNotFoundError:
        raise UserError(f"{csv_path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{csv_path}: not UTF-8 text") from None
    return table


def label_prompt(template: str, label: str) -> str:
    """The prompt for a class label, e.g. ``label_prompt("a photo of a {label}", "cat")``."""
    if "{label}" not in template:
        raise UserError(f"prompt template {template!r} has no {{label}} placeholder")
    # str.replace, not str.format: other braces in a template are plain text.
    return template.replace("{label}", label)
