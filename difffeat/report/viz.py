"""Pictures of feature maps: the first principal components of the channels shown as RGB.

This is the standard way to look at diffusion features: pixels with similar features get similar
colours, so parts and objects show up as coloured regions. One PCA is fitted over all the maps given,
so colours mean the same thing across images.

`comparison_grid` puts that picture beside the input for a few images of a store: one row per image (the
input, then one PCA tile per variant, layer and timestep), so the point of a technique — features that stay
with the input instead of drifting to what the model imagines — is something one can see. `difffeat viz`
writes it as a PNG.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difffeat.errors import UserError
from difffeat.spine.run import Config, ConfigError, check_new_file, confine, option
from difffeat.utils.atomic import atomic_path

TILE_PX = 128  # a tile's side when --scale is not given: a 16×16 map becomes 8× larger
MAX_DEFAULT_COLUMNS = 12  # beyond this many feature columns the default shows the first layer only
GREY = 200
FOOTNOTE = ("PCA → RGB: one basis per layer, fitted over every variant, timestep and image shown, so colours compare "
            "along a row and down a column. Inputs as the extraction saw them (resized); tiles scaled up "
            "nearest-neighbour.")


def _as_maps(features) -> tuple[list[np.ndarray], bool]:
    single = not isinstance(features, (list, tuple))
    maps = [np.asarray(f, dtype=np.float64) for f in ([features] if single else features)]
    if not maps:
        raise ValueError("pca_rgb needs at least one feature map")
    for f in maps:
        if f.ndim != 3:
            raise ValueError(f"feature maps must be [C, h, w], got shape {f.shape}")
        if f.shape[0] != maps[0].shape[0]:
            raise ValueError(f"feature maps differ in channels: {f.shape[0]} and {maps[0].shape[0]}")
    return maps, single


def pca_rgb(features: np.ndarray | list[np.ndarray], n_components: int = 3) -> np.ndarray | list[np.ndarray]:
    """Project [C, h, w] feature maps on their first principal components; uint8 [h, w, n_components].

    The PCA is fitted over all pixels of all maps; each component is scaled to [0, 255] by its 1st and
    99th percentile over all maps (clipped), and its sign fixed so that its largest-magnitude channel
    loading is positive, which makes the picture deterministic. Returns one array for one map, else a
    list. Components beyond the number of channels are black.
    """
    maps, single = _as_maps(features)
    c = maps[0].shape[0]
    x = np.concatenate([f.reshape(c, -1).T for f in maps])  # [pixels, C]
    x = x - x.mean(axis=0)
    # The SVD of the C×C scatter matrix gives the same axes as that of x, in C×C memory instead of pixels×C.
    _, _, vt = np.linalg.svd(x.T @ x if len(x) > c else x, full_matrices=False)
    k = min(n_components, vt.shape[0])
    axes = vt[:k].T  # [C, k]
    biggest = np.abs(axes).argmax(axis=0)
    axes = axes * np.where(axes[biggest, np.arange(k)] < 0, -1.0, 1.0)
    proj = x @ axes  # [pixels, k]
    lo, hi = np.percentile(proj, [1, 99], axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)  # a constant component maps to 0
    scaled = np.clip((proj - lo) / span, 0, 1) * 255
    scaled = np.concatenate([scaled, np.zeros((len(scaled), n_components - k))], axis=1)
    pixels = np.rint(scaled).astype(np.uint8)

    out, start = [], 0
    for f in maps:
        h, w = f.shape[1:]
        out.append(pixels[start : start + h * w].reshape(h, w, n_components))
        start += h * w
    return out[0] if single else out


def save_pca_image(features: np.ndarray | list[np.ndarray], out_png: str | os.PathLike, scale: int = 4) -> Path:
    """Write the PCA picture of one map, or of several side by side, as a PNG upscaled `scale`×.

    Several maps share one PCA (see `pca_rgb`) and are separated by white gaps; the file is written
    to a temporary name and renamed, so it is never half-written.
    """
    from PIL import Image

    if scale < 1:
        raise ValueError(f"scale must be ≥ 1, got {scale}")
    images = pca_rgb(features, 3)
    images = [images] if isinstance(images, np.ndarray) else images
    images = [im.repeat(scale, axis=0).repeat(scale, axis=1) for im in images]  # nearest neighbour
    gap = scale
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for im in images:
        canvas[: im.shape[0], x : x + im.shape[1]] = im
        x += im.shape[1] + gap
    out = Path(out_png)
    _mkdir(out.parent)
    with atomic_path(out, what="image") as tmp:
        Image.fromarray(canvas, "RGB").save(tmp, format="PNG")
    return out


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create folder ({e.strerror or e})") from None


# ------------------------------------------------------------------------------------- store columns
@dataclass(frozen=True)
class Column:
    """One stored feature map of every image: ``[VARIANT/]LAYER[@T]`` as `difffeat extract` names it."""

    key: str  # the name in the store
    variant: str  # "" for a store without variants
    layer: str
    t: int | None  # None when the manifest does not say
    clean: bool = False  # extracted without noise (`extract --clean`)

    @property
    def title(self) -> str:
        t = "?" if self.t is None else str(self.t)
        return "\n".join(([self.variant] if self.variant else []) + [_shorten(self.layer, 20),
                                                                     f"t = {t}" + (" (clean)" if self.clean else "")])


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def store_columns(store) -> list[Column]:
    """Every stored map of a `FeatureStore`, parsed into variant, layer and timestep."""
    config = store.manifest.get("config") or {}
    timesteps = config.get("timesteps") or []
    single_t = int(timesteps[0]) if len(timesteps) == 1 else None
    variants = set(config.get("variants") or {})
    clean = config.get("noise") is False
    columns = []
    for key in store.layers:
        variant, layer = "", key
        head, sep, tail = key.partition("/")
        if sep and head in variants:
            variant, layer = head, tail
        t = single_t
        m = re.fullmatch(r"(.+)@(\d+)", layer)
        if m:
            layer, t = m[1], int(m[2])
        columns.append(Column(key, variant, layer, t, clean))
    return columns


def _split(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` → ``["a", "b", "c"]``: flags take a comma list, repeated or not."""
    return [v.strip() for item in values or [] for v in str(item).split(",") if v.strip()]


def choose_columns(columns: list[Column], variants: list[str] | None = None, layers: list[str] | None = None,
                   where: str = "store", baseline: tuple[str, ...] = ()) -> list[Column]:
    """The columns to show, in the order asked for: `variants` by name, `layers` as a stored name (with or
    without variant), ``LAYER@T`` or a bare layer (every timestep). Default: everything (the `baseline`
    variants first), or the first layer only when that is more than `MAX_DEFAULT_COLUMNS` columns."""
    variants, layers = _split(variants), _split(layers)
    known_variants = list(dict.fromkeys(c.variant for c in columns))
    if not variants and baseline:  # the variant without techniques first: it is what the others are read against
        columns = sorted(columns, key=lambda c: c.variant not in baseline)
    for v in variants:
        if v not in known_variants:
            raise UserError(f"{where}: no variant {v!r} (variants: {', '.join(x or '(none)' for x in known_variants)})")
    pool = [c for v in variants for c in columns if c.variant == v] if variants else list(columns)
    if layers:
        chosen = []
        for name in layers:
            hits = [c for c in pool if name in (c.key, c.key.partition("/")[2], c.layer, f"{c.layer}@{c.t}")]
            if not hits:
                names = sorted({f"{c.layer}@{c.t}" if c.t is not None else c.layer for c in columns})
                among = f" in variant(s) {', '.join(variants)}" if variants else ""
                raise UserError(f"{where}: no layer {name!r}{among} (layers: {', '.join(names)})")
            chosen += [c for c in hits if c not in chosen]
        pool = chosen
    elif len(pool) > MAX_DEFAULT_COLUMNS:
        first = pool[0].layer
        pool = [c for c in pool if c.layer == first]
    # Variants in the order asked (or stored); within one, each layer's timesteps side by side (stores keep
    # timestep-major order).
    variant_rank = {v: i for i, v in enumerate(dict.fromkeys(c.variant for c in pool))}
    layer_rank = {name: i for i, name in enumerate(dict.fromkeys(c.layer for c in pool))}
    return sorted(pool, key=lambda c: (variant_rank[c.variant], layer_rank[c.layer], c.t if c.t is not None else -1))


# --------------------------------------------------------------------------------------- input images
def input_root(store) -> Path | None:
    """The folder the store's keys are relative to (its manifest's ``images``), where it can still be found:
    as written (relative to the working folder) or relative to the store's parent folder."""
    images = str((store.manifest.get("config") or {}).get("images") or "")
    if not images or images.startswith("hf:"):
        return None
    if any(ch in images for ch in "*?["):  # a glob: its keys are relative to the longest wildcard-free folder
        parts = Path(images).parts
        cut = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        images = str(Path(*parts[:cut])) if cut else "."
    spec = Path(images).expanduser()
    for root in ([spec] if spec.is_absolute() else [spec, store.path.parent / spec]):
        if root.exists():
            return root
    return None


def input_image(store, key: str, size: tuple[int, int] | None) -> tuple[np.ndarray | None, str]:
    """The input of image `key` as the extraction saw it (resized like the run did), uint8 [H, W, 3], or
    (None, why it is not there)."""
    from difffeat.data.images import BadImageError, load_image, resize_image

    config = store.manifest.get("config") or {}
    images = str(config.get("images") or "")
    if images.startswith("hf:"):
        return None, "input is in a dataset"
    root = input_root(store)
    if root is None:
        return None, "input folder not found"
    try:
        path = root if root.is_file() else confine(root, key, what="image key")
        image = load_image(path)
    except (BadImageError, UserError):
        return None, "input image missing"
    if size:
        image = resize_image(image, size, config.get("resize") or "center-crop")
    return np.asarray(image.convert("RGB")), ""


# ------------------------------------------------------------------------------------------- the grid
def cosine_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel cosine similarity of two [C, h, w] maps over channels: Σ_c a·b / (‖a‖ ‖b‖), [h, w]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


@dataclass
class Grid:
    """What a comparison picture shows, computed from a store (no drawing)."""

    store: str
    keys: list[str]
    columns: list[Column]
    inputs: list[np.ndarray | None]
    notes: list[str]  # why an input is missing ("" when it is there)
    tiles: list[list[np.ndarray]]  # [column][image] uint8 [h, w, 3]
    cosine: list[list[float] | None] = field(default_factory=list)  # [column][image] mean cosine to t = 0


def comparison_grid(store, keys: list[str] | None = None, n: int = 8, variants: list[str] | None = None,
                    layers: list[str] | None = None, cosine: bool = True) -> Grid:
    """Inputs and PCA tiles of `n` images (or `keys`) of a `FeatureStore`.

    One PCA basis per layer, fitted over every variant, timestep and image shown, so a colour means the same
    in every tile of that layer; different layers live in different channel spaces and get their own. With
    `cosine`, every column at t > 0 whose variant also has the layer at t = 0 gets each image's mean
    per-pixel cosine similarity to those t = 0 ("clean") features.
    """
    where = str(store.path)
    if len(store) == 0:
        raise UserError(f"{where}: the store holds no images yet")
    if keys:
        missing = [k for k in keys if k not in store]
        if missing:
            raise UserError(f"{where}: no image {missing[0]!r}")
    else:
        keys = store.keys()[:n]
    plain = tuple(name for name, specs in ((store.manifest.get("config") or {}).get("variants") or {}).items()
                  if not specs)
    columns = choose_columns(store_columns(store), variants, layers, where, baseline=plain)
    maps = {c.key: [store[k][c.key].astype(np.float32) for k in keys] for c in columns}
    tiles: dict[str, list[np.ndarray]] = {}
    for layer in dict.fromkeys(c.layer for c in columns):
        group = [c for c in columns if c.layer == layer]
        rgb = pca_rgb([m for c in group for m in maps[c.key]])
        for i, c in enumerate(group):
            tiles[c.key] = rgb[i * len(keys) : (i + 1) * len(keys)]
    cos: list[list[float] | None] = []
    everything = {c.key: c for c in store_columns(store)}
    for c in columns:
        clean = next((o for o in everything.values() if o.variant == c.variant and o.layer == c.layer and o.t == 0),
                     None)
        if not cosine or clean is None or c.t in (0, None):
            cos.append(None)
            continue
        cos.append([float(cosine_map(maps[c.key][i], store[k][clean.key]).mean()) for i, k in enumerate(keys)])
    resolution = store.manifest.get("resolution")
    size = tuple(resolution) if isinstance(resolution, (list, tuple)) and len(resolution) == 2 else None
    found = [input_image(store, k, size) for k in keys]
    return Grid(where, list(keys), columns, [a for a, _ in found], [w for _, w in found],
                [tiles[c.key] for c in columns], cos)


def _row_label(key: str) -> str:
    """An image key as a row label: its folder on one line, its file name on the next (each shortened)."""
    folder, _, name = key.rpartition("/")
    return (_shorten(folder + "/", 26) + "\n" if folder else "") + _shorten(name, 26)


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    """Nearest-neighbour by a whole factor up to about `side` pixels (a larger image is shrunk smoothly)."""
    h, w = image.shape[:2]
    factor = side / max(h, w)
    if factor >= 1:
        k = max(1, int(factor))
        return image.repeat(k, axis=0).repeat(k, axis=1)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((max(1, round(w * factor)), max(1, round(h * factor))),
                                                    Image.Resampling.LANCZOS))


def render_grid(grid: Grid, scale: int | None = None, title: str | None = None) -> bytes:
    """The grid as an RGB PNG (matplotlib, Agg): input | one column per variant/layer/t, image keys as row
    labels, tiles scaled up nearest-neighbour, a last row of mean cosine-to-clean where it was computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    biggest = max(t.shape[0] for col in grid.tiles for t in col)
    side = biggest * scale if scale else max(biggest, biggest * math.ceil(TILE_PX / biggest))
    dpi, gap = 100, 8
    cos_row = any(c is not None for c in grid.cosine)
    n_rows, n_cols = len(grid.keys) + (1 if cos_row else 0), 1 + len(grid.columns)
    title_lines = max(len(c.title.split("\n")) for c in grid.columns)
    labels = [_row_label(k) for k in grid.keys]
    widest = max(len(line) for label in labels for line in label.split("\n"))
    left, right = max(130, 24 + 7 * widest), 16
    top = 40 + 14 * title_lines + 10
    width = left + n_cols * side + (n_cols - 1) * gap + right
    footnote = textwrap.wrap(FOOTNOTE, width=max(40, int((width - 24) / 5.6)))
    bottom = 16 + 12 * len(footnote)
    height = top + n_rows * side + (n_rows - 1) * gap + bottom
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")

    def axes(row: int, col: int):
        x0 = left + col * (side + gap)
        y0 = height - top - (row + 1) * side - row * gap
        ax = fig.add_axes((x0 / width, y0 / height, side / width, side / height))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    fs = 9
    for r in range(len(grid.keys)):
        ax = axes(r, 0)
        if grid.inputs[r] is not None:
            ax.imshow(_upscale(grid.inputs[r], side), interpolation="nearest")
        else:
            ax.imshow(np.full((4, 4, 3), GREY, np.uint8), interpolation="nearest")
            ax.text(0.5, 0.5, grid.notes[r].replace(" ", "\n", 1), ha="center", va="center", fontsize=fs - 1,
                    color="#444", transform=ax.transAxes)
        ax.text(-0.06, 0.5, labels[r], ha="right", va="center", fontsize=fs, transform=ax.transAxes)
        if r == 0:
            ax.set_title("input", fontsize=fs, pad=4)
        for c, column in enumerate(grid.columns):
            ax = axes(r, c + 1)
            ax.imshow(_upscale(grid.tiles[c][r], side), interpolation="nearest")
            if r == 0:
                ax.set_title(column.title, fontsize=fs, pad=4, linespacing=1.25)
            values = grid.cosine[c]
            if values is not None:
                ax.text(0.03, 0.03, f"cos {values[r]:.2f}", fontsize=fs - 2, color="white", transform=ax.transAxes,
                        bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.5, "edgecolor": "none"})
    if cos_row:
        r = len(grid.keys)
        ax = axes(r, 0)
        ax.axis("off")
        ax.text(1.0, 0.5, "cosine to clean\n(t = 0), mean\nover images", ha="right", va="center", fontsize=fs,
                transform=ax.transAxes)
        for c, values in enumerate(grid.cosine):
            ax = axes(r, c + 1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            if values is None:
                ax.axis("off")
                continue
            ax.text(0.5, 0.58, f"{float(np.mean(values)):.3f}", ha="center", va="center", fontsize=fs + 4)
            ax.text(0.5, 0.36, f"± {float(np.std(values)):.3f}", ha="center", va="center", fontsize=fs - 1,
                    color="#555")
            for s in ax.spines.values():
                s.set_color("#bbb")
    heading = title or f"{grid.store}: input and feature PCA of {len(grid.keys)} images"
    fig.text(12 / width, 1 - 10 / height, heading, ha="left", va="top", fontsize=fs + 2, weight="bold")
    fig.text(12 / width, 8 / height, "\n".join(footnote), ha="left", va="bottom", fontsize=fs - 1.5, color="#555",
             linespacing=1.3)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
    out = io.BytesIO()
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").save(out, format="PNG", optimize=True)
    return out.getvalue()


# --------------------------------------------------------------------------------------------- command
@dataclass
class VizConfig(Config):
    """`difffeat viz`: the comparison picture of a feature store."""

    store: str = option(help="feature store folder")
    out: str = option(help="PNG to write")
    layers: list[str] | None = option(None, flag="--layers", metavar="L[,L…]",
                                      help="layers to show: a stored name, LAYER@T or LAYER (every t); comma "
                                           "list or repeat (default: all, or the first when there are many)")
    variants: list[str] | None = option(None, metavar="V[,V…]", help="variants to show, in this order (default all)")
    keys: list[str] | None = option(None, nargs="*", help="image keys (default: the first --n)")
    n: int = option(8, min=1, help="images when --keys is not given")
    scale: int | None = option(None, min=1, help="upscale factor of the largest map (default: tiles of about "
                                                 f"{TILE_PX} px)")
    cosine: bool = option(True, help="mean cosine to the t = 0 features under each tile and in a last row, "
                                     "when the store has t = 0")
    overwrite: bool = option(False, help="replace --out if it exists")

    def check(self) -> None:
        if not str(self.out).lower().endswith(".png"):
            raise ConfigError("out", f"must be a .png file, got {self.out!r}")


def check_output_path(out: str | os.PathLike, store_path: str | os.PathLike, overwrite: bool) -> Path:
    """Where `difffeat viz` may write its picture (the single-output-file rule of `difffeat.spine.run`)."""
    del store_path  # the picture may live in the store folder: the store reads only its own files
    return check_new_file(out, overwrite, what="picture")


def save_comparison(cfg: VizConfig) -> tuple[Path, Grid]:
    """Write the comparison picture `cfg` describes; returns its path and what it shows."""
    from difffeat.store.feature_store import FeatureStore

    store = FeatureStore(cfg.store)
    out = check_output_path(cfg.out, cfg.store, cfg.overwrite)
    grid = comparison_grid(store, keys=cfg.keys, n=cfg.n, variants=cfg.variants, layers=cfg.layers,
                           cosine=cfg.cosine)
    png = render_grid(grid, scale=cfg.scale)
    _mkdir(out.parent)
    with atomic_path(out, what="picture") as tmp:
        tmp.write_bytes(png)
    return out, grid


def _cmd_viz(args) -> None:
    from difffeat.spine.config_cli import config_from_args
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()
    cfg = config_from_args(VizConfig, args, layers=_split(args.layers) or None, variants=_split(args.variants) or None)
    out, grid = save_comparison(cfg)
    cols = " | ".join(["input"] + [c.key for c in grid.columns])
    missing = sum(a is None for a in grid.inputs)
    print(watch.finish_line(f"wrote {out}: {len(grid.keys)} images × ({cols})"
                            + (f"; {missing} input(s) not found (grey)" if missing else "")))


def add_viz_command(subparsers) -> None:
    """Add `viz` to difffeat's sub-commands."""
    from difffeat.spine.config_cli import add_config_arguments

    p = subparsers.add_parser("viz", help="picture comparing inputs with PCA of their features (PNG)",
                              description="For N images of a store: the input, then one PCA tile per variant, "
                                          "layer and timestep (one PCA basis per layer, shared by all of them).")
    add_config_arguments(p, VizConfig, positional=["store"], required=["store", "out"])
    p.add_argument("--layer", dest="layers", action="append", help=argparse.SUPPRESS)  # the flag's older name
    p.set_defaults(func=_cmd_viz)
