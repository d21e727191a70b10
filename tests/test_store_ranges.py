"""Issue #27: store readers flag features far outside the range recorded at extraction, and a shard whose checksum was
stripped is not counted as sound.

Every shard records, per image and layer, [min, max, mean] of the values as stored
(`difffeat.store.feature_store.value_range`); `FeatureStore.__getitem__` (what every head, export and merge reads
through) compares each layer it returns with its record and warns once per key, naming it. docs/reliability.md ("Round
two: stores, locks and configs") lists these.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from test_reliability import assert_one_line, run_cli

from difffeat.store.feature_store import (
    STRIPPED,
    FeatureRangeWarning,
    FeatureStore,
    FeatureStoreWriter,
    check_shard,
    value_range,
)


def make_store(path: Path, n: int = 4, shard_size: int = 2) -> Path:
    rng = np.random.default_rng(0)
    with FeatureStoreWriter(path, {"model": "test", "layers": ["a", "b"]}, shard_size=shard_size) as w:
        for i in range(n):
            w.add(f"img{i}.png", {"a": rng.normal(size=(3, 4, 4)).astype(np.float32) * (i + 1),
                                  "b": rng.uniform(size=(2, 2, 2)).astype(np.float32)})
    return path


def edit_shard(file: Path, change, strip_checksum: bool = True) -> None:
    """Rewrite a shard with `change(tensors)` applied, its metadata kept (minus the checksum when asked)."""
    with safe_open(str(file), framework="np") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k).copy() for k in f.keys()}
    change(tensors)
    if strip_checksum:
        meta.pop("sha256", None)
    save_file(tensors, str(file), metadata=meta)


def range_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FeatureRangeWarning)]


def first_shard(store: Path) -> Path:
    return sorted((store / "shards").glob("*.safetensors"))[0]


def test_value_range_is_exact_in_the_stored_dtype_and_none_when_not_finite():
    a = np.array([[[1.5, -2.25], [3.0, 0.0]]], np.float16)
    assert value_range(a) == [-2.25, 3.0, pytest.approx(0.5625)]
    assert value_range(np.array([[[1.0, np.nan]]], np.float32)) is None
    assert value_range(np.array([[[1.0, np.inf]]], np.float32)) is None


def test_an_untouched_store_reads_without_a_warning_and_ranges_sum_up(tmp_path):
    path = make_store(tmp_path / "s")
    store = FeatureStore(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        arrays = {k: store[k] for k in store.keys()}
        store.stacked("a")
    assert range_warnings(record) == []
    ranges = store.ranges()
    for layer in ("a", "b"):
        values = np.stack([arrays[k][layer] for k in store.keys()])
        assert ranges[layer]["min"] == float(values.min()) and ranges[layer]["max"] == float(values.max())
        assert ranges[layer]["mean"] == pytest.approx(float(np.mean([arrays[k][layer].mean() for k in store.keys()])))


@pytest.mark.parametrize("corruption", ["sixteen-floats-set-to-1000", "one-image-times-1e30"])
def test_edited_features_are_flagged_once_naming_the_key(tmp_path, corruption):
    path = make_store(tmp_path / "s")

    def change(tensors):
        if corruption == "sixteen-floats-set-to-1000":
            tensors["1/a"].reshape(-1)[:16] = 1000.0
        else:
            for name in ("1/a", "1/b"):
                tensors[name] *= np.float32(1e30)

    edit_shard(first_shard(path), change)
    store = FeatureStore(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for key in store.keys():
            store[key]
        store["img1.png"]  # read again (a second epoch): said once
        store.stacked("a")
    found = range_warnings(record)
    assert len(found) == 1, found
    assert "'img1.png'" in found[0] and "layer a" in found[0] and "shard-r000-000000.safetensors" in found[0]
    assert "--verify" in found[0]


def test_a_stripped_checksum_is_damage_not_a_match(tmp_path, capsys):
    path = make_store(tmp_path / "s")
    shard = first_shard(path)
    edit_shard(shard, lambda t: None)  # the checksum removed, nothing else
    assert check_shard(shard) == STRIPPED
    code, out, err = run_cli(["inspect", str(path), "--verify"], capsys)
    assert code == 2
    assert_one_line(err, ("shard-r000-000000.safetensors", "no checksum", "it was removed"))


def test_shards_of_an_older_difffeat_are_said_unchecked_and_read_without_range_checks(tmp_path, capsys):
    path = make_store(tmp_path / "s")

    def older(file: Path) -> None:  # what a store of an earlier version holds: no checksum and no ranges
        with safe_open(str(file), framework="np") as f:
            meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("sha256", "ranges")}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(file), metadata=meta)

    older(first_shard(path))
    assert check_shard(first_shard(path)) is None
    code, out, err = run_cli(["inspect", str(path), "--verify"], capsys)
    assert code == 0, err
    assert "1 shard(s) match their checksums; 1 written before shards carried checksums could not be checked" in out
    store = FeatureStore(path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for key in store.keys():
            store[key]
    assert range_warnings(record) == []
    assert "values [" in out  # inspect shows each layer's recorded range (from the shards that have one)


def test_a_resumed_extraction_sets_a_stripped_shard_aside(tmp_path):
    path = make_store(tmp_path / "s")
    edit_shard(first_shard(path), lambda t: None)
    with FeatureStoreWriter(path, {"model": "test", "layers": ["a", "b"]}, shard_size=2, resume=True) as w:
        assert w.done_keys() == {"img2.png", "img3.png"}  # the stripped shard's images are extracted again
        assert any("no checksum" in n["reason"] for n in w.notes)


def test_the_cli_says_a_range_warning_in_one_line_naming_the_key(tmp_path):
    path = make_store(tmp_path / "s")
    edit_shard(first_shard(path), lambda t: t["0/b"].__imul__(np.float32(1e30)))
    out = tmp_path / "export"
    # A process of its own: pytest records warnings itself, and the CLI leaves a recorder in place.
    proc = subprocess.run([sys.executable, "-m", "difffeat", "--quiet", "store", "parquet", str(path), str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "outside the range" in line]
    assert len(lines) == 1 and lines[0].startswith("difffeat: warning: ") and "'img0.png'" in lines[0], proc.stderr
    assert "Warning:" not in proc.stderr  # not Python's two-line form
    assert json.loads((path / "manifest.json").read_text())  # the store itself untouched by reading
