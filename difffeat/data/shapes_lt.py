"""Shapes-LT: a seeded, long-tailed world of 64×64 scenes with masks, labels and captions.

Every test, example and benchmark of difffeat runs on this data, because no data set can be downloaded
on our machines. A scene is a flat background, up to two textured "stuff" regions (stripes, speckles,
gradient) along an image side, and one to three "thing" objects (shapes in saturated colours) that may
overlap. The scene's *main object* is its image-level label; its class follows an exponential
long-tailed profile with imbalance ratio ``R`` (head class ``R``× as frequent as the tail class), and so
do the extra objects, which makes the per-pixel class frequencies long-tailed too.

Each image is drawn from its own generator seeded by ``(seed, split, index)``: a scene never depends on
how many others are made or in which order, and the splits are fixed.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from difffeat.data.staging import staged
from difffeat.errors import UserError
from difffeat.spine.run import RUN_FORMAT, RunFolder

KIND = "shapes-lt"
CLASSES = "classes.json"  # the class table, and the marker that says difffeat made the folder
SIZE = 64
IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}

BACKGROUND = "background"
STUFF_CLASSES = ("stripes", "speckles", "gradient")
# Thing classes in order of decreasing frequency: the long-tail profile follows this order.
THING_CLASSES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "crescent")
CLASS_NAMES = (BACKGROUND, *STUFF_CLASSES, *THING_CLASSES)
CLASS_ID = {name: i for i, name in enumerate(CLASS_NAMES)}

THING_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "cyan": (40, 210, 210),
    "magenta": (210, 50, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
# Muted colours for stuff, far from the saturated thing colours so that objects stand out.
STUFF_COLOURS = {
    "gray": (120, 120, 120),
    "brown": (120, 85, 55),
    "olive": (110, 115, 50),
    "navy": (45, 55, 100),
    "teal": (50, 105, 100),
}
STUFF_PROBS = (0.55, 0.3, 0.15)  # stripes, speckles, gradient
N_STUFF_PROBS = (0.3, 0.5, 0.2)  # 0, 1 or 2 stuff regions
N_EXTRA_PROBS = (0.35, 0.4, 0.25)  # 0, 1 or 2 objects besides the main one
SIZES = {"small": (4.0, 6.0), "medium": (7.0, 10.0), "large": (11.0, 15.0)}
SIDES = ("top", "bottom", "left", "right")
MIN_VISIBLE = 0.4  # an extra object keeps at least this fraction of its area visible

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def position_name(cx: float, cy: float) -> str:
    """Name of the 3×3 grid cell holding (cx, cy): 'top left', 'top', 'center', 'bottom right', …"""
    row = _ROWS[min(int(cy * 3 / SIZE), 2)]
    col = _COLS[min(int(cx * 3 / SIZE), 2)]
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


def _phrase_at(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


@dataclass
class Thing:
    cls: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float

    @property
    def position(self) -> str:
        return position_name(self.cx, self.cy)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.cls} {_phrase_at(self.position)}"

    def shape(self) -> np.ndarray:
        """Boolean [64, 64] mask of the whole object (before any occlusion)."""
        return shape_mask(self.cls, self.cx, self.cy, self.radius, self.angle)


@dataclass
class Stuff:
    cls: str
    colour: str
    side: str

    def phrase(self) -> str:
        return f"{self.colour} {self.cls} at the {self.side}"


@dataclass
class Scene:
    image: np.ndarray  # [64, 64, 3] uint8
    mask: np.ndarray  # [64, 64] uint8 class ids
    things: list[Thing]  # main object first
    stuff: list[Stuff] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.things[0].cls

    @property
    def coarse_caption(self) -> str:
        return f"a {self.label}"

    @property
    def fine_caption(self) -> str:
        return ", ".join([t.phrase() for t in self.things] + [s.phrase() for s in self.stuff])


def label_profile(imbalance: float) -> np.ndarray:
    """Exponential long-tail profile over thing classes: p_i ∝ R^(-i/(C-1)), so p_0 / p_{C-1} = R."""
    if not imbalance >= 1:  # NaN too
        raise UserError(f"--imbalance must be a number ≥ 1, got {imbalance}")
    i = np.arange(len(THING_CLASSES))
    p = float(imbalance) ** (-i / (len(THING_CLASSES) - 1))
    return p / p.sum()


def caption_vocabulary() -> list[str]:
    """Every word a Shapes-LT caption can contain (the mini model's tokenizer is built from it)."""
    words = {"a", "in", "the", "at", "center", "middle", *CLASS_NAMES, *THING_COLOURS, *STUFF_COLOURS, *SIZES}
    words |= set(SIDES) | set(_ROWS) | set(_COLS)
    return sorted(words)


# ---------------------------------------------------------------------------------------------- shapes
def shape_mask(cls: str, cx: float, cy: float, r: float, angle: float, xx: np.ndarray = _XX,
               yy: np.ndarray = _YY) -> np.ndarray:
    """Whether each point (xx, yy) (continuous coordinates; default: the 64 × 64 scene's pixel centres) lies in
    the thing `cls` of centre (cx, cy), radius `r`, turned by `angle`: Shapes-LT's shapes on any grid (the
    correspondence world draws the same shapes at other sizes)."""
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    rho2 = dx * dx + dy * dy
    if cls == "circle":
        return rho2 <= r * r
    if cls == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if cls == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if cls == "ring":
        return (rho2 <= r * r) & (rho2 >= (0.55 * r) ** 2)
    if cls == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.33 * r) & (b <= r)) | ((b <= 0.33 * r) & (a <= r))
    if cls == "triangle":
        inside = np.ones(np.shape(u), bool)
        for k in range(3):  # three half-planes at 120° whose inscribed radius is r/2
            t = angle + k * 2 * math.pi / 3
            inside &= (math.cos(t) * dx + math.sin(t) * dy) <= 0.5 * r
        return inside
    if cls == "hexagon":
        a, b = np.abs(u), np.abs(v)
        h = r * math.sqrt(3) / 2
        return (b <= h) & (math.sqrt(3) * a + b <= 2 * h)
    if cls == "star":
        return np.sqrt(rho2) <= r * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)))
    if cls == "crescent":
        return (rho2 <= r * r) & ((u - 0.55 * r) ** 2 + v * v > (0.85 * r) ** 2)
    raise ValueError(f"unknown thing class {cls!r}")


def _stuff_region(side: str, depth: float, wave: float, phase: float) -> np.ndarray:
    """Pixels within `depth` of an image side, with a wavy boundary."""
    along, across = (_XX, _YY) if side in ("top", "bottom") else (_YY, _XX)
    dist = across if side in ("top", "left") else SIZE - across
    return dist <= depth + wave * np.sin(2 * math.pi * along / SIZE + phase)


def _stuff_texture(cls: str, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if cls == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(5.0, 9.0)
        on = np.sin(2 * math.pi * (np.cos(a) * _XX + np.sin(a) * _YY) / period) > 0
        return np.where(on[..., None], colour, 0.45 * colour)
    if cls == "speckles":
        return colour + rng.normal(0, 22, size=(SIZE, SIZE, 3))
    if cls == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * (_XX - SIZE / 2) + np.sin(a) * (_YY - SIZE / 2)) / SIZE + 0.5
        return colour * (0.35 + 1.1 * t[..., None])
    raise ValueError(f"unknown stuff class {cls!r}")


def render_scene(rng: np.random.Generator, profile: np.ndarray) -> Scene:
    """Draw one scene; `profile` is the class distribution of things (see `label_profile`)."""
    bg = rng.uniform(15, 70) + rng.uniform(-8, 8, size=3)
    image = np.broadcast_to(bg, (SIZE, SIZE, 3)) + rng.normal(0, 3, size=(SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), np.uint8)

    stuff: list[Stuff] = []
    n_stuff = rng.choice(3, p=N_STUFF_PROBS)
    for side in rng.choice(SIDES, size=n_stuff, replace=False):
        cls = STUFF_CLASSES[rng.choice(len(STUFF_CLASSES), p=STUFF_PROBS)]
        cname = list(STUFF_COLOURS)[rng.integers(len(STUFF_COLOURS))]
        region = _stuff_region(side, rng.uniform(14, 26), rng.uniform(0, 4), rng.uniform(0, 2 * math.pi))
        image[region] = _stuff_texture(cls, np.array(STUFF_COLOURS[cname], np.float64), rng)[region]
        mask[region] = CLASS_ID[cls]
        stuff.append(Stuff(cls, cname, str(side)))
    # A later region may cover an earlier one: name only what stays visible.
    stuff = [s for s in stuff if (mask == CLASS_ID[s.cls]).sum() >= 40]

    def draw_thing(size_names: tuple[str, ...]) -> Thing:
        cls = THING_CLASSES[rng.choice(len(THING_CLASSES), p=profile)]
        size = size_names[rng.integers(len(size_names))]
        r = rng.uniform(*SIZES[size])
        lo, hi = 0.8 * r, SIZE - 0.8 * r
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        colour = list(THING_COLOURS)[rng.integers(len(THING_COLOURS))]
        return Thing(cls, colour, size, float(cx), float(cy), float(r), float(rng.uniform(0, 2 * math.pi)))

    main = draw_thing(("medium", "large"))
    extras = [draw_thing(tuple(SIZES)) for _ in range(rng.choice(3, p=N_EXTRA_PROBS))]
    # Extras first, the main object last so that it is always whole; extras that end up mostly
    # hidden are dropped, so every object a caption names is visible in the mask.
    instance = np.full((SIZE, SIZE), -1, np.int16)
    shapes = []
    for k, thing in enumerate([*extras, main]):
        shape = thing.shape()
        instance[shape] = k
        shapes.append(shape)
    kept = [k for k, shape in enumerate(shapes[:-1]) if (instance == k).sum() >= MIN_VISIBLE * shape.sum()]
    for k in [*kept, len(shapes) - 1]:
        thing = [*extras, main][k]
        visible = instance == k
        shade = rng.uniform(0.8, 1.05) + rng.normal(0, 0.04, size=(SIZE, SIZE, 1))
        image[visible] = (np.array(THING_COLOURS[thing.colour], np.float64) * shade)[visible]
        mask[visible] = CLASS_ID[thing.cls]
    things = [main] + [extras[k] for k in kept]
    return Scene(np.clip(image, 0, 255).astype(np.uint8), mask, things, stuff)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def split_sizes(n: int, splits: tuple[int, int, int] | None = None) -> dict[str, int]:
    """Split sizes for `n` images in all: 80 / 10 / 10, every split non-empty when n ≥ 3; or `splits` as given
    (train, val, test), which must add up to `n` when `n` is given too."""
    if splits is not None:
        sizes = dict(zip(SPLITS, (int(k) for k in splits)))
        if len(splits) != len(SPLITS) or min(sizes.values()) < 1:
            raise UserError(f"--splits needs {len(SPLITS)} positive counts (train val test), got {list(splits)}")
        if n is not None and n != sum(sizes.values()):
            raise UserError(f"--n {n} and --splits {list(splits)} (= {sum(sizes.values())}) disagree; give one")
        return sizes
    if n < 3:
        raise UserError(f"--n must be at least 3 (one image per split), got {n}")
    n_val = max(1, round(n * SPLIT_FRACTIONS["val"]))
    n_test = max(1, round(n * SPLIT_FRACTIONS["test"]))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def generate_scene(seed: int, split: str, index: int, imbalance: float = 100.0) -> Scene:
    """The scene `index` of `split` for `seed`: what `synthesize` writes as `<split>/images/<index>.png`."""
    return render_scene(scene_rng(seed, split, index), label_profile(imbalance))


def iter_scenes(split: str, count: int, seed: int = 0, imbalance: float = 100.0, start: int = 0):
    profile = label_profile(imbalance)
    for i in range(start, start + count):
        yield render_scene(scene_rng(seed, split, i), profile)


def class_table(pixel_counts: np.ndarray, label_counts: np.ndarray) -> dict:
    """The class part of a set's ``classes.json``: names, stuff and things, the ignore index, the training split's
    pixel and image-label counts per class, and the head / middle / tail groups those counts give."""
    names = list(CLASS_NAMES)
    return {
        "names": names,
        "stuff": list(STUFF_CLASSES),
        "things": list(THING_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "train_pixel_counts": pixel_counts.tolist(),
        "train_image_label_counts": label_counts.tolist(),
        "groups": head_middle_tail(names, pixel_counts.tolist()),
    }


def head_middle_tail(names: list[str], pixel_counts: list[int]) -> dict[str, list[str]]:
    """Classes ranked by train pixel count and cut into three near-equal groups (AUCSeg's convention)."""
    order = sorted(range(len(names)), key=lambda i: -pixel_counts[i])
    k = math.ceil(len(order) / 3)
    return {
        "head": [names[i] for i in order[:k]],
        "middle": [names[i] for i in order[k : len(order) - k]],
        "tail": [names[i] for i in order[len(order) - k :]],
    }


def synthesize(out: str | os.PathLike, n: int | None = 1000, seed: int = 0, imbalance: float = 100.0,
               overwrite: bool = False, progress: bool = False,
               splits: tuple[int, int, int] | None = None) -> Path:
    """Write a Shapes-LT data set of `n` images to `out` (format in DESIGN.md) and return its path.

    `out` is a run folder of the spine (kind "shapes-lt") whose marker is `classes.json`: difffeat writes only
    into a new or empty folder or into a Shapes-LT folder it made, and `overwrite` replaces only that set's
    own files (its splits and classes.json), never anything else in the folder. `splits` (train, val, test) sets
    each split's size instead of 80 / 10 / 10 (`n` may then be None): scene `i` of a split is the same in every
    set of one seed, so a larger test split adds scenes and changes none. The scenes are written to a
    temporary folder inside `out` first and moved into place; `classes.json` is written last, so a set
    without its class table is one whose writing was cut short (it is made again on the next call).
    """
    out = Path(out)
    sizes = split_sizes(n, splits)
    n = sum(sizes.values())
    profile = label_profile(imbalance)
    config = {"n": int(n), "seed": int(seed), "imbalance": float(imbalance), "splits": sizes, "size": SIZE}
    folder = RunFolder(out, KIND, config, resume=True, overwrite=overwrite, owned=SPLITS, marker=CLASSES)
    if folder.continuing and "names" in (folder.saved() or {}):
        raise UserError(f"{out}: holds this Shapes-LT set already; replace it (--overwrite) or choose another folder")
    folder.create()  # the marker first: a set cut short is still recognised as difffeat's own
    with staged(out, "shapes-lt", "Shapes-LT set", owned=SPLITS) as tmp:
        classes = _write_scenes(tmp, sizes, seed, profile, progress)
    # Deterministic (no time stamp, no versions): the same seed gives byte-identical folders.
    folder.write_json(CLASSES, {"format": RUN_FORMAT, "kind": KIND, "config": config,
                                "config_hash": folder.config_hash, **classes})
    return out


def _write_scenes(tmp: Path, sizes: dict[str, int], seed: int, profile: np.ndarray, progress: bool) -> dict:
    """The scenes of every split into `tmp`; returns the class table (names, counts, groups)."""
    from tqdm.auto import tqdm

    pixel_counts = np.zeros(len(CLASS_NAMES), np.int64)
    label_counts = np.zeros(len(CLASS_NAMES), np.int64)
    bar = tqdm(total=sum(sizes.values()), desc="synth", unit="img", disable=not progress)
    # PNGs are stored uncompressed (compress_level=0): 12 KB per scene, and 4× faster to write than level 1.
    for split in SPLITS:
        (tmp / split / "images").mkdir(parents=True)
        (tmp / split / "masks").mkdir(parents=True)
        rows = []
        for i in range(sizes[split]):
            scene = render_scene(scene_rng(seed, split, i), profile)
            key = f"{i:06d}"
            Image.fromarray(scene.image, "RGB").save(tmp / split / "images" / f"{key}.png", compress_level=0)
            Image.fromarray(scene.mask, "L").save(tmp / split / "masks" / f"{key}.png", compress_level=0)
            (tmp / split / "images" / f"{key}.txt").write_text(scene.fine_caption + "\n")
            rows.append((f"images/{key}.png", f"masks/{key}.png", scene.label, scene.coarse_caption,
                         scene.fine_caption))
            if split == "train":
                pixel_counts += np.bincount(scene.mask.ravel(), minlength=len(CLASS_NAMES))[: len(CLASS_NAMES)]
                label_counts[CLASS_ID[scene.label]] += 1
            bar.update()
        with open(tmp / split / "metadata.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "mask_file_name", "label", "coarse_caption", "fine_caption"])
            writer.writerows(rows)
    bar.close()
    return class_table(pixel_counts, label_counts)
