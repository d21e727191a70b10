"""A correspondence world in SPair-71k's layout: pairs of scenes showing the same shape class.

`difffeat data synth OUT --task corr` writes it, so that correspondence (matching, PCK, eval-corr) runs end to end
offline, with true correspondences known exactly:

- **Categories** are the nine Shapes-LT thing classes (`CATEGORIES`). Pair ``i`` of a split shows category
  ``CATEGORIES[i % 9]``; the pairs of a category form a chain over its images (pair ``k`` is image ``k`` → image
  ``k + 1``), so every image but the ends serves in two pairs, and a split of P pairs holds about P + 9 images.
  With ``identical`` every pair's target is its source image (a matcher's sanity check: PCK 1).
- **An image** (``render_image``: its own generator, seeded by seed, split, category and index) shows one *main*
  object of the category: its own colour (`THING_COLOURS`), radius 9–15 px at 64 px (scaled by min(H, W) / 64),
  a tilt of ±45° from upright, and a position inside the image; in 15 % of the images it sits on a border and is
  cut (truncation). Up to two smaller objects of other classes and colours lie behind it or, with probability
  0.4 each, in front (occlusion); the background is flat, striped, speckled or a gradient in a muted colour.
  Objects are shaded from 1.0 at their front (the shape's up at zero tilt) to 0.6 at their back, so that the
  orientation of a symmetric shape can be seen and its keypoints told apart.
- **Keypoints** (`KEYPOINTS`: names and positions in the shape's frame, units of its radius) rotate, scale and
  move with the object: id 0 is the centre for every class, then a square's 4 corners, a triangle's 3 vertices,
  a star's 5 tips, a cross's 4 arm tips, a diamond's 4 tips, a hexagon's 6 corners, 4 points at 0°, 90°, 180°
  and 270° for a circle and a ring, a crescent's back and two horns — each set a little inside the shape, so that
  the pixel at a keypoint shows the object (a ring's and a crescent's centre lie in its hole or bite). Coordinates
  are pixel indices (pixel (row i, column j) is the point x = j, y = i); a keypoint is *visible* when
  ``0 ≤ x ≤ W − 1``, ``0 ≤ y ≤ H − 1`` and no object in front covers the pixel ⌊x + 0.5⌋, ⌊y + 0.5⌋; otherwise
  that image's entry is null.
- **Files** (SPair's names and conventions; ``<name>`` is ``<split>_<5 digits>``, numbered per category):
  ``JPEGImages/<category>/<name>.jpg`` (JPEG quality 95, no chroma subsampling),
  ``PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json`` (``pair_id`` numbered from 1 over
  trn, val, test; fields pair_id, src_imname, trg_imname, src_imsize/trg_imsize [W, H, 3], src_bndbox/trg_bndbox
  [x1, y1, x2, y2] (the pixel indices of the whole shape inside the image: truncation shrinks it, occlusion does
  not), category, src_kps/trg_kps (every keypoint of the class, [x, y] rounded to 0.01 px or null), kps_ids
  (strings, as SPair), and the flags mirror (0: no reflections), viewpoint_variation (tilts differ by > 30°),
  scale_variation (radii differ by > 1.25×), truncation and occlusion (either image) as 0/1),
  ``ImageAnnotation/<category>/<name>.json`` (filename, image_width, image_height, image_depth, category,
  bndbox, kps {id: [x, y] or null}, truncated, occluded, and the object's colour, tilt and radius), and
  ``classes.json``: the marker of the spine's run folder (kind "shapes-lt-corr") with the category names and
  keypoint names. Splits: 80 / 10 / 10 % of ``n`` pairs as trn / val / test.

Images are 64×64 (``sizes`` "native") unless ``sizes`` is "mixed" or "square" (the size cycles of
`difffeat.data.synth_layouts`, by image index); the scene is drawn at its size, never resized. Like the other
synth writers: a new or empty folder or one such set; the files are written to a temporary folder inside OUT and
moved into place; ``classes.json`` comes last.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from difffeat.data.shapes_lt import CLASSES, STUFF_COLOURS, THING_CLASSES, THING_COLOURS, shape_mask, split_sizes
from difffeat.data.staging import staged
from difffeat.data.synth_layouts import SIZE_CYCLES
from difffeat.errors import UserError
from difffeat.spine.run import RUN_FORMAT, RunFolder

KIND = "shapes-lt-corr"
CATEGORIES = THING_CLASSES
SPLITS = {"train": "trn", "val": "val", "test": "test"}  # the world's split → SPair's folder name
OWNED = ("JPEGImages", "PairAnnotation", "ImageAnnotation")
JPEG_QUALITY = 95
MAIN_RADIUS = (9.0, 15.0)  # px at 64 px
OTHER_RADIUS = (4.0, 8.0)
MAX_TILT = math.radians(45)
TRUNCATE_P = 0.15
IN_FRONT_P = 0.4
N_OTHERS_P = (0.4, 0.4, 0.2)
SHADE_BACK = 0.6  # shade at the back of an object (1.0 at its front)
VIEWPOINT_DEG = 30.0  # viewpoint_variation: tilts differ by more than this
SCALE_RATIO = 1.25  # scale_variation: radii differ by more than this factor
BACKGROUNDS = ("flat", "stripes", "speckles", "gradient")


def _ring(n: int, d: float, names: tuple[str, ...], start: float = 0.0) -> tuple[tuple[str, float, float], ...]:
    """`n` points at distance `d` (radii) and angles ``start + k·360°/n`` in the shape frame (0° = front)."""
    return tuple((names[k], d * math.cos(start + 2 * math.pi * k / n), d * math.sin(start + 2 * math.pi * k / n))
                 for k in range(n))


_SIDES4 = ("front", "right", "back", "left")
# Per class: (name, u, v) in the shape's frame, in units of its radius; u = the shape's front (up at zero tilt),
# v = its right. Id = index. Each point lies ≥ 0.15 radius inside the shape (centres of ring and crescent excepted).
KEYPOINTS: dict[str, tuple[tuple[str, float, float], ...]] = {
    "circle": (("centre", 0.0, 0.0), *_ring(4, 0.65, _SIDES4)),
    "square": (("centre", 0.0, 0.0), ("front-left", 0.6, -0.6), ("front-right", 0.6, 0.6),
               ("back-right", -0.6, 0.6), ("back-left", -0.6, -0.6)),
    # the triangle has an edge at its front and a vertex at its back (Shapes-LT's triangle)
    "triangle": (("centre", 0.0, 0.0), *_ring(3, 0.65, ("back", "front-left", "front-right"), math.pi)),
    "star": (("centre", 0.0, 0.0), *_ring(5, 0.6, ("tip-front", "tip-front-right", "tip-back-right",
                                                         "tip-back-left", "tip-front-left"))),
    "ring": (("centre", 0.0, 0.0), *_ring(4, 0.775, _SIDES4)),
    "cross": (("centre", 0.0, 0.0), *_ring(4, 0.8, _SIDES4)),
    "diamond": (("centre", 0.0, 0.0), *_ring(4, 0.7, _SIDES4)),
    "hexagon": (("centre", 0.0, 0.0), *_ring(6, 0.7, ("front", "front-right", "back-right", "back", "back-left",
                                                      "front-left"))),
    "crescent": (("centre", 0.0, 0.0), ("back", -0.8, 0.0),
                 ("horn-right", 0.85 * math.cos(math.radians(105)), 0.85 * math.sin(math.radians(105))),
                 ("horn-left", 0.85 * math.cos(math.radians(105)), -0.85 * math.sin(math.radians(105)))),
}
OFF_BODY = {("ring", 0), ("crescent", 0)}  # keypoints in a hole or bite: their pixel shows what lies behind


# ------------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class CorrObject:
    """One object of an image: class, colour, centre (continuous coordinates), radius, and the direction of its
    front (`angle`, radians, image axes: x right, y down)."""

    cls: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float

    @property
    def tilt(self) -> float:
        """Rotation from upright (front pointing up), radians."""
        return (self.angle + math.pi / 2 + math.pi) % (2 * math.pi) - math.pi

    def keypoints(self) -> np.ndarray:
        """[K, 2] (x, y) pixel indices of the class's keypoints (`KEYPOINTS`), wherever they fall."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        uv = np.array([(u, v) for _, u, v in KEYPOINTS[self.cls]]) * self.radius
        x = self.cx + c * uv[:, 0] - s * uv[:, 1]
        y = self.cy + s * uv[:, 0] + c * uv[:, 1]
        return np.stack([x, y], axis=1) - 0.5

    def mask(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return shape_mask(self.cls, self.cx, self.cy, self.radius, self.angle, xx, yy)

    def shade(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """1.0 at the front, `SHADE_BACK` at the back, linear along the front direction."""
        u = (math.cos(self.angle) * (xx - self.cx) + math.sin(self.angle) * (yy - self.cy)) / self.radius
        return SHADE_BACK + (1 - SHADE_BACK) * (np.clip(u, -1, 1) + 1) / 2


@dataclass(frozen=True)
class CorrImage:
    """One image of the world: its pixels, its objects, and its main object's keypoints and box."""

    split: str  # the world's split (train, val, test)
    category: str
    index: int
    name: str  # file name in JPEGImages/<category>/
    image: np.ndarray  # [H, W, 3] uint8, as drawn (before JPEG)
    main: CorrObject
    behind: tuple[CorrObject, ...]
    in_front: tuple[CorrObject, ...]
    keypoints: np.ndarray  # [K, 2] pixel indices (x, y) of every keypoint, wherever it falls
    visible: np.ndarray  # [K] bool (the module's visibility rule)
    bbox: tuple[int, int, int, int]  # x1, y1, x2, y2: pixel indices of the main object's whole shape in the image
    truncated: bool  # the main object is cut by the border
    occluded: bool  # an object in front covers part of it

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    @property
    def stem(self) -> str:
        return Path(self.name).stem


def image_name(split: str, index: int) -> str:
    return f"{SPLITS[split]}_{index:05d}.jpg"


def image_rng(seed: int, split: str, category: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, list(SPLITS).index(split), CATEGORIES.index(category), index, 71])


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    h, w = xx.shape
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colour = np.array(list(STUFF_COLOURS.values())[rng.integers(len(STUFF_COLOURS))], np.float64)
    if kind == "flat":
        base = rng.uniform(15, 70) + rng.uniform(-8, 8, size=3)
        return np.broadcast_to(base, (h, w, 3)) + rng.normal(0, 3, size=(h, w, 3))
    if kind == "stripes":
        a, period = rng.uniform(0, math.pi), rng.uniform(5.0, 9.0)
        on = np.sin(2 * math.pi * (math.cos(a) * xx + math.sin(a) * yy) / period) > 0
        return np.where(on[..., None], colour, 0.45 * colour)
    if kind == "speckles":
        return colour + rng.normal(0, 22, size=(h, w, 3))
    a = rng.uniform(0, 2 * math.pi)
    t = (math.cos(a) * (xx - w / 2) + math.sin(a) * (yy - h / 2)) / max(h, w) + 0.5
    return colour * (0.35 + 1.1 * t[..., None])


def render_image(seed: int, split: str, category: str, index: int, size: tuple[int, int] = (64, 64)) -> CorrImage:
    """The image `index` of `category` in `split` at `size` (H, W) (see the module docstring)."""
    rng = image_rng(seed, split, category, index)
    h, w = size
    scale = min(h, w) / 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    image = _background(rng, xx, yy)

    r = rng.uniform(*MAIN_RADIUS) * scale
    angle = -math.pi / 2 + rng.uniform(-MAX_TILT, MAX_TILT)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    if rng.random() < TRUNCATE_P:  # on a border: the centre 0.25–0.75 radii from it
        side, depth = rng.integers(4), rng.uniform(0.25, 0.75) * r
        cx, cy = [(depth, cy), (w - depth, cy), (cx, depth), (cx, h - depth)][side]
    colours = list(THING_COLOURS)
    colour = colours[rng.integers(len(colours))]
    main = CorrObject(category, colour, float(cx), float(cy), float(r), float(angle))

    behind, in_front = [], []
    others = [c for c in CATEGORIES if c != category]
    other_colours = [c for c in colours if c != colour]
    for _ in range(rng.choice(3, p=N_OTHERS_P)):
        ro = rng.uniform(*OTHER_RADIUS) * scale
        obj = CorrObject(others[rng.integers(len(others))], other_colours[rng.integers(len(other_colours))],
                         float(rng.uniform(0.8 * ro, w - 0.8 * ro)), float(rng.uniform(0.8 * ro, h - 0.8 * ro)),
                         float(ro), float(rng.uniform(0, 2 * math.pi)))
        (in_front if rng.random() < IN_FRONT_P else behind).append(obj)

    front = np.zeros((h, w), bool)  # pixels an object in front of the main one covers
    main_mask = main.mask(xx, yy)
    for obj, is_front in [*((o, False) for o in behind), (main, False), *((o, True) for o in in_front)]:
        shape = main_mask if obj is main else obj.mask(xx, yy)
        tint = np.array(THING_COLOURS[obj.colour], np.float64)
        shade = obj.shade(xx, yy)[..., None] * (1 + rng.normal(0, 0.03, size=(h, w, 1)))
        image[shape] = (tint * shade)[shape]
        if is_front:
            front |= shape

    points = main.keypoints()
    inside = (points[:, 0] >= 0) & (points[:, 0] <= w - 1) & (points[:, 1] >= 0) & (points[:, 1] <= h - 1)
    cols = np.clip(np.floor(points[:, 0] + 0.5), 0, w - 1).astype(int)
    rows = np.clip(np.floor(points[:, 1] + 0.5), 0, h - 1).astype(int)
    visible = inside & ~front[rows, cols]

    # The whole shape on a grid padded past the border tells whether the border cuts it.
    pad = int(math.ceil(1.2 * r)) + 1
    pyy, pxx = np.mgrid[-pad:h + pad, -pad:w + pad].astype(np.float64) + 0.5
    truncated = bool(main.mask(pxx, pyy).sum() > main_mask.sum())
    ys, xs = np.nonzero(main_mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return CorrImage(split, category, index, image_name(split, index), np.clip(image, 0, 255).astype(np.uint8),
                     main, tuple(behind), tuple(in_front), points, visible, bbox, truncated,
                     bool((main_mask & front).any()))


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- annotations
def _kps(img: CorrImage) -> list:
    return [[round(float(x), 2), round(float(y), 2)] if ok else None for (x, y), ok in zip(img.keypoints, img.visible)]


def pair_annotation(pair_id: int, source: CorrImage, target: CorrImage) -> dict:
    """The pair's annotation in SPair's fields and conventions (see the module docstring)."""
    tilt = abs(math.degrees((source.main.tilt - target.main.tilt + math.pi) % (2 * math.pi) - math.pi))
    ratio = max(source.main.radius, target.main.radius) / min(source.main.radius, target.main.radius)
    return {
        "pair_id": pair_id,
        "src_imname": source.name,
        "trg_imname": target.name,
        "src_imsize": [source.size[1], source.size[0], 3],
        "trg_imsize": [target.size[1], target.size[0], 3],
        "src_bndbox": list(source.bbox),
        "trg_bndbox": list(target.bbox),
        "category": source.category,
        "src_kps": _kps(source),
        "trg_kps": _kps(target),
        "kps_ids": [str(i) for i in range(len(KEYPOINTS[source.category]))],
        "mirror": 0,
        "viewpoint_variation": int(tilt > VIEWPOINT_DEG),
        "scale_variation": int(ratio > SCALE_RATIO),
        "truncation": int(source.truncated or target.truncated),
        "occlusion": int(source.occluded or target.occluded),
    }


def image_annotation(img: CorrImage) -> dict:
    """The image's own annotation (SPair's ImageAnnotation fields, and the object's colour, tilt and radius)."""
    return {
        "filename": img.name,
        "image_width": img.size[1],
        "image_height": img.size[0],
        "image_depth": 3,
        "category": img.category,
        "bndbox": list(img.bbox),
        "kps": {str(i): kp for i, kp in enumerate(_kps(img))},
        "truncated": int(img.truncated),
        "occluded": int(img.occluded),
        "colour": img.main.colour,
        "tilt": round(math.degrees(img.main.tilt), 3),
        "radius": round(img.main.radius, 3),
    }


def pair_stem(pair_id: int, source: CorrImage, target: CorrImage) -> str:
    return f"{pair_id:06d}-{source.stem}-{target.stem}:{source.category}"


def world_split(split: str, pairs: int, seed: int = 0, sizes: str = "native", identical: bool = False):
    """The split's images (by (category, index)) and its pairs as (category, source index, target index)."""
    cycle = SIZE_CYCLES[sizes]
    plan = [(CATEGORIES[i % len(CATEGORIES)], i // len(CATEGORIES)) for i in range(pairs)]
    plan = [(c, k, k if identical else k + 1) for c, k in plan]
    needed = sorted({(c, j) for c, a, b in plan for j in (a, b)}, key=lambda t: (CATEGORIES.index(t[0]), t[1]))
    images = {(c, j): render_image(seed, split, c, j, cycle[j % len(cycle)]) for c, j in needed}
    return images, plan


# ------------------------------------------------------------------------------------------------ writing
def synthesize_corr(out: str | os.PathLike, n: int = 200, seed: int = 0, sizes: str = "native",
                    identical: bool = False, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the correspondence world of `n` pairs to `out` in SPair-71k's layout (see the module docstring) and
    return its path."""
    from tqdm.auto import tqdm

    out = Path(out)
    if sizes not in SIZE_CYCLES:
        raise UserError(f"--sizes must be one of {', '.join(SIZE_CYCLES)}, got {sizes!r}")
    counts = split_sizes(n)  # pairs per world split: 80 / 10 / 10 %
    config = {"n": int(n), "seed": int(seed), "sizes": sizes, "identical": bool(identical),
              "splits": {SPLITS[s]: c for s, c in counts.items()}, "layout": "spair"}
    folder = RunFolder(out, KIND, config, resume=True, overwrite=overwrite, owned=OWNED, marker=CLASSES)
    if folder.continuing and "names" in (folder.saved() or {}):
        raise UserError(f"{out}: holds this correspondence set already; replace it (--overwrite) or choose another "
                        "folder")
    folder.create()  # the marker first: a set cut short is still recognised as difffeat's own
    images_written = {}
    bar = tqdm(total=n, desc="synth corr", unit="pair", disable=not progress)
    try:
        with staged(out, "synth-spair", "correspondence set", owned=OWNED) as tmp:
            pair_id = 0
            for split, count in counts.items():
                images, plan = world_split(split, count, seed, sizes, identical)
                for img in images.values():
                    folder_img = tmp / "JPEGImages" / img.category
                    folder_img.mkdir(parents=True, exist_ok=True)
                    (folder_img / img.name).write_bytes(jpeg_bytes(img.image))
                    _write_json(tmp / "ImageAnnotation" / img.category / f"{img.stem}.json", image_annotation(img))
                images_written[SPLITS[split]] = len(images)
                pairs_dir = tmp / "PairAnnotation" / SPLITS[split]
                pairs_dir.mkdir(parents=True)
                for category, a, b in plan:
                    pair_id += 1
                    source, target = images[category, a], images[category, b]
                    _write_json(pairs_dir / f"{pair_stem(pair_id, source, target)}.json",
                                pair_annotation(pair_id, source, target))
                    bar.update()
    finally:
        bar.close()
    # Deterministic (no time stamp, no versions): the same arguments give the same classes.json.
    folder.write_json(CLASSES, {"format": RUN_FORMAT, "kind": KIND, "config": config,
                                "config_hash": folder.config_hash, "names": list(CATEGORIES), "layout": "spair",
                                "keypoints": {c: [name for name, _, _ in KEYPOINTS[c]] for c in CATEGORIES},
                                "pairs": config["splits"], "images": images_written})
    return out


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) + "\n")
