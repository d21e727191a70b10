"""The Shapes-LT world written in the native layouts of real data sets, with each layout's own label encoding.

`difffeat data synth OUT --layout L` writes the same world in every layout L, so that every data-set reader of
difffeat can be tested end to end offline, and the same chain run on two layouts gives identical numbers:

1. the scene ``i`` of each split (train, val, test; sizes `split_sizes`) is `generate_scene(seed, split, i)`;
2. it is resized to a size that cycles with ``i`` (``sizes``: "mixed", "square" or "native" 64×64; image
   BICUBIC, mask NEAREST);
3. every mask pixel with another class in its 4-neighbourhood becomes 255 (ignore): object boundaries, as VOC
   marks them;
4. the image is JPEG-encoded (quality 95) and decoded: the decoded pixels are the world's image. Layouts whose
   images are ``.jpg`` files write those exact JPEG bytes; layouts with ``.png`` images write the decoded
   pixels losslessly.

The class ids of the world are the 13 Shapes-LT classes (``classes.json``'s "names", the train ids), 255 is
ignore. Each layout writes them in its data set's own raw encoding (ADE's ``c + 1`` with 0 = "other",
Cityscapes labelIds, VOC palette indices, COCO-Stuff raw ids, …); a reader that decodes the encoding as it
would for the real data set gets the world's masks back. File names sort in scene order within a split.

Layouts (OUT is the data set's root; c is a world class id):

- ``shapes-lt``: the Shapes-LT tree (``<split>/images/<6 digits>.png`` + ``.txt`` caption, ``masks/``,
  ``metadata.csv``).
- ``ade20k`` (ADEChallengeData2016): ``images/{training,validation}/ADE_{train,val}_<8 digits from 1>.jpg``,
  ``annotations/…/<stem>.png`` ('L', c + 1, ignore → 0). The test split is not written (ADE's has no masks).
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png``, ``gtFine/…
  _gtFine_labelIds.png`` (the smallest labelId whose trainId is c; ignore → labelIds not evaluated, cycling
  through `CITYSCAPES_IGNORE_IDS`) and ``_gtFine_color.png``. Cities: train aachen, bochum; val frankfurt;
  test berlin, each taking a contiguous block of scenes (frame = scene index).
- ``voc``: ``JPEGImages/2012_<6 digits>.jpg`` (numbered across splits: train, then val, then test),
  ``SegmentationClass/<stem>.png`` ('P' with the VOC palette, c, 255 at ignore),
  ``ImageSets/Segmentation/{train,val,trainval,test}.txt``. The world's test split is listed in ``test.txt``
  and has masks here; real VOC test masks are private.
- ``coco-stuff`` (stuffthingmaps): ``images/{train2017,val2017}/<12 digits>.jpg`` (numbered across splits),
  ``annotations/…/<stem>.png`` ('L' raw ids: c → the c-th used raw id, ignore → 255); test not written.
  ``coco-stuff-27``: the same tree, c → the smallest used raw id whose COCO-Stuff-27 coarse class is c.
- ``ddpm-seg``: ``real/train/<6 digits>.png`` + ``.npy`` (uint8 [H, W], c, 255 ignore); the world's val split is
  ``real/test``, its test split is not written. Default sizes "square" (ddpm-segmentation asserts square images).
- ``hf``: parquet shards ``data/{train,validation,test}-00000-of-00001.parquet`` as ``scene_parse_150`` ships them
  (``image``, ``annotation``: PNG, c + 1 with ignore → 0; ``scene_category`` 0). ``hf-disk``: the same rows as a
  ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``, ``train/``, ``validation/``, ``test/``).

Every layout also writes ``classes.json`` (Shapes-LT's class table with "layout" and "world"), the marker of the
spine's run folder (kind "shapes-lt-world"): difffeat writes only into a new or empty folder or one such set, and
``overwrite`` replaces only the files a set of this kind wrote (its layout's top-level entries, and those of the
layout the folder held before), never anything else there. A plain Shapes-LT set (`synthesize`, kind
"shapes-lt") and a layout set never replace one another.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from difffeat.data.shapes_lt import (
    CLASS_ID,
    CLASS_NAMES,
    CLASSES,
    IGNORE_INDEX,
    SPLITS,
    Scene,
    class_table,
    generate_scene,
    label_profile,
    split_sizes,
)
from difffeat.data.staging import staged
from difffeat.errors import UserError
from difffeat.spine.run import RUN_FORMAT, RunFolder

KIND = "shapes-lt-world"
JPEG_QUALITY = 95
SIZE_CYCLES: dict[str, tuple[tuple[int, int], ...]] = {  # (H, W), cycled by scene index
    "mixed": ((64, 64), (48, 64), (64, 48), (72, 96), (96, 72), (60, 80)),
    "square": ((64, 64), (96, 96), (48, 48)),
    "native": ((64, 64),),
}
CITYSCAPES_IGNORE_IDS = (0, 1, 4, 5, 9, 14)  # labelIds not evaluated (trainId 255) that ignore pixels take
PNG_LEVEL = 0  # uncompressed PNGs, as `synthesize` writes them: fast, and the same bytes with any zlib


# ------------------------------------------------------------------------------------------------ world
@dataclass(frozen=True)
class WorldItem:
    """One scene of the world: what every layout writes, each in its own encoding."""

    split: str  # the world's split: train, val or test
    index: int  # the scene's index in its split
    jpeg: bytes  # the image as JPEG (quality 95): the bytes .jpg layouts write
    image: np.ndarray  # [H, W, 3] uint8: the decoded JPEG, the pixels every layout holds
    mask: np.ndarray  # [H, W] uint8 world class ids, IGNORE_INDEX on boundaries
    scene: Scene  # the 64×64 scene it was made from (captions, label)


def boundary_ignore(mask: np.ndarray) -> np.ndarray:
    """`mask` with every pixel whose 4-neighbourhood (inside the image) holds another class set to 255."""
    edge = np.zeros(mask.shape, bool)
    vertical = mask[1:] != mask[:-1]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return np.where(edge, np.uint8(IGNORE_INDEX), mask).astype(np.uint8)


def world_size(sizes: str, index: int) -> tuple[int, int]:
    """(H, W) of scene `index` for the size cycle `sizes`."""
    cycle = SIZE_CYCLES[sizes]
    return cycle[index % len(cycle)]


def world_item(seed: int, split: str, index: int, imbalance: float = 100.0, sizes: str = "mixed") -> WorldItem:
    """The scene `index` of `split` as the world holds it (steps 1–4 of the module docstring)."""
    scene = generate_scene(seed, split, index, imbalance)
    h, w = world_size(sizes, index)
    image = Image.fromarray(scene.image, "RGB")
    mask = Image.fromarray(scene.mask, "L")
    if (h, w) != scene.mask.shape:
        image = image.resize((w, h), Image.BICUBIC)
        mask = mask.resize((w, h), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    jpeg = buffer.getvalue()
    with Image.open(io.BytesIO(jpeg)) as decoded:
        pixels = np.asarray(decoded.convert("RGB")).copy()
    return WorldItem(split, index, jpeg, pixels, boundary_ignore(np.asarray(mask)), scene)


def world_split(split: str, count: int, seed: int = 0, imbalance: float = 100.0,
                sizes: str = "mixed") -> Iterator[WorldItem]:
    """The items of one split in scene order."""
    label_profile(imbalance)  # a bad ratio fails here, before any scene
    for i in range(count):
        yield world_item(seed, split, i, imbalance, sizes)


def world(n: int, seed: int = 0, imbalance: float = 100.0, sizes: str = "mixed",
          splits: Iterable[str] = SPLITS) -> Iterator[tuple[str, Iterator[WorldItem]]]:
    """Per split (in `splits`, of the world's train / val / test), the split name and its items in scene order."""
    counts = split_sizes(n)
    for split in splits:
        yield split, world_split(split, counts[split], seed, imbalance, sizes)


# ----------------------------------------------------------------------------------------- file helpers
def _save_png(array: np.ndarray, path: Path, mode: str, palette: list[int] | None = None) -> None:
    img = Image.fromarray(array, mode)
    if palette is not None:
        img.putpalette(palette)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=PNG_LEVEL)


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def _save_jpeg(item: WorldItem, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(item.jpeg)


def _lut(values: dict[int, int], fill: int) -> np.ndarray:
    """A 256-entry uint8 lookup table: `values` (world id → raw value), everything else `fill`."""
    lut = np.full(256, fill, np.uint8)
    for k, v in values.items():
        lut[k] = v
    return lut


def _split_offsets(counts: dict[str, int]) -> dict[str, int]:
    """Where each split's numbers start when a layout numbers files across splits (train, then val, then test)."""
    offsets, start = {}, 0
    for split in SPLITS:
        offsets[split] = start
        start += counts[split]
    return offsets


# -------------------------------------------------------------------------------------------- layouts
class LayoutWriter:
    """Writes the world's items in one data set's layout into a (temporary) root folder.

    `splits` maps the world's splits this layout writes to its own split names; `owned` lists the top-level
    names the layout writes in the root (what ``overwrite`` may remove); `write_split` writes one split's items
    in scene order, `finish` anything that spans splits.
    """

    name: ClassVar[str]
    owned: ClassVar[tuple[str, ...]]
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "val", "test": "test"}
    default_sizes: ClassVar[str] = "mixed"

    def __init__(self, root: Path, counts: dict[str, int], progress: bool = False):
        self.root = root
        self.counts = counts  # the world's split sizes
        self.progress = progress  # whether the libraries it calls may show progress bars

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Anything that spans splits (lists, a dataset dict), after every split."""


LAYOUT_WRITERS: dict[str, type[LayoutWriter]] = {}


def _register(cls: type[LayoutWriter]) -> type[LayoutWriter]:
    LAYOUT_WRITERS[cls.name] = cls
    return cls


@_register
class ShapesLTWriter(LayoutWriter):
    """The Shapes-LT tree of `synthesize` (DESIGN.md), holding the world's pixels and masks."""

    name = "shapes-lt"
    owned = SPLITS

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        import csv

        folder = self.root / self.splits[split]
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir(parents=True)
        rows = []
        for item in items:
            key = f"{item.index:06d}"
            _save_png(item.image, folder / "images" / f"{key}.png", "RGB")
            _save_png(item.mask, folder / "masks" / f"{key}.png", "L")
            (folder / "images" / f"{key}.txt").write_text(item.scene.fine_caption + "\n")
            rows.append((f"images/{key}.png", f"masks/{key}.png", item.scene.label, item.scene.coarse_caption,
                         item.scene.fine_caption))
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "mask_file_name", "label", "coarse_caption", "fine_caption"])
            writer.writerows(rows)


@_register
class ADE20KWriter(LayoutWriter):
    """ADEChallengeData2016: JPEG images, 'L' annotations with 0 = "other" (ignore) and class c as c + 1."""

    name = "ade20k"
    owned = ("images", "annotations")
    splits = {"train": "training", "val": "validation"}
    stems = {"train": "ADE_train", "val": "ADE_val"}
    lut = _lut({c: c + 1 for c in range(len(CLASS_NAMES))}, fill=0)

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        folder = self.splits[split]
        for item in items:
            stem = f"{self.stems[split]}_{item.index + 1:08d}"
            _save_jpeg(item, self.root / "images" / folder / f"{stem}.jpg")
            _save_png(self.lut[item.mask], self.root / "annotations" / folder / f"{stem}.png", "L")


@_register
class CityscapesWriter(LayoutWriter):
    """Cityscapes gtFine: PNG images per city, labelIds masks (and colour renders that readers must skip)."""

    name = "cityscapes"
    owned = ("leftImg8bit", "gtFine")
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt",), "test": ("berlin",)}

    def __init__(self, root: Path, counts: dict[str, int], progress: bool = False):
        super().__init__(root, counts, progress)
        from difffeat.data.label_maps import CITYSCAPES_LABELS

        labels = [label for label in CITYSCAPES_LABELS if label.id >= 0]
        to_id = {}
        for c in range(len(CLASS_NAMES)):
            ids = [label.id for label in labels if label.train_id == c]
            if not ids:
                raise ValueError(f"Cityscapes has no labelId of trainId {c}")
            to_id[c] = min(ids)
        by_id = {label.id: label for label in labels}
        for i in CITYSCAPES_IGNORE_IDS:  # the label table and this module must agree
            if not by_id[i].ignore_in_eval or by_id[i].train_id in to_id:
                raise ValueError(f"Cityscapes labelId {i} is evaluated: not an ignore id")
        self.lut = _lut(to_id, fill=0)
        self.colours = np.zeros((256, 3), np.uint8)
        for label in labels:
            self.colours[label.id] = label.color
        self.ignore_ids = np.array(CITYSCAPES_IGNORE_IDS, np.uint8)

    def label_ids(self, item: WorldItem) -> np.ndarray:
        """The labelIds mask: classes by `lut`; ignore pixels cycle through the ignore ids along diagonals."""
        h, w = item.mask.shape
        yy, xx = np.mgrid[0:h, 0:w]
        cycle = self.ignore_ids[(yy + xx + item.index) % len(self.ignore_ids)]
        return np.where(item.mask == IGNORE_INDEX, cycle, self.lut[item.mask]).astype(np.uint8)

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        cities = self.cities[split]
        block = max(1, -(-self.counts[split] // len(cities)))  # contiguous blocks of scenes, cities in order
        for item in items:
            city = cities[min(item.index // block, len(cities) - 1)]
            stem = f"{city}_000000_{item.index:06d}"
            _save_png(item.image, self.root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", "RGB")
            ids = self.label_ids(item)
            gt = self.root / "gtFine" / split / city
            _save_png(ids, gt / f"{stem}_gtFine_labelIds.png", "L")
            _save_png(self.colours[ids], gt / f"{stem}_gtFine_color.png", "RGB")


@_register
class VOCWriter(LayoutWriter):
    """VOC2012: JPEGImages, palette SegmentationClass masks (255 = boundary), ImageSets/Segmentation lists.

    The world's test split is listed in ``test.txt`` and has its masks here; real VOC test masks are private."""

    name = "voc"
    owned = ("JPEGImages", "SegmentationClass", "ImageSets")

    def __init__(self, root: Path, counts: dict[str, int], progress: bool = False):
        super().__init__(root, counts, progress)
        from difffeat.data.label_maps import voc_palette

        self.palette = list(voc_palette())
        self.offsets = _split_offsets(counts)
        self.lists: dict[str, list[str]] = {}

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        stems = self.lists.setdefault(split, [])
        for item in items:
            stem = f"2012_{self.offsets[split] + item.index + 1:06d}"
            _save_jpeg(item, self.root / "JPEGImages" / f"{stem}.jpg")
            _save_png(item.mask, self.root / "SegmentationClass" / f"{stem}.png", "P", self.palette)
            stems.append(stem)

    def finish(self) -> None:
        folder = self.root / "ImageSets" / "Segmentation"
        folder.mkdir(parents=True, exist_ok=True)
        lists = {**self.lists, "trainval": self.lists.get("train", []) + self.lists.get("val", [])}
        for name, stems in lists.items():
            (folder / f"{name}.txt").write_text("".join(f"{s}\n" for s in stems))


@_register
class COCOStuffWriter(LayoutWriter):
    """COCO-Stuff-164k stuffthingmaps: JPEG images, 'L' raw ids (0–181, 255 unlabeled); class c is the c-th
    raw id in use (so the 171-class train-id conversion gives c back)."""

    name = "coco-stuff"
    owned = ("images", "annotations")
    splits = {"train": "train2017", "val": "val2017"}

    def __init__(self, root: Path, counts: dict[str, int], progress: bool = False):
        super().__init__(root, counts, progress)
        self.lut = _lut(self.raw_ids(), fill=IGNORE_INDEX)
        self.offsets = _split_offsets(counts)

    @staticmethod
    def used_raw_ids() -> list[int]:
        from difffeat.data.label_maps import COCO_STUFF_UNUSED

        return sorted(set(range(182)) - set(COCO_STUFF_UNUSED))

    def raw_ids(self) -> dict[int, int]:
        used = self.used_raw_ids()
        return {c: used[c] for c in range(len(CLASS_NAMES))}

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        folder = self.splits[split]
        for item in items:
            stem = f"{self.offsets[split] + item.index + 1:012d}"
            _save_jpeg(item, self.root / "images" / folder / f"{stem}.jpg")
            _save_png(self.lut[item.mask], self.root / "annotations" / folder / f"{stem}.png", "L")


@_register
class COCOStuff27Writer(COCOStuffWriter):
    """The COCO-Stuff tree whose raw ids fold to class c under COCO-Stuff-27's fine-to-coarse map."""

    name = "coco-stuff-27"

    def raw_ids(self) -> dict[int, int]:
        from difffeat.data.label_maps import COCO_STUFF_FINE_TO_COARSE

        used = self.used_raw_ids()
        return {c: min(r for r in used if COCO_STUFF_FINE_TO_COARSE[r] == c) for c in range(len(CLASS_NAMES))}


@_register
class DDPMSegWriter(LayoutWriter):
    """ddpm-segmentation's few-shot sets: real/{train,test}/<stem>.png + <stem>.npy (uint8 ids, 255 ignore)."""

    name = "ddpm-seg"
    owned = ("real",)
    splits = {"train": "train", "val": "test"}
    default_sizes = "square"

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        folder = self.root / "real" / self.splits[split]
        folder.mkdir(parents=True)
        for item in items:
            _save_png(item.image, folder / f"{item.index:06d}.png", "RGB")
            np.save(folder / f"{item.index:06d}.npy", item.mask.astype(np.uint8))


@_register
class HFParquetWriter(LayoutWriter):
    """A local Hugging Face data set as ``scene_parse_150`` ships it: one parquet shard per split."""

    name = "hf"
    owned = ("data",)
    splits = {"train": "train", "val": "validation", "test": "test"}
    lut = _lut({c: c + 1 for c in range(len(CLASS_NAMES))}, fill=0)

    def dataset(self, items: Iterable[WorldItem]):
        """The split's rows as a `datasets.Dataset` (images and annotations as PNG bytes)."""
        import datasets

        features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                      "scene_category": datasets.Value("int64")})
        rows: dict[str, list] = {"image": [], "annotation": [], "scene_category": []}
        for item in items:
            rows["image"].append({"bytes": _png_bytes(item.image, "RGB"), "path": None})
            rows["annotation"].append({"bytes": _png_bytes(self.lut[item.mask], "L"), "path": None})
            rows["scene_category"].append(0)
        return datasets.Dataset.from_dict(rows, features=features)

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        file = self.root / "data" / f"{self.splits[split]}-00000-of-00001.parquet"
        file.parent.mkdir(parents=True, exist_ok=True)
        dataset = self.dataset(items)
        with _datasets_bars(self.progress):
            dataset.to_parquet(str(file))


@_register
class HFDiskWriter(HFParquetWriter):
    """The rows of `hf` as a ``DatasetDict.save_to_disk`` folder."""

    name = "hf-disk"
    owned = ("dataset_dict.json", "train", "validation", "test")

    def __init__(self, root: Path, counts: dict[str, int], progress: bool = False):
        super().__init__(root, counts, progress)
        self.parts = {}

    def write_split(self, split: str, items: Iterable[WorldItem]) -> None:
        self.parts[self.splits[split]] = self.dataset(items)

    def finish(self) -> None:
        import datasets

        with _datasets_bars(self.progress):
            datasets.DatasetDict(self.parts).save_to_disk(str(self.root))


# ------------------------------------------------------------------------------------------------ writing
def _writer_class(layout: str) -> type[LayoutWriter]:
    try:
        return LAYOUT_WRITERS[layout]
    except KeyError:
        raise UserError(f"--layout must be one of {', '.join(LAYOUT_WRITERS)}, got {layout!r}") from None


def _previous_owned(out: Path) -> tuple[str, ...]:
    """The top-level names a layout set already in `out` wrote (its layout's), for ``overwrite`` to remove."""
    try:
        saved = json.loads((out / CLASSES).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return ()
    if not isinstance(saved, dict) or saved.get("format") != RUN_FORMAT or saved.get("kind") != KIND:
        return ()
    layout = (saved.get("config") or {}).get("layout")
    return LAYOUT_WRITERS[layout].owned if layout in LAYOUT_WRITERS else ()


def synthesize_layout(out: str | os.PathLike, layout: str, n: int = 1000, seed: int = 0, imbalance: float = 100.0,
                      sizes: str | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the Shapes-LT world of `n` scenes to `out` in the native layout `layout` (see the module docstring and
    `LAYOUT_WRITERS`) and return its path.

    `sizes` is "mixed", "square" or "native" (default: the layout's, "square" for ddpm-seg, else "mixed").
    Like `synthesize`: the files are written to a temporary folder inside `out` and moved into place, and
    ``classes.json`` (the marker) is written last.
    """
    out = Path(out)
    cls = _writer_class(layout)
    sizes = cls.default_sizes if sizes is None else sizes
    if sizes not in SIZE_CYCLES:
        raise UserError(f"--sizes must be one of {', '.join(SIZE_CYCLES)}, got {sizes!r}")
    counts = split_sizes(n)
    label_profile(imbalance)  # a bad ratio fails before the folder is touched
    world_config = {"n": int(n), "seed": int(seed), "imbalance": float(imbalance), "sizes": sizes}
    config = {**world_config, "splits": counts, "layout": layout}
    owned = tuple(dict.fromkeys((*cls.owned, *(_previous_owned(out) if overwrite else ()))))
    folder = RunFolder(out, KIND, config, resume=True, overwrite=overwrite, owned=owned, marker=CLASSES)
    if folder.continuing and "names" in (folder.saved() or {}):
        raise UserError(f"{out}: holds this {layout} set already; replace it (--overwrite) or choose another folder")
    folder.create()  # the marker first: a set cut short is still recognised as difffeat's own
    with staged(out, f"synth-{layout}", f"{layout} set", owned=cls.owned) as tmp:
        classes = _write_world(cls(tmp, counts, progress), n, seed, imbalance, sizes, progress)
    # Deterministic (no time stamp, no versions): the same arguments give the same classes.json.
    folder.write_json(CLASSES, {"format": RUN_FORMAT, "kind": KIND, "config": config,
                                "config_hash": folder.config_hash, **classes, "layout": layout,
                                "world": world_config})
    return out


def _write_world(writer: LayoutWriter, n: int, seed: int, imbalance: float, sizes: str, progress: bool) -> dict:
    """Every split the layout writes; returns the class table, counted on the world's train masks."""
    from tqdm.auto import tqdm

    k = len(CLASS_NAMES)
    pixel_counts = np.zeros(k, np.int64)
    label_counts = np.zeros(k, np.int64)
    counts = split_sizes(n)
    splits = [s for s in SPLITS if s in writer.splits]
    bar = tqdm(total=sum(counts[s] for s in splits), desc=f"synth {writer.name}", unit="img", disable=not progress)

    def counted(items: Iterator[WorldItem]) -> Iterator[WorldItem]:
        for item in items:
            if item.split == "train":
                pixel_counts[:] += np.bincount(item.mask.ravel(), minlength=256)[:k]
                label_counts[CLASS_ID[item.scene.label]] += 1
            yield item
            bar.update()

    try:
        for split, items in world(n, seed, imbalance, sizes, splits):
            writer.write_split(split, counted(items))
        writer.finish()
    finally:
        bar.close()
    return class_table(pixel_counts, label_counts)


@contextmanager
def _datasets_bars(progress: bool) -> Iterator[None]:
    """`datasets`' own progress bars off within the block unless `progress`; their setting is put back after."""
    import datasets

    if progress or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
