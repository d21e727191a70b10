"""Where an extraction's images come from: a folder, a glob, an imagefolder, or a Hugging Face dataset.

- a folder or glob: every image file (recursive), keyed by its path relative to the folder;
- an imagefolder (a folder holding `metadata.csv` files with a `file_name` column, as Shapes-LT and
  `datasets`' imagefolder use): exactly the images its rows name, so mask files beside them are not
  taken for images, and each image keeps its metadata row (captions, labels);
- `hf:NAME[:SPLIT]`: a `datasets` dataset by name or local path (offline: only what is cached);
- a data spec ``LAYOUT:ROOT[:SPLIT]`` (`difffeat.data.layouts`: ade20k, cityscapes, voc, coco-stuff, ddpm-seg, a
  local `hf` folder, shapes-lt …), or the root of such a tree given as a plain folder: exactly the images of the
  layout (of one split, or of all), never its annotation images, keyed as the layout keys them; `data` then
  describes the data set for the store's manifest.

Folders that difffeat wrote (a feature store, a run folder) and the folders in `exclude` (the run's own
output) are never searched for images or tables.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from difffeat.data.images import (
    BadImageError,
    ImageItem,
    discover_hf,
    discover_images,
    file_stamp,
    is_difffeat_output,
    load_hf_image,
    load_image,
)
from difffeat.data.walk import walk_once
from difffeat.errors import UserError
from difffeat.spine.run import confine_name


def input_root(spec: str, parsed=None) -> str | None:
    """The folder a source spec reads from: a folder, a data spec's root, a glob's longest folder without wildcards;
    None for a single file or a data set by name."""
    import glob

    if parsed is not None:
        return os.path.expanduser(parsed[2])
    text = os.path.expanduser(spec)
    if spec.startswith("hf:") or os.path.isfile(text):
        return None
    if os.path.isdir(text):
        return text
    if glob.has_magic(text):
        parts = Path(text).parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return str(Path(*parts[:fixed])) if fixed else "."
    return None


class ImageSource:
    """A list of `ImageItem`s, a way to load each, and each one's metadata row where it has one."""

    def __init__(self, spec: str, exclude: Iterable[str | os.PathLike] = ()):
        self.spec = spec
        self.rows: dict[str, dict] = {}
        self.dataset = None
        self.layout = None
        self.exclude = {os.path.realpath(os.fspath(e)) for e in exclude}
        from difffeat.data.layouts import LAYOUTS, detect_layout, open_data, parse_data_spec

        parsed = parse_data_spec(spec)
        root = input_root(spec, parsed)
        if root is not None and os.path.realpath(root) in self.exclude:  # it would list nothing: say why
            raise UserError(f"{spec}: the output folder (--out) is the input folder; write the output to another "
                            "folder (a new one, or a sub-folder of this one)")
        if parsed is not None and parsed[0] == "hf" and not (Path(parsed[2]).is_dir() and
                                                             LAYOUTS["hf"].detect(Path(parsed[2]))):
            parsed = None  # hf:NAME of the Hub or its cache, or a folder `datasets` builds (imagefolder): below
        detected = detect_layout(spec) if parsed is None and Path(spec).is_dir() else None
        if parsed is not None or detected is not None:
            self.items = self._open_layout(open_data(spec if parsed else f"{detected}:{spec}"))
        elif spec.startswith("hf:"):
            self.items = self._open_hf(spec[3:])
        elif Path(spec).is_dir() and (tables := self._metadata_files(Path(spec))):
            self.items = self._open_imagefolder(Path(spec), tables)
        else:
            self.items = discover_images(spec, exclude=self.exclude)

    @property
    def data(self) -> dict | None:
        """The data set the images come from (layout, root, split), or None for a plain folder."""
        return None if self.layout is None else self.layout.describe()

    def _open_layout(self, layout) -> list[ImageItem]:
        self.layout = layout
        self._samples = {s.key: s for s in layout.samples}
        self.rows = dict(getattr(layout, "rows", {}))
        return [ImageItem(key=s.key, path=s.image, index=s.index) for s in layout.samples]

    def _metadata_files(self, root: Path) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in walk_once(root):  # linked folders too, as image discovery follows them
            dirnames[:] = [d for d in dirnames if not self._left_out(Path(dirpath, d))]
            if "metadata.csv" in filenames:
                found.append(Path(dirpath) / "metadata.csv")
        return found

    def _open_imagefolder(self, root: Path, tables: list[Path]) -> list[ImageItem]:
        items = []
        for table in tables:
            with open(table, newline="") as f:
                reader = csv.DictReader(f)
                if "file_name" not in (reader.fieldnames or []):
                    raise UserError(f"{table}: an imagefolder metadata.csv needs a file_name column")
                for number, row in enumerate(reader, 2):
                    # a name read from a file stays inside the table's folder: no ../, no absolute path
                    path = confine_name(table.parent, row["file_name"] or "", what=f"{table}: line {number}: file_name")
                    key = path.relative_to(root).as_posix()
                    self.rows[key] = row
                    items.append(ImageItem(key=key, path=path))
        if not items:
            raise UserError(f"{root}: its metadata.csv files list no images")
        return sorted(items, key=lambda it: it.key)

    def _open_hf(self, name: str) -> list[ImageItem]:
        import datasets

        name, _, split = name.partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or None)
        except Exception as e:  # offline, unknown name, bad split: all one user-facing failure
            raise UserError(f"hf:{name}: cannot load the dataset ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                            ) from None
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"hf:{name}: has splits {', '.join(ds)}; name one as hf:{name}:SPLIT")
        self.dataset = ds
        items = discover_hf(ds)
        # Metadata rows without decoding a single image.
        meta = ds.remove_columns([c for c, f in ds.features.items() if isinstance(f, datasets.Image)]).to_list()
        for item in items:
            self.rows[item.key] = {k: v for k, v in meta[item.index].items() if isinstance(v, (str, int, float))}
        return items

    def load(self, item: ImageItem) -> Image.Image:
        """The item as an RGB image; raises BadImageError naming it and the reason."""
        if self.layout is not None:
            return self.layout.load_image(self._samples[item.key])
        if self.dataset is not None:
            return load_hf_image(self.dataset, item)
        if item.path is None or not item.path.exists():
            raise BadImageError(item.path or item.key, "no such file")
        return load_image(item.path)

    def row(self, item: ImageItem) -> dict | None:
        return self.rows.get(item.key)

    def stamp(self, item: ImageItem) -> tuple[int, int] | None:
        """The item's file (size, mtime_ns) now; None for a data set row (rows carry no such stamp)."""
        return None if item.path is None else file_stamp(item.path)

    def stamps(self) -> dict[str, tuple[int, int] | None]:
        """`stamp` of every item, by key: what a resumed run checks its done images against."""
        return {item.key: self.stamp(item) for item in self.items}

    def _left_out(self, folder: Path) -> bool:
        return os.path.realpath(folder) in self.exclude or is_difffeat_output(folder)
