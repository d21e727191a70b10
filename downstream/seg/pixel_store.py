"""Raw pixels as a feature store: the no-learned-features baseline for heads on stored features.

``write_pixel_store(IMAGES, OUT)`` writes each image's RGB values in [0, 1] as layer "pixels" ``[3, H, W]``
(or, with ``patch=p``, its p×p patches as channels, ``[3p², H/p, W/p]``: the same values on a coarser grid,
like a ViT's patch embedding input) into a store the segmentation trainer reads like any other. Keys are
the images' paths relative to IMAGES, as `difffeat extract` makes them; an imagefolder / Shapes-LT root
contributes the rows of its ``metadata.csv`` files (so its masks are not taken for images).

    python -m downstream.seg.pixel_store data/shapes-lt --out runs/feat-pixels [--patch 4]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from difffeat.errors import UserError
from difffeat.spine.run import confine
from difffeat.store.feature_store import FeatureStoreWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def find_images(root: Path) -> list[str]:
    """Image paths relative to `root` (POSIX, sorted): metadata.csv rows when there are any, else every image."""
    keys = []
    for meta in sorted(root.rglob("metadata.csv")):
        try:
            with open(meta, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{meta}: unreadable metadata ({e})") from None
        base = PurePosixPath(meta.parent.relative_to(root).as_posix())
        for row in rows:
            if row.get("file_name"):
                key = (base / row["file_name"]).as_posix().removeprefix("./")
                confine(root, key, what=f"{meta}: file_name")  # read from a file: it may not lead out of root
                keys.append(key)
    if keys:
        return sorted(keys)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def write_pixel_store(images: str | os.PathLike, out: str | os.PathLike, *, patch: int = 1,
                      size: tuple[int, int] | None = None, overwrite: bool = False) -> Path:
    """Write the raw-pixel store of the images under `images` to `out` and return `out`.

    Every image must have one size (or give `size` = (H, W) to resize them, bicubic); H and W must be
    multiples of `patch`.
    """
    root = Path(images)
    if not root.is_dir():
        raise UserError(f"{images}: no such image folder")
    keys = find_images(root)
    if not keys:
        raise UserError(f"{images}: no images found")
    if patch < 1:
        raise UserError(f"--patch must be ≥ 1, got {patch}")
    if size is None:
        try:
            with Image.open(root / keys[0]) as first:
                size = (first.height, first.width)
        except Exception as e:  # whatever PIL raises for a damaged file
            raise UserError(f"{root / keys[0]}: unreadable image, which sets the store's size ({e}); "
                            "give --size H W") from None
        fixed = False
    else:
        fixed = True
    height, width = size
    if height % patch or width % patch:
        raise UserError(f"image size {height}×{width} is not a multiple of --patch {patch}")
    config = {"model": "pixels", "layers": ["pixels"], "timesteps": [], "seed": 0, "techniques": [],
              "resolution": [height, width], "resize": "stretch", "images": str(root), "patch": patch}
    with FeatureStoreWriter(out, config, overwrite=overwrite) as writer:
        for key in keys:
            try:
                img = Image.open(root / key).convert("RGB")
            except Exception as e:  # whatever PIL raises for a damaged file: skip and record it
                writer.fail(key, f"unreadable image ({e})")
                continue
            if (img.height, img.width) != (height, width):
                if not fixed:
                    writer.fail(key, f"image is {img.height}×{img.width}, others {height}×{width}")
                    continue
                img = img.resize((width, height), Image.BICUBIC)
            x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            if patch > 1:  # space-to-depth: channel (c, dy, dx) of cell (i, j) is pixel (i·p+dy, j·p+dx) of c
                x = x.reshape(3, height // patch, patch, width // patch, patch).transpose(0, 2, 4, 1, 3)
                x = x.reshape(3 * patch * patch, height // patch, width // patch)
            writer.add(key, {"pixels": x})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m downstream.seg.pixel_store", description=__doc__.splitlines()[0])
    parser.add_argument("images", help="image folder, imagefolder or Shapes-LT root")
    parser.add_argument("--out", required=True, help="feature store folder")
    parser.add_argument("--patch", type=int, default=1, help="p×p patches as channels (grid H/p × W/p)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images to this")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = write_pixel_store(args.images, args.out, patch=args.patch, size=tuple(args.size) if args.size else None,
                                overwrite=args.overwrite)
    except UserError as e:
        print(f"pixel_store: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote raw-pixel features to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
