"""Issue #27, round two, for heads, reports and adapters: heads pin their feature stores (item 2: --resume refuses a
store that changed, eval-seg / eval-cls refuse another extraction's features but take another split, report shows the
check), one lock per run folder (item 2: a second training of one run is refused naming the holder), report on a
sweep and on a stopped or unfinished head run (item 6), LoRA ranks bounded by the model and a transformer refused in
one line (item 7), mask folders that are symbolic links followed while names stay confined (item 9)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from difffeat.cli import main
from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStoreWriter
from downstream.seg.config import SegTrainConfig
from downstream.seg.train import train_seg

SIZE = 16
KEYS = [f"images/{i}.png" for i in range(4)]


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), "L").save(path)


def mask(i):
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[: 4 + i] = 1
    m[-3:] = 2
    return m


def write_store(path, keys=KEYS, seed=0, overwrite=False, **config):
    """A store of random [4, 4, 4] features under layer "x"; `config` entries override the manifest's config."""
    config = {"model": "test", "layers": ["x"], "timesteps": [50], "resolution": [SIZE, SIZE], "resize": "stretch",
              "images": None, **config}
    with FeatureStoreWriter(path, config, overwrite=overwrite) as w:
        for i, key in enumerate(keys):
            w.add(key, {"x": np.random.default_rng(seed * 1000 + i).normal(size=(4, 4, 4)).astype(np.float32)})
    return path


@pytest.fixture
def root(tmp_path):
    """An images/ + masks/ root (3 classes) beside a train store of its images."""
    data = tmp_path / "data"
    for i in range(4):
        write_png(data / "images" / f"{i}.png", np.full((SIZE, SIZE), 7))
        write_png(data / "masks" / f"{i}.png", mask(i))
    (data / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    return data


def seg_config(store, data, out, **kw):
    return SegTrainConfig.from_dict({"features": [str(store)], "masks": str(data), "out": str(out), "iterations": 4,
                                     "batch_size": 2, "hidden": 8, "checkpoint_every": 1, **kw})


def run_cli(argv, capsys):
    rc = main(["--quiet", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


# ------------------------------------------------------------------------- item 2: heads pin their stores
def test_resume_refuses_a_store_re_extracted_with_other_settings(root, tmp_path, capsys):
    store = write_store(tmp_path / "feat", images=str(root))
    cfg = seg_config(store, root, tmp_path / "run")
    train_seg(cfg, progress=False, stop_after=1)
    train_seg(cfg, progress=False, resume=True, stop_after=1)  # the same store: it goes on
    # Re-extracted at another timestep and another model (same keys, same shapes): the run would go on silently.
    write_store(store, overwrite=True, images=str(root), model="other", timesteps=[100])
    snapshot = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*"))
    rc, err = run_cli(["train-seg", "--config", str(tmp_path / "run" / "config.json"), "--out", str(tmp_path / "run"),
                       "--resume"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "was re-extracted with other settings (differs in: model, timesteps) since the run" in err
    assert err.startswith(f"difffeat: error: {store}:")
    assert sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*")) == snapshot
    saved = json.loads((tmp_path / "run" / "config.json").read_text())  # what the run recorded of its store
    record = saved["stores"][0]
    assert {"features_hash", "shards_digest", "features"} <= set(record) and record["images"] == 4


def test_resume_refuses_a_store_whose_shards_changed(root, tmp_path):
    store = write_store(tmp_path / "feat", images=str(root))
    cfg = seg_config(store, root, tmp_path / "run")
    train_seg(cfg, progress=False, stop_after=1)
    write_store(store, overwrite=True, seed=1, images=str(root))  # the same settings, other numbers
    with pytest.raises(UserError, match="its shards changed"):
        train_seg(cfg, progress=False, resume=True)


def test_eval_seg_refuses_another_extraction_and_takes_another_split(root, tmp_path, capsys):
    from downstream.seg.evaluate import eval_seg

    data = {"layout": "imagefolder", "root": str(root), "split": "train"}
    train = write_store(tmp_path / "train", images=str(root / "train"), data=data)
    run = train_seg(seg_config(train, root, tmp_path / "run", iterations=2), progress=False)
    # A val store beside it: the same extraction of other images (another images folder and split).
    val = write_store(tmp_path / "val", seed=3, images=str(root / "val"), data={**data, "split": "val"})
    scores = eval_seg(run, [str(val)], str(root), progress=False, out=str(tmp_path / "ev"))
    assert scores["images"] == 4
    other = write_store(tmp_path / "other", seed=3, images=str(root / "val"), model="another-model", timesteps=[500])
    rc, err = run_cli(["eval-seg", "--run", str(run), "--features", str(other), "--masks", str(root),
                       "--out", str(tmp_path / "ev2")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "extracted otherwise" in err and "differs in: model, timesteps" in err
    assert not (tmp_path / "ev2").exists()


def test_report_shows_whether_the_stores_are_still_those_trained_on(root, tmp_path):
    from difffeat.report.build import build_page, find_runs

    store = write_store(tmp_path / "feat", images=str(root))
    run = train_seg(seg_config(store, root, tmp_path / "run", iterations=2), progress=False)
    assert "unchanged since training" in build_page(find_runs([run]))
    write_store(store, overwrite=True, images=str(root), timesteps=[300])
    assert "changed since training: re-extracted with other settings (differs in: timesteps)" in \
        build_page(find_runs([run]))


HOLD = textwrap.dedent("""
    import sys, time
    from difffeat.utils.lock import FolderLock
    lock = FolderLock(sys.argv[1], "a run").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


@contextlib.contextmanager
def held(lock_file):
    """Another process holding the lock `lock_file` (a training of the same run); yields its process id."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_training_of_one_run_is_refused_naming_the_holder(root, tmp_path, capsys):
    store = write_store(tmp_path / "feat", images=str(root))
    cfg = seg_config(store, root, tmp_path / "run")
    train_seg(cfg, progress=False, stop_after=1)
    assert not (tmp_path / "run" / ".lock").exists()  # let go when the call returns
    with held(tmp_path / "run" / ".lock") as pid:
        rc, err = run_cli(["train-seg", "--config", str(tmp_path / "run" / "config.json"), "--out",
                           str(tmp_path / "run"), "--resume"], capsys)
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"being written by process {pid}" in err
        assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 1
    train_seg(cfg, progress=False, resume=True)  # the holder is gone: its lock is taken over
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / ".lock").exists()


def _labels(path, keys):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label"])
        w.writerows((k, ["cat", "dog"][i % 2]) for i, k in enumerate(keys))
    return str(path)


def test_train_cls_and_eval_cls_pin_their_stores(tmp_path, capsys):
    from downstream.cls.config import ClsTrainConfig
    from downstream.cls.evaluation import eval_cls
    from downstream.cls.train import train_cls

    keys = [f"train/{i:02d}.png" for i in range(16)] + [f"test/{i:02d}.png" for i in range(8)]
    store = write_store(tmp_path / "feat", keys=keys)
    labels = _labels(tmp_path / "labels.csv", keys)
    cfg = ClsTrainConfig(features=[str(store)], labels=labels, split="train/", epochs=3, batch_size=4,
                         out=str(tmp_path / "run"))
    train_cls(cfg, progress=False, stop_after=1)
    write_store(store, keys=keys, overwrite=True, model="other")
    with pytest.raises(UserError, match="re-extracted with other settings .differs in: model. since the run"):
        train_cls(cfg, progress=False, resume=True)
    write_store(store, keys=keys, overwrite=True)  # the very store again (same settings, same numbers)
    with held(tmp_path / "run" / ".lock") as pid:  # one training of a run at a time, for train-cls too
        with pytest.raises(UserError, match=f"being written by process {pid}"):
            train_cls(cfg, progress=False, resume=True)
    train_cls(cfg, progress=False, resume=True)
    eval_cls(tmp_path / "run", [str(store)], labels, split="test/")
    other = write_store(tmp_path / "other", keys=keys, layers=["x"], timesteps=[900])
    with pytest.raises(UserError, match="extracted otherwise .*differs in: timesteps"):
        eval_cls(tmp_path / "run", [str(other)], labels, split="test/", out=tmp_path / "ev")


# ------------------------------------------------------------------------- weak cases of the heads
def test_stores_of_other_images_are_refused_and_one_store_twice_is_said(root, tmp_path):
    store = write_store(tmp_path / "feat", images=str(root))
    others = write_store(tmp_path / "others", keys=["elsewhere/0.png", "elsewhere/1.png"], images=str(root))
    cfg = SegTrainConfig.from_dict(dict(features=[str(store), str(others)], masks=str(root), out=str(tmp_path / "run"),
                                        iterations=1, batch_size=2, hidden=8))
    with pytest.raises(UserError, match="share no image key"):
        train_seg(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    twice = SegTrainConfig.from_dict({**cfg.to_dict(), "features": [str(store), str(store)]})
    with pytest.warns(UserWarning, match="holds the same features as .* given twice"):
        train_seg(twice, progress=False)


def test_tkpr_k_is_bounded_by_the_classes_and_a_label_typo_is_said(tmp_path, capsys):
    keys = [f"train/{i:02d}.png" for i in range(16)]
    store = write_store(tmp_path / "feat", keys=keys)
    labels = _labels(tmp_path / "labels.csv", keys)
    rc, err = run_cli(["train-cls", "--features", str(store), "--labels", labels, "--method", "tkpr", "--tkpr-k",
                       "50", "--epochs", "1", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--tkpr-k: must be ≤ 1" in err, err
    assert not (tmp_path / "run").exists()
    with open(tmp_path / "typo.csv", "w") as f:
        f.write("key,label\n" + "".join(f"{k},{'cirlce' if i == 3 else ['circle', 'square'][i % 2]}\n"
                                        for i, k in enumerate(keys)))
    from downstream.cls.config import ClsTrainConfig
    from downstream.cls.train import train_cls

    cfg = ClsTrainConfig(features=[str(store)], labels=str(tmp_path / "typo.csv"), epochs=1, batch_size=4,
                         out=str(tmp_path / "typo"))
    with pytest.warns(UserWarning, match="class 'cirlce' has one training sample and is spelled like 'circle'"):
        train_cls(cfg, progress=False)


# ------------------------------------------------------------------------- item 6: report on sweeps, stopped runs
def make_sweep(folder):
    """A sweep run folder as `difffeat sweep` writes it (marker kind "sweep", ranking.json, best.json, a heat map)."""
    folder.mkdir(parents=True)
    config = {"images": "shapes/train", "labels": "shapes", "model": "mini", "probe": "ridge", "seed": 0}
    (folder / "config.json").write_text(json.dumps({"format": "difffeat-run/1", "kind": "sweep", "config": config}))
    rows = [{"rank": r, "config": f"plain/noise-x1/t{t}/up_blocks.1", "variant": "plain", "techniques": "(none)",
             "noise": "noise-x1", "t": t, "layer": "up_blocks.1", "channels": 64, "grid": "16x16", "miou": m,
             "low": m - 0.05, "high": m + 0.05, "width": 0.1, "rung": 1, "images": 4, "status": "final"}
            for r, (t, m) in enumerate(((50, 0.61), (300, 0.42)), 1)]
    (folder / "ranking.json").write_text(json.dumps({"task": "seg", "metric": "miou", "probe": "ridge", "images": 4,
                                                     "ranking": rows, "greedy": None, "config": config}))
    (folder / "best.json").write_text(json.dumps({"model": "mini", "layers": ["up_blocks.1"], "timesteps": [50]}))
    Image.new("RGB", (40, 20), (10, 120, 200)).save(folder / "heatmap-plain.png")


def test_report_shows_a_sweep_as_a_sweep(tmp_path):
    from difffeat.report.build import build_page, find_runs

    make_sweep(tmp_path / "sweep")
    found = find_runs([tmp_path / "sweep"])
    assert [f.kind for f in found] == ["sweep"]
    page = build_page(found)
    assert "Sweep · " in page and "plain/noise-x1/t50/up_blocks.1" in page and "0.61" in page
    assert "GATE" not in page and "accepted: none" not in page and "<td>?</td>" not in page
    assert "sweep heat map, variant plain" in page and "best.json" in page


def test_report_says_why_a_seg_run_has_no_scores(root, tmp_path):
    from difffeat.report.build import build_page, find_runs

    store = write_store(tmp_path / "feat", images=str(root))
    unfinished = tmp_path / "unfinished"
    train_seg(seg_config(store, root, unfinished), progress=False, stop_after=1)
    diverged = tmp_path / "diverged"
    with pytest.raises(UserError, match="became"):
        train_seg(seg_config(store, root, diverged, iterations=20, log_every=1, lr=1e9), progress=False)
    status = json.loads((diverged / "status.json").read_text())
    assert status["state"] == "stopped" and "became" in status["reason"]
    finished = train_seg(seg_config(store, root, tmp_path / "finished", iterations=1), progress=False)
    page = build_page(find_runs([unfinished, diverged, finished]))
    assert "Unfinished: trained to iteration 1 of 4" in page and "--resume" in page
    assert f"Stopped before the end: {status['reason']}" in page
    assert "No scores: the run finished without a validation split" in page
    assert "No scores yet" not in page
    # A resumed call forgets why an earlier one stopped.
    (unfinished / "status.json").write_text(json.dumps({"state": "stopped", "reason": "the disk was full"}))
    train_seg(seg_config(store, root, unfinished), progress=False, resume=True, stop_after=1)
    assert not (unfinished / "status.json").exists()


# ------------------------------------------------------------------------- item 7: LoRA ranks and families
@pytest.fixture(scope="module")
def lora_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "images"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("flags, says", [
    (["--rank", "100000"], "--rank: must be ≤ 128 for model mini"),
    (["--conv", "--conv-rank", "100000"], "--conv-rank: must be ≤ 128 for the convolutions of model mini"),
    (["--conv-rank", "8"], "--conv-rank: sets the rank of the convolution adapters, which only --conv adds"),
])
def test_lora_ranks_beyond_the_model_are_refused_before_any_work(lora_images, tmp_path, capsys, flags, says):
    out = tmp_path / "lora"
    rc, err = run_cli(["lora", "train", str(lora_images), "--out", str(out), "--steps", "1", *flags], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_lora_train_on_a_transformer_is_one_line(lora_images, tmp_path, capsys):
    out = tmp_path / "lora"
    rc, err = run_cli(["lora", "train", str(lora_images), "--out", str(out), "--steps", "1", "--model", "mini-dit"],
                      capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "SD3Transformer2DModel, not a UNet" in err and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------- item 9: data sets made of links
def test_a_masks_folder_that_is_a_link_is_followed_and_names_stay_confined(root, tmp_path):
    from downstream.seg.classes import load_classes
    from downstream.seg.data import SegDataset

    elsewhere = tmp_path / "elsewhere" / "masks"
    elsewhere.parent.mkdir()
    os.replace(root / "masks", elsewhere)
    os.symlink(elsewhere, root / "masks")  # the data set assembled from links
    store = write_store(tmp_path / "feat", images=str(root))
    ds = SegDataset([store], root, load_classes(root / "classes.json"))
    assert ds.keys == KEYS and np.array_equal(ds[1]["mask"].numpy(), mask(1))
    run = train_seg(seg_config(store, root, tmp_path / "run", iterations=1), progress=False)
    assert (run / "model.safetensors").is_file()
    # metadata.csv naming the masks through the link works; a name climbing out or an absolute one is refused.
    rows = ["file_name,mask_file_name"] + [f"images/{i}.png,masks/{i}.png" for i in range(4)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    assert SegDataset([store], root, load_classes(root / "classes.json")).keys == KEYS
    write_png(tmp_path / "outside.png", mask(0))
    for bad in ("../outside.png", "masks/../../outside.png", str(tmp_path / "outside.png")):
        (root / "metadata.csv").write_text(f"file_name,mask_file_name\nimages/0.png,{bad}\n")
        with pytest.raises(UserError, match="mask_file_name"):
            SegDataset([store], root, load_classes(root / "classes.json"))
    (root / "metadata.csv").unlink()
    escaping = write_store(tmp_path / "esc", keys=["../outside.png"], images=str(root))
    with pytest.raises(UserError, match="leads outside the mask folder"):
        SegDataset([escaping], root, load_classes(root / "classes.json"))
