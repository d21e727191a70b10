"""train-cls / eval-cls end to end on a tiny synthetic feature store: scores against a direct computation, exact
resume, the fusion options, and bad input (one clear line, exit 2)."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from difffeat.cli import main
from difffeat.store import FeatureStore, FeatureStoreWriter
from downstream.cls_data import pool
from downstream.test_agnostic import shifted_test_sets
from downstream.train_cls import ClsTrainConfig, Objective, load_run, lr_factor, train_cls

NAMES = ["cat", "dog", "emu", "fox"]
TRAIN_COUNTS = [40, 16, 6, 3]
TEST_PER_CLASS = 10


def _write_labels(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label"])
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two stores (sources) of the same images: layers "a" [6, 2, 2] and "b" [3, 1, 1], long-tailed train/
    keys and a balanced test/ split; labels.csv names every key's class."""
    root = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1.5, (4, 6))
    rows = []
    writers = [FeatureStoreWriter(root / name, {"model": "synthetic", "variant": name}) for name in ("s1", "s2")]
    for split, counts in (("train", TRAIN_COUNTS), ("test", [TEST_PER_CLASS] * 4)):
        for c, n in enumerate(counts):
            for i in range(n):
                key = f"{split}/{NAMES[c]}-{i:02d}.png"
                x = means[c][:, None, None] + rng.normal(0, 1.0, (6, 2, 2))
                writers[0].add(key, {"a": x.astype(np.float32), "b": x[:3, :1, :1].astype(np.float32)})
                writers[1].add(key, {"a": (x[::-1] ** 2).astype(np.float32)})
                rows.append((key, NAMES[c]))
    for w in writers:
        w.close()
    labels = _write_labels(root / "labels.csv", rows)
    return root, labels, rows


def _pooled(store_path, keys):
    """Global average pooling, written out directly (not through cls_data)."""
    store = FeatureStore(store_path)
    return np.stack([np.concatenate([store[k][lay].astype(np.float64).mean((1, 2)) for lay in store.layers])
                     for k in keys]).astype(np.float32)


def test_train_cls_and_eval_cls_cli_end_to_end(world, capsys):
    root, labels, rows = world
    run = root / "run-la"
    argv = ["--quiet", "train-cls", "--features", str(root / "s1"), "--labels", labels, "--split", "train/",
            "--test-split", "test/", "--method", "la", "--epochs", "12", "--batch-size", "16",
            "--checkpoint-every", "5", "--dirichlet-draws", "1", "--out", str(run)]
    assert main(argv) == 0
    assert "mean accuracy over 14 test distributions" in capsys.readouterr().out
    for name in ("config.json", "report.json", "model.safetensors", "nc.json", "history.json", "curves.png",
                 "metrics.json", "accuracy.png", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["head"] == "linear" and saved["classes"]["names"] == NAMES
    assert saved["classes"]["train_counts"] == TRAIN_COUNTS and "torch" in saved["versions"]
    assert saved["sources"] == [{"name": "s1", "store": 0, "layers": ["a", "b"], "dim": 9}]
    assert len(json.loads((run / "history.json").read_text())) == 12

    # every accuracy against a direct computation: pooled features, the saved model, the resampled sets
    metrics = json.loads((run / "metrics.json").read_text())
    test_keys = sorted(k for k, _ in rows if k.startswith("test/"))
    y = np.array([NAMES.index(k.split("/")[1].split("-")[0]) for k in test_keys])
    _, _, model = load_run(run)
    with torch.no_grad():
        pred = model([torch.as_tensor(_pooled(root / "s1", test_keys))]).argmax(1).numpy()
    sets = shifted_test_sets(y, TRAIN_COUNTS, num_classes=4, dirichlet_draws=1, seed=0)
    assert [r["name"] for r in metrics["distributions"]] == [s.name for s in sets]
    for r, s in zip(metrics["distributions"], sets):
        assert r["counts"] == s.counts.tolist()
        assert r["accuracy"]["default"] == pytest.approx((pred[s.indices] == y[s.indices]).mean())
    accs = [r["accuracy"]["default"] for r in metrics["distributions"]]
    assert metrics["mean_accuracy"]["default"] == pytest.approx(np.mean(accs))
    assert metrics["full_test"]["accuracy"] == pytest.approx((pred == y).mean())
    assert set(metrics["nc"]["head"]) >= {"nc1", "nc2_etf_distance", "nc3", "nc4", "tail/nc1"}

    assert main(["--quiet", "eval-cls", "--run", str(run), "--features", str(root / "s1"), "--labels", labels,
                 "--split", "test/"]) == 0
    assert "40 images: mean accuracy" in capsys.readouterr().out
    again = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert again["mean_accuracy"] == metrics["mean_accuracy"] and (run / "eval-test" / "accuracy.png").is_file()
    # a test set extracted into another folder is fine; the labels CSV's keys are then the test set
    copy = root / "s1-copy"
    shutil.copytree(root / "s1", copy)
    test_csv = _write_labels(root / "test.csv", [r for r in rows if r[0].startswith("test/")])
    assert main(["--quiet", "eval-cls", "--run", str(run), "--features", str(copy), "--labels", test_csv,
                 "--out", str(root / "eval-copy")]) == 0
    capsys.readouterr()
    copied = json.loads((root / "eval-copy" / "metrics.json").read_text())
    assert copied["mean_accuracy"] == metrics["mean_accuracy"]


def test_dirmixe_with_sse_sam_reports_experts_and_test_time_aggregation(world):
    root, labels, _ = world
    cfg = ClsTrainConfig(features=[str(root / "s1")], labels=labels, split="train/", test_split="test/",
                         method="dirmixe", optim="ssesam", epochs=10, batch_size=16, trials=12, dirichlet_draws=1,
                         tta_epochs=2, tta_steps=4, out=str(root / "run-dm"))
    run = train_cls(cfg, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["mean_accuracy"]) == {"default", "tta", "expert_forward", "expert_uniform", "expert_backward"}
    for r in metrics["distributions"]:
        assert sum(r["tta_weights"]) == pytest.approx(1.0, abs=1e-6)
        assert all(math.isfinite(v) for v in r["accuracy"].values())
    nc = json.loads((run / "nc.json").read_text())
    assert set(nc) == {"expert_forward", "expert_uniform", "expert_backward"}
    report = json.loads((run / "report.json").read_text())
    assert report["tail_eta"] == pytest.approx(8.0) and report["tail_classes"] == ["emu", "fox"]  # n_c < 0.2·40


@pytest.mark.parametrize("kw", [
    {"method": "la", "optim": "ssesam", "sse_gamma": 0.5},
    {"method": "dirmixe", "optim": "imbsam", "trials": 6},
    {"method": "tla-adrw", "fusion": "reconboost", "rb_stages": 3, "rb_stage_epochs": 2, "rb_correct_epochs": 1},
])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(world, kw):
    root, labels, _ = world
    if kw.get("fusion") == "reconboost":
        kw = {**kw, "method": "la"}
    common = dict(features=[str(root / "s1"), str(root / "s2")], labels=labels, split="train/", epochs=9,
                  batch_size=16, checkpoint_every=2, **kw)
    full = train_cls(ClsTrainConfig(**common, out=str(root / "full")), progress=False, overwrite=True)
    part = ClsTrainConfig(**common, out=str(root / "part"))
    train_cls(part, progress=False, overwrite=True, stop_after=4)
    assert not (root / "part" / "model.safetensors").exists()
    train_cls(ClsTrainConfig(**common, out=str(root / "part")), progress=False, resume=True)
    a, b = load_file(full / "model.safetensors"), load_file(root / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((root / "part" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 10))


def test_fusion_options_and_frame_heads(world):
    root, labels, _ = world
    common = dict(features=[str(root / "s1"), str(root / "s2")], labels=labels, split="train/", test_split="test/",
                  epochs=6, batch_size=16, dirichlet_draws=0)
    run = train_cls(ClsTrainConfig(**common, sources="layer", fusion="weighted", head="etf",
                                   out=str(root / "weighted")), progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert [s["name"] for s in saved["sources"]] == ["s1:a", "s1:b", "s2:a"]
    nc = json.loads((run / "nc.json").read_text())
    assert sum(nc["source_weights"].values()) == pytest.approx(1.0)
    assert nc["head"]["nc3"] is not None and math.isfinite(nc["head"]["nc1"])
    run = train_cls(ClsTrainConfig(**common, method="ldam", head="grassmannian", frame_dim=2,
                                   out=str(root / "grass")), progress=False)
    _, _, model = load_run(run)
    w = model.head.weight  # 4 unit vectors in R^2: the best spherical code is the square, coherence 0
    assert torch.allclose(w.norm(dim=1), torch.ones(4), atol=1e-5)
    assert float((w @ w.T - torch.eye(4)).max()) == pytest.approx(0.0, abs=1e-3)
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["mean_accuracy"]["default"])


def test_zero_count_class_is_reported_and_floored_with_no_nan(world, recwarn):
    root, labels, _ = world
    for method in ("la", "dirmixe"):
        cfg = ClsTrainConfig(features=[str(root / "s1")], labels=labels, split="train/", test_split="test/",
                             classes="cat,dog,emu,fox,gnu", method=method, optim="ssesam", epochs=4, batch_size=16,
                             trials=6, dirichlet_draws=1, tta_epochs=1, tta_steps=2, out=str(root / f"zero-{method}"))
        run = train_cls(cfg, progress=False)
        report = json.loads((run / "report.json").read_text())
        assert report["zero_count_classes"] == ["gnu"]
        saved = json.loads((run / "config.json").read_text())
        assert saved["classes"]["train_counts"][4] == 0 and 0 < saved["classes"]["prior"][4] < 1e-7
        weights = load_file(run / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())
        metrics = json.loads((run / "metrics.json").read_text())
        assert all(math.isfinite(v) for r in metrics["distributions"] for v in r["accuracy"].values())
        assert all(r["counts"][4] == 0 for r in metrics["distributions"])
    assert any("gnu" in str(w.message) and "no training samples" in str(w.message) for w in recwarn)


def test_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys):
    root, labels, rows = world
    s1 = str(root / "s1")
    unknown = _write_labels(tmp_path / "unknown.csv", rows + [("train/zebra-00.png", "cat")])
    missing = _write_labels(tmp_path / "missing.csv", [r for r in rows if r[0] != "train/dog-03.png"])
    train_only = _write_labels(tmp_path / "train.csv", [r for r in rows if r[0].startswith("train/")])
    new_class = _write_labels(tmp_path / "newclass.csv", [(k, "gnu" if "fox" in k else v) for k, v in rows
                                                          if k.startswith("test/")])
    (tmp_path / "nolabel.csv").write_text("key,class\ntrain/cat-00.png,cat\n")
    common = ["--epochs", "2", "--dirichlet-draws", "0"]
    cases = [
        (["train-cls", "--features", s1, "--labels", unknown, "--split", "train/", "--out", str(tmp_path / "r1")],
         "unknown.csv: 1 keys are not in the feature store", "'train/zebra-00.png'"),
        (["train-cls", "--features", s1, "--labels", missing, "--split", "train/", "--out", str(tmp_path / "r2")],
         "1 keys under train/ have no label in", "'train/dog-03.png'"),
        (["train-cls", "--features", s1, "--labels", train_only, "--test-labels", new_class,
          "--out", str(tmp_path / "r3")], "newclass.csv: labels 'gnu' are not among the training classes", None),
        (["train-cls", "--features", s1, "--labels", train_only, "--test-labels", new_class, "--classes",
          "cat,dog,emu,fox,gnu", "--out", str(tmp_path / "r4")],
         "newclass.csv: test labels of classes absent from training: 'gnu'", "--drop-unseen"),
        (["train-cls", "--features", s1, "--labels", str(tmp_path / "nolabel.csv"), "--out", str(tmp_path / "r5")],
         "needs 'key' and 'label' columns", None),
        (["train-cls", "--features", s1, "--labels", labels, "--method", "dirmixe", "--head", "etf",
          "--out", str(tmp_path / "r6")], "dirmixe has its own heads", None),
        (["train-cls", "--features", s1, "--labels", labels, "--split", "train/", "--layer", "nope",
          "--out", str(tmp_path / "r7")], "no layer 'nope'", None),
        (["eval-cls", "--run", str(tmp_path), "--features", s1, "--labels", labels], "not a train-cls run", None),
        (["eval-cls", "--run", str(root / "run-la"), "--features", str(root / "s2"), "--labels", labels, "--split",
          "test/"], "features differ from the run's", None),
    ]
    for argv, message, detail in cases:
        assert main(["--quiet", *argv, *(common if argv[0] == "train-cls" else [])]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
        assert detail is None or detail in err, err
    # with --drop-unseen the untrained class is left out of the evaluation, and said so
    assert main(["--quiet", "train-cls", "--features", s1, "--labels", train_only, "--test-labels", new_class,
                 "--classes", "cat,dog,emu,fox,gnu", "--drop-unseen", *common, "--out", str(tmp_path / "r8")]) == 0
    metrics = json.loads((tmp_path / "r8" / "metrics.json").read_text())
    assert metrics["images"] == 30 and metrics["report"]["dropped_unseen"] == {"classes": ["gnu"], "images": 10}


def test_pooling_and_group_losses():
    x = np.random.default_rng(1).normal(size=(3, 5, 7)).astype(np.float32)
    assert np.allclose(pool(x), x.mean((1, 2)))
    ref = F.adaptive_avg_pool2d(torch.as_tensor(x, dtype=torch.float64)[None], 2)[0].reshape(-1).numpy()
    assert np.allclose(pool(x, 2), ref)
    cfg = ClsTrainConfig(features=["x"], labels="y", out="z", method="ce").resolve()
    objective = Objective(cfg, np.array([10, 5, 1]), 1, torch.device("cpu"))
    z, y = torch.randn(6, 3), torch.tensor([0, 2, 1, 2, 0, 0])
    parts = objective.grouped(z, y, torch.tensor([2]))
    assert (parts.n_head, parts.n_tail) == (4, 2)
    assert float(parts.head + parts.tail) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    ce = F.cross_entropy(z, y, reduction="none")
    assert float(parts.tail) == pytest.approx(float(ce[y == 2].sum() / 6), rel=1e-6)
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(10, 100, 10) == 1.0
    assert lr_factor(55, 100, 10) == pytest.approx(0.5) and lr_factor(100, 100, 10) == pytest.approx(0.0)
