"""A feature store as Parquet files: what ``datasets.load_dataset("parquet", data_dir=…)`` reads and what
``push_to_hub`` uploads (the Hub's own layout, ``train-00000-of-00004.parquet``).

Each file holds `shard_rows` images: a "key" column and one `datasets.Array3D` column per layer, with the
`datasets` feature types in the Parquet schema, so the arrays come back with their shapes and dtypes. Files
are written one at a time from the store (memory stays at one file's rows) and each appears whole or not
at all (temporary name, then rename).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

TARGET_FILE_BYTES = 256 * 2**20  # a file size the Hub and datasets handle well


def default_shard_rows(store) -> int:
    """Rows per file so that a file holds about `TARGET_FILE_BYTES` of features."""
    import numpy as np

    shapes, dtypes = store.shapes, store.dtypes
    row = sum(int(np.prod(shapes[layer])) * np.dtype(dtypes[layer]).itemsize for layer in shapes) or 1
    return max(1, TARGET_FILE_BYTES // row)


def to_parquet(store, folder: str | os.PathLike, shard_rows: int | None = None, progress: bool = False) -> list[Path]:
    """Write `store` (a `FeatureStore`) as Parquet files into `folder` (new or empty); returns the files.
    `progress` shows a bar over the images."""
    import datasets
    from tqdm.auto import tqdm

    from difffeat.errors import UserError
    from difffeat.spine.run import check_new_folder, mkdir
    from difffeat.utils.atomic import atomic_path

    if shard_rows is not None and shard_rows < 1:
        raise UserError(f"shard_rows must be ≥ 1, got {shard_rows}")
    folder = check_new_folder(folder, what="Parquet export")
    keys = store.keys()
    if not keys:
        raise UserError(f"{store.path}: the store holds no images to export")
    mkdir(folder)
    shapes, dtypes = store.shapes, store.dtypes
    features = datasets.Features({"key": datasets.Value("string")})
    for layer in store.layers:
        features[layer] = datasets.Array3D(shape=shapes[layer], dtype=dtypes[layer])
    rows = shard_rows or default_shard_rows(store)
    count = math.ceil(len(keys) / rows)
    files = []
    bar = tqdm(total=len(keys), desc="parquet", unit="image", disable=not progress)
    for i in range(count):
        part = keys[i * rows : (i + 1) * rows]
        columns: dict[str, list] = {"key": part, **{layer: [] for layer in store.layers}}
        for key in part:
            arrays = store[key]
            for layer in store.layers:
                columns[layer].append(arrays[layer])
            bar.update(1)
        file = folder / f"train-{i:05d}-of-{count:05d}.parquet"
        with atomic_path(file, what=f"Parquet file {file.name}") as tmp:
            datasets.Dataset.from_dict(columns, features=features).to_parquet(str(tmp))
        files.append(file)
    bar.close()
    return files
