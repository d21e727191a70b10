"""Past one machine (issue 17): `extract --shard-index i --num-shards n`, `difffeat store merge`, Parquet export."""

import errno
import json
import os
import shutil

import numpy as np
import pytest

from difffeat.cli import main
from difffeat.data.shapes_lt import synthesize
from difffeat.store.feature_store import FeatureStore

MODEL = "mini-random"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """16 Shapes-LT train images and one that cannot be read."""
    folder = synthesize(tmp_path_factory.mktemp("merge") / "shapes", n=20, seed=6) / "train" / "images"
    (folder / "zz-broken.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def stores(images, tmp_path_factory):
    """Three shard jobs and one job over everything, batches padded so that batching never shows in a bit."""
    root = tmp_path_factory.mktemp("stores")
    base = ["--quiet", "extract", str(images), "--model", MODEL, "--layer", "up_blocks.1", "--t", "50", "--t", "300",
            "--batch-size", "4", "--pad-batches", "--shard-size", "2"]
    for i in range(3):
        assert main(base + ["--out", str(root / f"part{i}"), "--shard-index", str(i), "--num-shards", "3"]) == 0
    assert main(base + ["--out", str(root / "one")]) == 0
    return root


def _identical(a: FeatureStore, b: FeatureStore):
    assert a.keys() == b.keys() and a.layers == b.layers
    for key in a.keys():
        fa, fb = a[key], b[key]
        assert fa.keys() == fb.keys()
        for layer in fa:
            assert np.array_equal(fa[layer], fb[layer]) and fa[layer].dtype == fb[layer].dtype, (key, layer)


def test_shard_jobs_take_every_nth_image(stores):
    keys = FeatureStore(stores / "one").keys() + ["zz-broken.png"]
    for i in range(3):
        part = FeatureStore(stores / f"part{i}")
        assert part.keys() == [k for k in keys[i::3] if k != "zz-broken.png"]
        assert part.manifest["config"]["shard_index"] == i and part.manifest["config"]["num_shards"] == 3
    assert "shard_index" not in FeatureStore(stores / "one").manifest["config"], "an unsharded config is unchanged"


def test_merged_store_equals_the_one_job_store(stores, tmp_path, capsys):
    out = tmp_path / "merged"
    parts = [stores / f"part{i}" for i in range(3)]
    assert main(["store", "merge", str(out), *map(str, parts)]) == 0
    said = capsys.readouterr().out
    assert "store merge: 3 stores (16 images)" in said and "hard links, no array copied in " in said
    merged, one = FeatureStore(out), FeatureStore(stores / "one")
    _identical(merged, one)
    assert merged.manifest["config"] == one.manifest["config"]
    assert merged.manifest["config_hash"] == one.manifest["config_hash"], "a one-job run's config, hash included"
    assert [f["key"] for f in merged.failures] == ["zz-broken.png"]  # from the job that met it
    # Hard links: the very files of the sources, renumbered by rank.
    sources = {os.stat(f).st_ino for p in parts for f in (p / "shards").glob("*.safetensors")}
    linked = {os.stat(f).st_ino for f in (out / "shards").glob("*.safetensors")}
    assert linked == sources
    assert {f.name.split("-")[1] for f in (out / "shards").glob("*.safetensors")} == {"r000", "r001", "r002"}
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 16 and report["links"] == ["hard"] and report["notes"] == []
    assert [m["images"] for m in report["merged_from"]] == [6, 5, 5]
    assert main(["inspect", str(out), "--verify"]) == 0  # per-shard checksums carried over


def test_a_resumed_merged_store_leaves_its_sources_alone(stores, images, tmp_path):
    """Shards are replaced, never changed in place: an image re-extracted in the merged store does not
    reach the source store its shard was linked from."""
    src = tmp_path / "imgs"
    shutil.copytree(images, src)
    parts = []
    for i in range(2):
        out = tmp_path / f"p{i}"
        assert main(["--quiet", "extract", str(src), "--out", str(out), "--model", MODEL, "--layer", "mid_block",
                     "--shard-index", str(i), "--num-shards", "2", "--shard-size", "3"]) == 0
        parts.append(out)
    merged = tmp_path / "merged"
    assert main(["store", "merge", str(merged), *map(str, parts)]) == 0
    before = {f: f.read_bytes() for p in parts for f in (p / "shards").glob("*")}
    changed = src / FeatureStore(parts[0]).keys()[0]
    os.utime(changed, ns=(1, 1))
    assert main(["--quiet", "extract", str(src), "--out", str(merged), "--model", MODEL, "--layer", "mid_block",
                 "--shard-size", "3", "--resume"]) == 0
    report = json.loads((merged / "report.json").read_text())
    assert report["extracted"] == 1 and len(FeatureStore(merged)) == 16
    assert {f: f.read_bytes() for p in parts for f in (p / "shards").glob("*")} == before


def test_merge_refuses_what_cannot_be_one_store(stores, images, tmp_path, capsys):
    def merge(*args):
        rc = main(["store", "merge", *map(str, args)])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return rc, err

    parts = [stores / f"part{i}" for i in range(3)]
    other = tmp_path / "seed1"
    assert main(["--quiet", "extract", str(images), "--out", str(other), "--model", MODEL, "--layer", "up_blocks.1",
                 "--t", "50", "--t", "300", "--seed", "1", "--shard-index", "1", "--num-shards", "3"]) == 0
    rc, err = merge(tmp_path / "m1", parts[0], other)
    assert rc == 2 and f"{other}: its config differs from {parts[0]}'s in seed" in err
    twin = tmp_path / "twin"
    shutil.copytree(parts[0], twin)
    rc, err = merge(tmp_path / "m2", parts[0], twin)
    key = FeatureStore(parts[0]).keys()[0]
    assert rc == 2 and f"key {key!r} is in both {parts[0]} and {twin}" in err
    rc, err = merge(parts[0] / "inside", parts[0], parts[1])
    assert rc == 2 and "cannot be" in err
    from difffeat.utils.lock import FolderLock

    with FolderLock(parts[1] / ".lock-r000", "test"):
        rc, err = merge(tmp_path / "m3", parts[0], parts[1])
    assert rc == 2 and "being written by process" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    rc, err = merge(tmp_path / "taken", *parts)
    assert rc == 2 and (tmp_path / "taken" / "mine.txt").read_text() == "x"


def test_across_file_systems_symlinks_or_a_clear_error(stores, tmp_path, monkeypatch, capsys):
    def no_hard_links(src, dst, *a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    parts = [stores / f"part{i}" for i in range(3)]
    assert main(["store", "merge", str(tmp_path / "m"), *map(str, parts)]) == 2
    err = capsys.readouterr().err
    assert "another file system?" in err and "--symlink" in err and "Traceback" not in err
    assert not list((tmp_path / "m" / "shards").glob("*")), "nothing half-linked is left"
    assert main(["store", "merge", str(tmp_path / "m"), *map(str, parts), "--symlink"]) == 0
    assert all(f.is_symlink() for f in (tmp_path / "m" / "shards").glob("*"))
    _identical(FeatureStore(tmp_path / "m"), FeatureStore(stores / "one"))


def test_partial_merges_say_what_is_missing(stores, tmp_path):
    from difffeat.store.merge import merge_stores

    report = merge_stores(tmp_path / "m", [stores / "part0", stores / "part2"])
    assert report["notes"] == ["shards 1 of 3 are not among the merged stores"]
    assert len(FeatureStore(tmp_path / "m")) == 11


def test_parquet_export_reads_back_with_datasets(stores, tmp_path, capsys):
    import datasets

    store = FeatureStore(stores / "one")
    files = store.to_parquet(tmp_path / "pq", shard_rows=5)
    assert [f.name for f in files] == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pq"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds["key"] == store.keys()
    assert isinstance(ds.features["up_blocks.1@50"], datasets.Array3D)
    row = ds.with_format("numpy")[3]
    for layer in store.layers:
        assert np.array_equal(row[layer], store[store.keys()[3]][layer])
    assert main(["store", "parquet", str(stores / "one"), str(tmp_path / "pq")]) == 2, "not an empty folder"
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["store", "parquet", str(stores / "one"), str(tmp_path / "pq2")]) == 0


@pytest.mark.parametrize("quiet", [False, True])
def test_store_commands_show_a_bar_and_end_with_their_summary(stores, tmp_path, capsys, quiet):
    """merge, parquet and inspect --verify read every shard (gigabytes on a big store): a bar over the work (not
    under --quiet) and one summary line with time, rate and peak memory."""
    import re

    flag = ["--quiet"] if quiet else []
    summary = r" in [\d.]+ s \([\d.]+ images/s\); peak memory [\d.]+ [KMG]iB$"
    parts = [str(stores / f"part{i}") for i in range(3)]
    merged = tmp_path / f"merged{quiet}"
    runs = [(["store", "merge", str(merged), *parts, "--verify"], "merge", "shard", "out",
             rf"store merge: 3 stores \(16 images\) into {re.escape(str(merged))} with hard links, no array copied"),
            (["store", "parquet", str(merged), str(tmp_path / f"pq{quiet}")], "parquet", "image", "out",
             r"store parquet: 16 images in 1 Parquet file\(s\) to .*"),
            (["inspect", str(merged), "--verify"], "verify", "shard", "err",
             rf"inspect --verify: 16 images of {re.escape(str(merged))} checked")]
    for argv, desc, unit, stream, what in runs:
        assert main([*flag, *argv]) == 0
        said = capsys.readouterr()
        last = getattr(said, stream).rstrip("\n").splitlines()[-1]
        assert re.match(what + summary, last), last
        bar = re.search(rf"{desc}: 100%.*\[\d\d:\d\d<\d\d:\d\d, +[\d.]+({unit}/s|s/{unit})", said.err)
        assert (bar is None) == quiet, said.err[-300:]
