"""Issue #27, reliability round two: an interrupted `store merge` (item 1), a full disk (item 4), `bench` on
broken files (item 8) and the last tracebacks (item 11), each as a clumsy or hostile user would meet it.

Bad input follows `test_reliability.py`'s table: the exit status, one line naming the file or flag and the reason
(no traceback), and nothing outside the command's own output changed. docs/reliability.md ("Round two") lists the
promise each test checks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reliability import PWNED, Case, assert_one_line, images, payload_pickle, run_cli, snapshot

from difffeat.errors import UserError
from difffeat.store.feature_store import MERGING, FeatureStore, FeatureStoreWriter

ENOSPC = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


# ---------------------------------------------------------------------------------------------- helpers
def extract_store(path: Path, n: int = 1) -> Path:
    """A store whose manifest holds a real extraction config (what `extract` writes)."""
    from difffeat.extraction.runner import ExtractRunConfig

    config = ExtractRunConfig(images="imgs", out=str(path), model="mini-random", layers=["mid_block"]).store_config()
    with FeatureStoreWriter(path, config) as w:
        for i in range(n):
            w.add(f"{i}.png", {"mid_block": np.full((2, 2, 2), i, np.float32)})
    return path


def sweep_run(tmp: Path) -> Path:
    """A sweep run folder's config.json (what `difffeat sweep` writes first)."""
    from difffeat.spine.run import RunFolder
    from gate.sweeping import SweepConfig

    cfg = SweepConfig(images=str(images(tmp / "imgs", 2)), labels=str(tmp), out=str(tmp / "sw"), model="mini-random")
    RunFolder(tmp / "sw", "sweep", cfg).create()
    return tmp / "sw" / "config.json"


def bare_config(tmp: Path, **fields) -> Path:
    images(tmp / "imgs", 2)
    (tmp / "bad.json").write_text(json.dumps({"images": str(tmp / "imgs"), "model": "mini-random",
                                              "layers": ["mid_block"], **fields}))
    return tmp / "bad.json"


def seg_root(tmp: Path) -> tuple[Path, Path]:
    """A tiny segmentation set (images/ and masks/ with classes.json) and a store of features for it."""
    root = tmp / "root"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    keys = []
    for i in range(4):
        Image.fromarray(np.full((16, 16), 1, np.uint8)).save(root / "images" / f"{i}.png")
        m = np.zeros((16, 16), np.uint8)
        m[: 4 + i] = 1
        m[-3:] = 2
        Image.fromarray(m).save(root / "masks" / f"{i}.png")
        keys.append(f"images/{i}.png")
    (root / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    config = {"model": "test", "layers": ["x"], "resolution": [16, 16], "resize": "stretch", "images": str(root)}
    with FeatureStoreWriter(tmp / "feat", config) as w:
        for i, key in enumerate(keys):
            w.add(key, {"x": np.random.default_rng(i).normal(size=(4, 4, 4)).astype(np.float32)})
    return root, tmp / "feat"


def controlnet_folder(tmp: Path) -> Path:
    from pipelines.techniques.controlnet import mini_canny_dir

    (tmp / "cn").mkdir()
    shutil.copy(mini_canny_dir() / "config.json", tmp / "cn" / "config.json")
    return tmp / "cn"


def custom_code(folder: Path, module: str, marker: Path) -> None:
    """A Python file a folder brings, which would create `marker` if it were ever imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def no_pwned(tmp: Path) -> None:
    assert not (tmp / PWNED).exists()


# ------------------------------------------------------------------------------------- item 11: the table
def extract_config_of_a_sweep(tmp: Path) -> list[str]:
    return ["extract", "--config", str(sweep_run(tmp)), "--out", str(tmp / "feats")]


def sweep_config_of_a_store(tmp: Path) -> list[str]:
    extract_store(tmp / "feats")
    return ["sweep", "--config", str(tmp / "feats" / "manifest.json"), "--out", str(tmp / "sw2")]


def train_seg_config_of_a_sweep(tmp: Path) -> list[str]:
    return ["train-seg", "--config", str(sweep_run(tmp)), "--out", str(tmp / "run")]


def gate_config_of_a_sweep(tmp: Path) -> list[str]:
    return ["gate", "--config", str(sweep_run(tmp)), "--out", str(tmp / "report")]


def extract_config_with(**fields):
    def setup(tmp: Path) -> list[str]:
        return ["extract", "--config", str(bare_config(tmp, **fields)), "--out", str(tmp / "feats")]

    return setup


def seed_minus_one(command: str):
    def setup(tmp: Path) -> list[str]:
        if command == "sweep":
            return ["sweep", str(images(tmp / "imgs", 4)), "--labels", str(tmp), "--out", str(tmp / "sw"), "--model",
                    "mini-random", "--seed", "-1"]
        if command == "train-seg":
            root, store = seg_root(tmp)
            return ["train-seg", "--features", str(store), "--masks", str(root), "--out", str(tmp / "run"),
                    "--iterations", "1", "--seed", "-1"]
        if command == "gate":
            images(tmp / "imgs", 2)
            (tmp / "cands.yaml").write_text("fine: [prompt:fine]\n")
            return ["gate", str(tmp / "imgs"), "--candidates", str(tmp / "cands.yaml"), "--out", str(tmp / "report"),
                    "--model", "mini-random", "--seed", "-1"]
        return ["data", "synth", str(tmp / "set"), "--n", "3", "--seed", "-1"]

    return setup


def bench_args(*extra: str) -> list[str]:
    return ["bench", "--model", "mini-random", "--layer", "mid_block", "--n", "2", *extra]


def bench_broken_images(tmp: Path) -> list[str]:
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.png").write_text("not a picture")
    (tmp / "broken" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return bench_args("--images", str(tmp / "broken"))


def controlnet_pickled_bin(tmp: Path) -> list[str]:
    payload_pickle(controlnet_folder(tmp) / "diffusion_pytorch_model.bin", tmp / PWNED)
    return ["extract", str(images(tmp / "imgs", 1)), "--out", str(tmp / "feats"), "--model", "mini-random",
            "--layer", "mid_block", "--technique", f"controlnet:{tmp / 'cn'}"]


def controlnet_custom_code(tmp: Path) -> list[str]:
    folder = controlnet_folder(tmp)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ControlNetModel",
                                                         "controlnet": ["my_net", "MyNet"]}))
    custom_code(folder / "controlnet", "my_net", tmp / PWNED)
    return ["extract", str(images(tmp / "imgs", 1)), "--out", str(tmp / "feats"), "--model", "mini-random",
            "--layer", "mid_block", "--technique", f"controlnet:{folder}"]


def model_custom_code(tmp: Path) -> list[str]:
    from difffeat.zoo.mini import weights_dir

    folder = tmp / "model"
    folder.mkdir()
    index = json.loads((weights_dir() / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    custom_code(folder / "unet", "my_unet", tmp / PWNED)
    return ["extract", str(images(tmp / "imgs", 1)), "--out", str(tmp / "feats"), "--model", str(folder),
            "--layer", "mid_block"]


CASES = [
    Case("extract-config-of-a-sweep", extract_config_of_a_sweep, 2,
         ("sw/config.json", "the config of a difffeat sweep run", "labels")),
    Case("extract-config-layers-of-lists", extract_config_with(layers=[["x"]]), 2,
         ("bad.json", "layers", "must be a list of strings", "[['x']]")),
    Case("extract-config-timesteps-in-words", extract_config_with(timesteps="fifty"), 2,
         ("bad.json", "timesteps", "must be a list of whole numbers", "'fifty'")),
    Case("extract-config-seed-in-words", extract_config_with(seed="0"), 2, ("bad.json", "seed", "whole number")),
    Case("sweep-config-of-a-store", sweep_config_of_a_store, 2,
         ("feats/manifest.json", "the config of a difffeat feature store run", "not one this command can repeat")),
    Case("train-seg-config-of-a-sweep", train_seg_config_of_a_sweep, 2, ("config.json", "sweep run")),
    Case("gate-config-of-a-sweep", gate_config_of_a_sweep, 2, ("config.json", "sweep run")),
    Case("sweep-seed-minus-one", seed_minus_one("sweep"), 2, ("--seed", "must be ≥ 0, got -1")),
    Case("train-seg-seed-minus-one", seed_minus_one("train-seg"), 2, ("--seed", "must be ≥ 0, got -1")),
    Case("gate-seed-minus-one", seed_minus_one("gate"), 2, ("--seed", "must be ≥ 0, got -1")),
    Case("synth-seed-minus-one", seed_minus_one("synth"), 2, ("--seed", "must be ≥ 0, got -1")),  # no folder made
    Case("bench-tmp-dir-missing", lambda t: bench_args("--tmp-dir", str(t / "nope")), 2,
         ("--tmp-dir", "nope", "no such folder")),
    Case("controlnet-pickled-bin", controlnet_pickled_bin, 2,
         ("cn/diffusion_pytorch_model.bin", "pickled weights", "not loaded"), check=no_pwned),
    Case("controlnet-index-naming-custom-code", controlnet_custom_code, 2,
         ("cn/model_index.json", "'controlnet'", "my_net.MyNet", "custom code"), check=no_pwned),
    Case("model-index-naming-custom-code", model_custom_code, 2,
         ("model/model_index.json", "'unet'", "my_unet.MyUNet", "custom code"), check=no_pwned),
    # item 8: broken files are refused, never timed as "2 images, 69.4 images/s"
    Case("bench-broken-images", bench_broken_images, 2, ("broken", "2 of 2 images cannot be read", "a.png")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys):
    argv = case.setup(tmp_path)
    before = snapshot(tmp_path, case.owned)
    code, out, err = run_cli(argv, capsys)
    assert code == case.code, (out, err)
    if case.code:
        assert_one_line(err, case.words)
    assert snapshot(tmp_path, case.owned) == before, "the command changed something outside its own output"
    if case.check:
        case.check(tmp_path)


def test_configs_are_checked_for_types_and_seeds_in_the_library_too():
    """The checks live in `Config` itself: any config, however it was made, names the field."""
    from difffeat.extraction.runner import ExtractRunConfig
    from difffeat.spine.run import ConfigError
    from gate.config import GateConfig

    with pytest.raises(ConfigError, match=r"timesteps: must be a list of whole numbers, got 'fifty'"):
        ExtractRunConfig.from_dict({"images": "x", "out": "y", "timesteps": "fifty"})
    with pytest.raises(ConfigError, match=r"seed: must be ≥ 0, got -1"):
        GateConfig(seed=-1).validate()
    with pytest.raises(ConfigError, match=r"labels: is required and not given"):
        from gate.sweeping import SweepConfig

        SweepConfig.from_dict({"images": "x"})
    cfg = ExtractRunConfig.from_dict({"images": Path("x"), "out": "y", "timesteps": (50, 100), "batch_size": "auto",
                                      "resolution": [np.int64(64), 64]})  # paths, tuples and numpy ints still fit
    assert cfg.timesteps == (50, 100) and cfg.batch_size == "auto"


# ------------------------------------------------------------------------------------- item 4: disk full
def full_safetensors(monkeypatch, calls: list) -> None:
    """safetensors as it fails on a full disk: part of the file written, then its own error type."""
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError(ENOSPC)

    monkeypatch.setattr("safetensors.torch.save_file", full)


def test_disk_full_in_a_trainer_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    """`run.save_tensors` (train-seg, sweep and every trainer's model and checkpoints) on a full disk."""
    root, store = seg_root(tmp_path)
    calls: list = []
    full_safetensors(monkeypatch, calls)
    before = snapshot(tmp_path, ("run",))
    code, _, err = run_cli(["train-seg", "--features", str(store), "--masks", str(root), "--out",
                            str(tmp_path / "run"), "--iterations", "2", "--batch-size", "2", "--hidden", "8"], capsys)
    assert code == 2 and len(calls) == 1
    assert_one_line(err, ("run", "cannot write", "No space left on device"))
    assert snapshot(tmp_path, ("run",)) == before
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


def test_save_tensors_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import torch

    from difffeat.spine.run import save_tensors

    full_safetensors(monkeypatch, [])
    with pytest.raises(UserError, match=r"^.*: cannot write model.safetensors \(No space left on device\)$"):
        save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def full_lock_files(monkeypatch) -> None:
    """os.write failing with ENOSPC on difffeat's lock files (the disk filled up just before the lock was taken)."""
    import errno

    real = os.write

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".lock-r"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr("difffeat.utils.lock.os.write", write)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell a lock file's descriptor")
@pytest.mark.parametrize("command", ["extract", "store merge"])
def test_disk_full_on_the_lock_file_is_one_line_and_leaves_no_lock(command, tmp_path, capsys, monkeypatch):
    if command == "extract":
        argv = ["extract", str(images(tmp_path / "imgs", 1)), "--out", str(tmp_path / "out"), "--model",
                "mini-random", "--layer", "mid_block"]
    else:
        parts = sharded_stores(tmp_path)
        argv = ["store", "merge", str(tmp_path / "out"), *map(str, parts)]
    full_lock_files(monkeypatch)
    before = snapshot(tmp_path, ("out",))
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line(err, ("out", "cannot write the lock file .lock-r000", "No space left on device"))
    assert snapshot(tmp_path, ("out",)) == before
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


# ------------------------------------------------------------------------------ item 1: an atomic merge
def sharded_stores(tmp: Path, jobs: int = 3, per_job: int = 3) -> list[Path]:
    """`jobs` stores as sharded extraction jobs write them (one shard per image), one with a failure record."""
    parts = []
    for j in range(jobs):
        path = tmp / f"part{j}"
        config = {"model": "synthetic", "layers": ["x"], "shard_index": j, "num_shards": jobs}
        with FeatureStoreWriter(path, config, shard_size=1) as w:
            for i in range(per_job):
                k = j + jobs * i
                w.add(f"{k:03d}.png", {"x": np.full((2, 3, 3), k, np.float32)})
            if j == 1:
                w.fail("zz-broken.png", "not an image")
        parts.append(path)
    return parts


def merged_state(out: Path) -> dict:
    """Everything a merged store is, apart from when and how fast it was made."""
    store = FeatureStore(out)
    manifest = {k: v for k, v in store.manifest.items() if k not in ("created", "versions")}
    report = {k: v for k, v in json.loads((out / "report.json").read_text()).items() if k != "merge_seconds"}
    return {"files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.name.startswith(".lock-r")),
            "inodes": sorted(os.stat(p).st_ino for p in (out / "shards").iterdir()),
            "features": {k: {n: a.tolist() for n, a in store[k].items()} for k in store.keys()},
            "failures": store.failures, "manifest": manifest, "report": report}


# `store merge` in a process of its own that kills itself with SIGKILL (kill -9) just before its K-th change to the
# file system (a file or folder made, written, linked, renamed or removed): every state a kill can leave on disk is
# one of these points. It prints how many changes it made when nothing killed it.
KILLED_MERGE = textwrap.dedent("""
    import builtins, io, os, signal, sys

    kill_at, count, counting = int(sys.argv[1]), 0, False

    def counted(fn):
        def call(*args, **kwargs):
            global count
            if counting:
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                count += 1
            return fn(*args, **kwargs)
        return call

    for name in ("link", "symlink", "replace", "rename", "unlink", "mkdir", "rmdir", "open", "chmod", "ftruncate"):
        setattr(os, name, counted(getattr(os, name)))
    plain_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        return (counted(plain_open) if set(mode) & set("wax+") else plain_open)(file, mode, *args, **kwargs)

    builtins.open = io.open = open_
    from difffeat.cli import build_parser, main
    import difffeat.store.merge, tqdm.auto, safetensors.numpy
    build_parser()  # every import made before the count starts
    counting = True
    code = main(["store", "merge", *sys.argv[2:]])  # no --quiet, which imports diffusers (seconds)
    print(count, flush=True)
    sys.exit(code)
""")


def killed_merge(out: Path, parts: list[Path], kill_at: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_MERGE, str(kill_at), str(out), *map(str, parts)],
                          capture_output=True, text=True, timeout=300)


def test_a_killed_merge_is_refused_by_every_reader_and_resume_finishes_it(tmp_path, capsys):
    """kill -9 at random points of `store merge`, then every reader refuses what is there (or it is whole), the
    merge again without --resume is refused naming it, and with --resume it equals an uninterrupted merge."""
    parts = sharded_stores(tmp_path)
    sources = snapshot(tmp_path)
    ref = tmp_path / "ref"
    done = killed_merge(ref, parts, kill_at=-1)
    assert done.returncode == 0, done.stderr
    changes = int(done.stdout.split()[-1])
    want = merged_state(ref)
    root, _ = seg_root(tmp_path / "seg")
    rng = random.Random(27)  # one random point in each fifth of the merge: early, half-linked, writing, letting go
    points = sorted({rng.randrange(changes * i // 5, changes * (i + 1) // 5) for i in range(5)})
    unfinished = 0
    for kill_at in points:
        out = tmp_path / f"m{kill_at}"
        killed = killed_merge(out, parts, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        if (out / "manifest.json").exists() and not (out / MERGING).exists():
            assert merged_state(out) == want, kill_at  # killed as it let go of its lock: whole
        elif out.exists():  # nothing a reader would take for a store
            with pytest.raises(UserError):
                FeatureStore(out)
            code, _, err = run_cli(["inspect", str(out), "--verify"], capsys)
            assert code == 2 and "Traceback" not in err
            code, _, err = run_cli(["train-seg", "--features", str(out), "--masks", str(root), "--out",
                                    str(tmp_path / f"run{kill_at}"), "--iterations", "1"], capsys)
            assert code == 2 and str(out) in err and "Traceback" not in err, err
        if (out / MERGING).exists():  # the merge again: refused without --resume, naming it
            unfinished += 1
            code, _, err = run_cli(["store", "merge", str(out), *map(str, parts)], capsys)
            assert code == 2
            assert_one_line(err, (str(out), "unfinished store merge", "--resume"))
        code, _, err = run_cli(["store", "merge", str(out), *map(str, parts), "--resume"], capsys)
        assert code == 0, (kill_at, err)
        assert merged_state(out) == want, kill_at
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no lock or temporary file is left"
    assert unfinished >= 2, (points, "most kills should land inside the merge")
    assert snapshot(tmp_path, tuple(p.name for p in tmp_path.iterdir() if not p.name.startswith("part"))) == sources


def test_a_reader_names_an_unfinished_merge_and_how_to_finish_it(tmp_path):
    from difffeat.store.merge import merge_stores

    parts = sharded_stores(tmp_path)
    merge_stores(tmp_path / "m", parts)
    (tmp_path / "m" / MERGING).write_text((tmp_path / "m" / "manifest.json").read_text())  # killed before the end
    with pytest.raises(UserError, match=r"m: an unfinished store merge .* --resume"):
        FeatureStore(tmp_path / "m")
    report = merge_stores(tmp_path / "m", parts, resume=True)
    assert report["images"] == 9 and len(FeatureStore(tmp_path / "m")) == 9


def test_resume_of_a_finished_merge_changes_nothing_and_other_stores_are_refused(tmp_path, capsys):
    parts = sharded_stores(tmp_path)
    out = tmp_path / "m"
    assert run_cli(["store", "merge", str(out), *map(str, parts)], capsys)[0] == 0
    before = snapshot(tmp_path)
    code, said, _ = run_cli(["store", "merge", str(out), *map(str, parts), "--resume"], capsys)
    assert code == 0 and "already holds this merge" in said
    assert snapshot(tmp_path) == before
    code, _, err = run_cli(["store", "merge", str(out), *map(str, parts[:2]), "--resume"], capsys)
    assert code == 2 and "merged_from" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before
    (out / MERGING).write_text((out / "manifest.json").read_text())  # an unfinished merge of all three
    code, _, err = run_cli(["store", "merge", str(out), *map(str, parts[:2]), "--resume"], capsys)
    assert code == 2 and "merged_from" in err
    assert run_cli(["store", "merge", str(out), *map(str, parts[:2]), "--overwrite"], capsys)[0] == 0
    assert len(FeatureStore(out)) == 6 and not (out / MERGING).exists()
