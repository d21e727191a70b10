"""`spair`: SPair-71k, semantic correspondence between image pairs of one category.

    ROOT/JPEGImages/<category>/<name>.jpg
    ROOT/PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json
    ROOT/ImageAnnotation/<category>/<name>.json    (not read)

A pair annotation holds ``src_imname``/``trg_imname`` (file names in ``JPEGImages/<category>/``), ``src_imsize``/
``trg_imsize`` as **[W, H, C]**, ``src_bndbox``/``trg_bndbox`` as **[x1, y1, x2, y2]**, ``category``, and the
index-aligned ``src_kps``/``trg_kps`` ([x, y] in pixels of the image as stored) with their ``kps_ids``; the
variation flags (mirror, viewpoint_variation, …) are not read. Keypoint coordinates are pixel indices (SPair's
integer keypoints; DIFT reads the feature at ``[y, x]``): a keypoint is *valid* when both images give it, as
numbers with ``0 ≤ x ≤ W − 1`` and ``0 ≤ y ≤ H − 1``. A null keypoint, a negative one or one outside its image is
kept as NaN, and the pair's `valid` mask says which points count.

The split's samples are the images its pairs use (keys ``JPEGImages/<category>/<name>.jpg``, no masks), so
``difffeat extract spair:ROOT:test`` extracts exactly them; `SpairLayout.pairs` lists the pairs. Each image's
metadata row has its category as ``label`` (``--prompt-from label`` gives DIFT's "a photo of a {category}").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difffeat.data.layouts.base import INVALID, Layout, Sample, files_in, register_layout, subfolders
from difffeat.errors import UserError
from difffeat.spine.run import confine_name

IMAGES = "JPEGImages"
PAIRS = "PairAnnotation"
SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
                    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")


@dataclass(frozen=True, eq=False)
class PairSample:
    """One annotated image pair: the source and target image keys, sizes, boxes and index-aligned keypoints."""

    key: str  # the annotation file's stem, e.g. "000001-2008_000585-2008_004373:aeroplane"
    split: str
    category: str
    source: str  # image key of the source image (as in `SpairLayout.samples`)
    target: str
    source_size: tuple[int, int]  # (H, W), from src_imsize [W, H, C]
    target_size: tuple[int, int]
    source_points: np.ndarray  # [N, 2] float64 (x, y) in source pixels; NaN where not given or outside the image
    target_points: np.ndarray  # [N, 2] float64
    valid: np.ndarray  # [N] bool: a usable keypoint (given and inside both images)
    source_bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 (src_bndbox)
    target_bbox: tuple[float, float, float, float]
    point_ids: tuple  # kps_ids, as written (SPair writes strings)


def read_pair(file: str | Path, split: str, root: str | Path) -> PairSample:
    """The pair annotation `file` of `split` under the data-set root `root`; one UserError line naming the file and
    the field for a missing or malformed field."""
    file = Path(file)
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{file}: unreadable pair annotation ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: a pair annotation is a JSON object, got {type(data).__name__}")

    def field(name: str):
        if name not in data:
            raise UserError(f"{file}: pair annotation has no field {name!r}")
        return data[name]

    category = field("category")
    if not isinstance(category, str) or not category or "/" in category or category in (".", ".."):
        raise UserError(f"{file}: field 'category' must be a category name, got {category!r}")
    keys, sizes = {}, {}
    for side in ("src", "trg"):
        name = field(f"{side}_imname")
        if not isinstance(name, str) or not name:
            raise UserError(f"{file}: field '{side}_imname' must be an image file name, got {name!r}")
        image = confine_name(root, f"{IMAGES}/{category}/{name}", what=f"{file}: {side}_imname")
        keys[side] = image.relative_to(root).as_posix()
        sizes[side] = _imsize(field(f"{side}_imsize"), file, f"{side}_imsize")
    boxes = {side: _bbox(field(f"{side}_bndbox"), file, f"{side}_bndbox") for side in ("src", "trg")}
    points = {side: _points(field(f"{side}_kps"), file, f"{side}_kps", sizes[side]) for side in ("src", "trg")}
    if len(points["src"]) != len(points["trg"]):
        raise UserError(f"{file}: src_kps has {len(points['src'])} keypoints but trg_kps {len(points['trg'])}")
    ids = data.get("kps_ids", list(range(len(points["src"]))))
    if not isinstance(ids, list) or len(ids) != len(points["src"]):
        raise UserError(f"{file}: field 'kps_ids' must list one id per keypoint ({len(points['src'])})")
    valid = ~np.isnan(points["src"]).any(axis=1) & ~np.isnan(points["trg"]).any(axis=1)
    return PairSample(key=file.stem, split=split, category=category, source=keys["src"], target=keys["trg"],
                      source_size=sizes["src"], target_size=sizes["trg"], source_points=points["src"],
                      target_points=points["trg"], valid=valid, source_bbox=boxes["src"], target_bbox=boxes["trg"],
                      point_ids=tuple(ids))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _imsize(value, file: Path, name: str) -> tuple[int, int]:
    """(H, W) of an imsize [W, H, C]."""
    if not isinstance(value, list) or len(value) < 2 or not all(_number(v) and v >= 1 for v in value[:2]):
        raise UserError(f"{file}: field {name!r} must be [W, H, C] in pixels, got {json.dumps(value)[:60]}")
    return int(value[1]), int(value[0])


def _bbox(value, file: Path, name: str) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4 or not all(_number(v) for v in value):
        raise UserError(f"{file}: field {name!r} must be [x1, y1, x2, y2], got {json.dumps(value)[:60]}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if x2 < x1 or y2 < y1:
        raise UserError(f"{file}: field {name!r} must be [x1, y1, x2, y2] with x1 ≤ x2 and y1 ≤ y2, got {value}")
    return x1, y1, x2, y2


def _points(value, file: Path, name: str, size: tuple[int, int]) -> np.ndarray:
    """[N, 2] (x, y); NaN rows for null, negative, non-numeric-null or outside-the-image keypoints."""
    if not isinstance(value, list):
        raise UserError(f"{file}: field {name!r} must be a list of [x, y] or null, got {json.dumps(value)[:60]}")
    h, w = size
    out = np.full((len(value), 2), np.nan)
    for i, point in enumerate(value):
        if point is None:
            continue
        if not isinstance(point, list) or len(point) < 2 or not all(v is None or _number(v) for v in point[:2]):
            raise UserError(f"{file}: field {name!r}: keypoint {i} must be [x, y] or null, got {json.dumps(point)}")
        x, y = point[:2]
        if x is not None and y is not None and 0 <= x <= w - 1 and 0 <= y <= h - 1:
            out[i] = x, y
    return out


@register_layout
class SpairLayout(Layout):
    name = "spair"
    split_aliases = {"train": "trn", "training": "trn", "validation": "val"}
    class_names = SPAIR_CATEGORIES
    label_rule = "no masks: keypoint pairs (PairAnnotation)"

    def __init__(self, root, split=None, names=None):
        self.rows: dict[str, dict] = {}  # image key → {"label": category}: what --prompt-from label reads
        self._pairs: dict[str, list[PairSample]] = {}
        super().__init__(root, split, names)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / IMAGES).is_dir() and (root / PAIRS).is_dir()

    @classmethod
    def canonical_lut(cls) -> np.ndarray:
        return np.full(256, INVALID, np.int16)  # no masks: no mask's values fit this layout

    def splits(self) -> list[str]:
        return subfolders(self.root / PAIRS)

    def read_split(self, split: str) -> list[PairSample]:
        """Every pair annotation of `split` (read once), in file-name order."""
        if split not in self._pairs:
            root = self.root
            self._pairs[split] = [read_pair(f, split, root) for f in files_in(root / PAIRS / split, ".json")]
        return self._pairs[split]

    def find(self, split: str) -> list[Sample]:
        samples: dict[str, Sample] = {}
        for pair in self.read_split(split):
            for key in (pair.source, pair.target):
                if key in samples:
                    continue
                image = self.root / key
                if not image.is_file():
                    raise UserError(f"{self.root / PAIRS / split / pair.key}.json: names image {key}, but {image} "
                                    "does not exist")
                samples[key] = Sample(key=key, split=split, image=image)
                self.rows[key] = {"label": pair.category, "category": pair.category}
        return list(samples.values())

    # ------------------------------------------------------------------------------------------------ pairs
    def pairs(self) -> list[PairSample]:
        """The pairs of the split (every split when none was named), sorted by key."""
        self.samples  # noqa: B018 (resolves the split name and checks every pair's images)
        chosen = [self.split] if self.split is not None else self.splits()
        return sorted((p for s in chosen for p in self.read_split(s)), key=lambda p: (p.key, p.split))

    def pair(self, key: str) -> PairSample | None:
        """The pair whose annotation file's stem is `key` (in the split), or None."""
        if not hasattr(self, "_pair_by_key"):
            self._pair_by_key = {p.key: p for p in self.pairs()}
        return self._pair_by_key.get(key)

    def category(self, key: str) -> str:
        """The category of an image key (``JPEGImages/<category>/<name>``) or a pair key (``…:<category>``)."""
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == IMAGES:
            return parts[1]
        if "/" not in key and ":" in key:
            return key.rpartition(":")[2]
        raise UserError(f"{key}: neither an image key ({IMAGES}/<category>/<name>) nor a pair key of layout spair")

    def categories(self) -> list[str]:
        """The categories of the split's pairs, in the order of the layout's class names (then by name)."""
        order = {n: i for i, n in enumerate(self.names)}
        return sorted({p.category for p in self.pairs()}, key=lambda c: (order.get(c, len(order)), c))
