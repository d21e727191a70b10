import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from difffeat.cli import main
from difffeat.data.shapes_lt import synthesize
from difffeat.store.feature_store import FeatureStore

MODEL = "mini-random"  # same code path as "mini", no dependence on trained weights
# Kept small (this file was a third of the suite's time): N_ALL images, N_TRAIN of them in train/ and one in each of
# val/ and test/; one timestep wherever the number of timesteps is not what a test checks.
N_ALL, N_TRAIN = 8, 6


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    """N_TRAIN Shapes-LT images with caption sidecars."""
    return synthesize(tmp_path_factory.mktemp("run") / "shapes", n=N_ALL, seed=4) / "train" / "images"


def _reference_args(images, out):
    return ["--quiet", "extract", str(images), "--out", str(out), "--model", MODEL, "--layer", "mid_block",
            "--t", "200", "--clean"]


@pytest.fixture(scope="module")
def reference_store(train_images, tmp_path_factory):
    """A store of the train images made once for the tests that read it; a test that changes a store copies it."""
    out = tmp_path_factory.mktemp("reference") / "store"
    assert main(_reference_args(train_images, out)) == 0
    return out


def _arrays_equal(a: FeatureStore, b: FeatureStore, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a.keys():
        fa, fb = a[k], b[k]
        assert fa.keys() == fb.keys()
        for layer in fa:
            np.testing.assert_allclose(fa[layer], fb[layer], rtol=rtol, atol=1e-5 if rtol else 0)


def test_extract_cli_end_to_end_matches_the_library(train_images, tmp_path):
    from difffeat import load_pipeline
    from difffeat.data.images import load_image, sidecar_caption
    from difffeat.extraction.extract import FeatureExtractor

    out = tmp_path / "store"
    rc = main(["--quiet", "extract", str(train_images), "--out", str(out), "--model", MODEL, "--layer", "dift",
               "--layer", "down_blocks.1", "--t", "50", "--t", "300", "--ensemble", "2", "--prompt-from", "sidecar",
               "--batch-size", "3", "--shard-size", "5"])
    assert rc == 0
    store = FeatureStore(out)
    assert len(store) == N_TRAIN and store.keys()[0] == "000000.png"
    assert store.layers == ["down_blocks.1@50", "up_blocks.1@50", "down_blocks.1@300", "up_blocks.1@300"]
    m = store.manifest
    assert m["model"] == MODEL and m["timesteps"] == [50, 300] and m["seed"] == 0
    assert m["layers"] == ["down_blocks.1", "up_blocks.1"] and m["resolution"] == [64, 64]
    assert "torch" in m["versions"] and "diffusers" in m["versions"]
    entry = store.entry("000000.png")
    assert entry["shard"].startswith("shards/shard-r000-") and entry["position"] == 0
    assert entry["layers"]["up_blocks.1@50"] == {"shape": [64, 16, 16], "dtype": "float32"}
    report = json.loads((out / "report.json").read_text())
    assert report["extracted"] == N_TRAIN and report["failed"] == []
    # The same features straight from the library, keyed and prompted the same way.
    keys = store.keys()[:4]
    fe = FeatureExtractor(load_pipeline(MODEL), ["dift", "down_blocks.1"], timesteps=(50, 300), ensemble=2)
    ref = fe.extract([load_image(train_images / k) for k in keys],
                     prompts=[sidecar_caption(train_images / k) for k in keys], keys=keys)
    for i, k in enumerate(keys):
        for layer in store.layers:
            np.testing.assert_allclose(store[k][layer], ref[layer][i].numpy(), rtol=1e-5, atol=1e-5)
    # inspect and viz work on it.
    assert main(["inspect", str(out)]) == 0
    assert main(["viz", str(out), "--layer", "up_blocks.1@50", "--out", str(tmp_path / "pca.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "pca.png").mode == "RGB"


def test_bad_files_are_skipped_and_reported(train_images, tmp_path, capsys):
    src = tmp_path / "imgs"
    shutil.copytree(train_images, src)
    (src / "zero.png").write_bytes(b"")
    (src / "notes.png").write_text("not an image")
    data = (src / "000001.png").read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "store"
    assert main(["--quiet", "extract", str(src), "--out", str(out), "--model", MODEL, "--layer", "up_blocks.1"]) == 0
    report = json.loads((out / "report.json").read_text())
    reasons = {f["key"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == {"zero.png", "notes.png", "truncated.png"}
    assert "empty" in reasons["zero.png"] and "not an image" in reasons["notes.png"]
    assert "truncated" in reasons["truncated.png"]
    store = FeatureStore(out)
    assert len(store) == N_TRAIN and "zero.png" not in store
    assert {f["key"] for f in store.failures} == set(reasons)
    err = capsys.readouterr().err
    assert "zero.png" in err and "Traceback" not in err


def test_existing_store_with_other_config_is_kept(train_images, reference_store, tmp_path, capsys):
    out = tmp_path / "store"
    shutil.copytree(reference_store, out)  # made by main(base), which returned 0
    base = _reference_args(train_images, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(base + ["--seed", "1"]) == 2
    assert "differ" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(base) == 2, "same config needs --resume"
    assert main(base + ["--resume"]) == 0  # nothing left to do
    assert main(base + ["--seed", "1", "--overwrite"]) == 0
    assert FeatureStore(out).manifest["seed"] == 1


def test_run_repeats_from_its_manifest(reference_store, tmp_path):
    a, b = reference_store, tmp_path / "b"  # a: made with --layer mid_block --t 200 --clean
    assert main(["--quiet", "extract", "--config", str(a / "manifest.json"), "--out", str(b)]) == 0
    _arrays_equal(FeatureStore(a), FeatureStore(b), rtol=0)
    assert FeatureStore(b).manifest["config"]["noise"] is False


def _cmd(images, out, *extra):
    return [sys.executable, "-m", "difffeat", "--quiet", "extract", str(images), "--out", str(out), "--model", MODEL,
            "--layer", "up_blocks.1", "--t", "600", "--ensemble", "3", "--batch-size", "1", "--shard-size", "2", *extra]


def test_killed_then_resumed_run_equals_an_uninterrupted_one(train_images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_cmd(train_images, full), check=True, env=env, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(_cmd(train_images, part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Until one complete shard (2 images) is there: its temporary file, `.shard-….tmp-PID.safetensors`, is not.
    while time.time() < deadline and not list((part / "shards").glob("shard-*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "report.json").exists(), "the run was interrupted"
    done = len(FeatureStore(part))
    assert 0 < done < N_TRAIN
    resumed = subprocess.run(_cmd(train_images, part, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((part / "report.json").read_text())
    assert report["already_done"] == done and report["extracted"] == N_TRAIN - done
    _arrays_equal(FeatureStore(part), FeatureStore(full), rtol=0)


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29518"],
}


@pytest.fixture(scope="module")
def one_process_store(train_images, tmp_path_factory):
    """The one-process store both launchers' two-process stores are compared with (read only): made here, in this
    process (no interpreter to start), as `_cmd` makes it; the comparison allows float rounding."""
    one = tmp_path_factory.mktemp("one") / "store"
    assert main(_cmd(train_images, one, "--batch-size", "4")[3:]) == 0
    return one


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_make_the_one_process_store(train_images, one_process_store, tmp_path, launcher):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    one, two = one_process_store, tmp_path / "two"
    proc = subprocess.run(LAUNCHERS[launcher] + _cmd(train_images, two)[1:], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((two / "report.json").read_text())
    assert [p["extracted"] for p in report["processes"]] == [N_TRAIN // 2, N_TRAIN // 2]
    assert {p.name.split("-")[1] for p in (two / "shards").glob("*.safetensors")} == {"r000", "r001"}
    _arrays_equal(FeatureStore(two), FeatureStore(one))


def test_imagefolder_takes_listed_images_with_label_prompts(train_images, tmp_path):
    from difffeat import load_pipeline
    from difffeat.data.images import load_image
    from difffeat.extraction.extract import FeatureExtractor

    root = train_images.parent.parent
    out = tmp_path / "store"
    assert main(["--quiet", "extract", str(root), "--out", str(out), "--model", MODEL, "--layer", "mid_block",
                 "--prompt-from", "label", "--label-template", "a {label}", "--clean"]) == 0
    store = FeatureStore(out)
    assert len(store) == N_ALL, "train + val + test images, no masks"
    assert all("/images/" in k for k in store.keys())
    rows = list(csv.DictReader(open(root / "test" / "metadata.csv")))
    keys = [f"test/{r['file_name']}" for r in rows]
    fe = FeatureExtractor(load_pipeline(MODEL), ["mid_block"], noise=False)
    ref = fe.extract([load_image(root / k) for k in keys], prompts=[f"a {r['label']}" for r in rows], keys=keys)
    for i, k in enumerate(keys):
        np.testing.assert_allclose(store[k]["mid_block"], ref["mid_block"][i].numpy(), rtol=1e-5, atol=1e-5)


def test_hf_dataset_source(train_images, tmp_path):
    root = train_images.parent.parent
    out = tmp_path / "store"
    assert main(["--quiet", "extract", f"hf:{root}:validation", "--out", str(out), "--model", MODEL,
                 "--layer", "mid_block", "--prompt-from", "csv", "--caption-column", "fine_caption"]) == 0
    store = FeatureStore(out)
    assert len(store) == 1 and all(k.startswith("validation/") for k in store.keys())
    assert main(["--quiet", "extract", f"hf:{tmp_path / 'nothing-here'}", "--out", str(tmp_path / "x"),
                 "--model", MODEL]) == 2


def test_bf16_model_fp16_store_and_concat(train_images, tmp_path, capsys):
    out32, out16 = tmp_path / "fp32", tmp_path / "bf16"
    base = ["--quiet", "extract", str(train_images), "--model", MODEL, "--layer", "down_blocks.1",
            "--layer", "up_blocks.1", "--clean", "--concat"]
    assert main(base + ["--out", str(out32)]) == 0
    assert main(base + ["--out", str(out16), "--dtype", "bf16", "--fp16-store"]) == 0
    a, b = FeatureStore(out32), FeatureStore(out16)
    assert a.layers == ["concat"] and a.shapes["concat"] == (128, 16, 16)  # 64 + 64 channels at 16×16
    assert b.dtypes["concat"] == "float16" and a.dtypes["concat"] == "float32"
    x, y = a[a.keys()[0]]["concat"], b[b.keys()[0]]["concat"].astype(np.float32)
    assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.05, "bf16 compute stays close to fp32"
    (tmp_path / "afile").write_text("")
    assert main(["--quiet", "extract", str(train_images), "--model", MODEL,
                 "--out", str(tmp_path / "afile" / "store")]) == 2
    assert "cannot create folder" in capsys.readouterr().err
