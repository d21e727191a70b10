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
from difffeat.store.feature_store import FeatureStore, FeatureStoreWriter
from downstream.cls import ClsTrainConfig, Objective, load_run, pool, shifted_test_sets, train_cls
from downstream.cls.config import AggregationConfig, DirMixEConfig, ReconBoostConfig
from downstream.engine import cosine_factor

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
    """Global average pooling, written out directly (not through downstream.cls.data)."""
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
        # many / medium / few: the class-mean accuracy over the set's classes of each group (n > 100, n < 20)
        shots = r["shots"]["default"]
        sub_pred, sub_y = pred[s.indices], y[s.indices]
        medium = [(sub_pred[sub_y == c] == c).mean() for c in (0,) if (sub_y == c).any()]
        few = [(sub_pred[sub_y == c] == c).mean() for c in (1, 2, 3) if (sub_y == c).any()]
        assert shots["many"] is None and shots["medium"] == pytest.approx(np.mean(medium))
        assert shots["few"] == pytest.approx(np.mean(few))
    accs = [r["accuracy"]["default"] for r in metrics["distributions"]]
    assert metrics["mean_accuracy"]["default"] == pytest.approx(np.mean(accs))
    assert metrics["full_test"]["accuracy"] == pytest.approx((pred == y).mean())
    assert metrics["shots"]["classes"] == {"many": [], "medium": ["cat"], "few": ["dog", "emu", "fox"]}
    assert metrics["full_test"]["shots"]["few"] == pytest.approx(np.mean([(pred[y == c] == c).mean()
                                                                          for c in (1, 2, 3)]))
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
                         method="dirmixe", optim="ssesam", epochs=10, batch_size=16, dirichlet_draws=1,
                         dirmixe=DirMixEConfig(trials=12), aggregation=AggregationConfig(epochs=2, steps_per_pass=4),
                         out=str(root / "run-dm"))
    run = train_cls(cfg, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["mean_accuracy"]) == {"default", "tta", "expert_forward", "expert_uniform", "expert_backward"}
    for r in metrics["distributions"]:
        assert sum(r["tta_weights"]) == pytest.approx(1.0, abs=1e-6)
        assert all(math.isfinite(v) for v in r["accuracy"].values())
        # Dirichlet sets: the weights are adapted on the set's independent draw (as released), SADE sets on
        # themselves
        assert r.get("tta_adapted_on") == ("independent draw" if r["kind"].startswith("dirichlet") else None)
    _check_tta_adaptation_sets(root, labels, run, metrics)
    nc = json.loads((run / "nc.json").read_text())
    assert set(nc) == {"expert_forward", "expert_uniform", "expert_backward"}
    report = json.loads((run / "report.json").read_text())
    assert report["tail_eta"] == pytest.approx(8.0) and report["tail_classes"] == ["emu", "fox"]  # n_c < 0.2·40


def _check_tta_adaptation_sets(root, labels, run, metrics):
    """The tta weights of each set against test-time aggregation run directly on the set it must adapt on."""
    from downstream.cls.data import SourceSpec, load_split
    from downstream.cls.dirmixe import test_time_aggregation

    saved, config, model = load_run(run)
    test = load_split([str(root / "s1")], labels, split="test/", names=saved["classes"]["names"],
                      layers=config.layers, sources=config.sources, pool_grid=config.pool_grid,
                      specs=[SourceSpec.from_dict(s) for s in saved["sources"]])
    with torch.no_grad():
        normed = model.norm([torch.as_tensor(b) for b in test.blocks])
        flat, dims = torch.cat(normed, 1), [b.shape[1] for b in normed]
    sets = {s.name: s for s in shifted_test_sets(test.labels, TRAIN_COUNTS, num_classes=4, dirichlet_draws=1, seed=0)}
    for r in metrics["distributions"]:
        s = sets[r["name"]]
        rows = s.adaptation if s.adaptation is not None else s.indices
        weights, _ = test_time_aggregation(lambda x: model.forward_normed(list(x.split(dims, 1))),
                                           flat[torch.as_tensor(rows)], config.aggregation,
                                           seed=config.eval_seed)
        assert r["tta_weights"] == pytest.approx(weights.tolist(), abs=1e-6), r["name"]


@pytest.mark.parametrize("kw", [
    {"method": "la", "optim": "ssesam", "sse_gamma": 0.5},
    {"method": "dirmixe", "optim": "imbsam", "dirmixe": DirMixEConfig(trials=6)},
    {"method": "drauc", "drauc_steps": 2},
    {"method": "tkpr", "optim": "sam", "tkpr_k": 2},
    {"method": "tla-adrw", "fusion": "reconboost",
     "reconboost": ReconBoostConfig(stages=3, stage_epochs=2, correct_epochs=1)},
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
                             dirmixe=DirMixEConfig(trials=6), dirichlet_draws=1,
                             aggregation=AggregationConfig(epochs=1, steps_per_pass=2),
                             out=str(root / f"zero-{method}"))
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
    assert cosine_factor(0, 100, 10) == pytest.approx(0.1) and cosine_factor(10, 100, 10) == 1.0
    assert cosine_factor(55, 100, 10) == pytest.approx(0.5) and cosine_factor(100, 100, 10) == pytest.approx(0.0)


# ---- issue #13 item 7: labels that cannot make a classifier are refused, naming the file and line -------------
def _train_argv(root, labels, out):
    return ["--quiet", "train-cls", "--features", str(root / "s1"), "--labels", labels, "--split", "train/",
            "--epochs", "1", "--dirichlet-draws", "0", "--out", str(out)]


def test_a_typo_in_an_integer_label_does_not_make_thousands_of_classes(world, tmp_path, capsys):
    root, _, rows = world
    ids = {name: str(i) for i, name in enumerate(NAMES)}
    train = [(k, ids[v]) for k, v in rows if k.startswith("train/")]
    typo = train[5][0]
    labels = _write_labels(tmp_path / "ids.csv", [(k, "5000" if k == typo else v) for k, v in train])
    assert main(_train_argv(root, labels, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ids.csv: line 7" in err and "'5000'" in err and "5001 classes" in err, err
    assert not (tmp_path / "run").exists()
    # the same ids without the typo train (integer labels are class names "0".."3")
    labels = _write_labels(tmp_path / "ok.csv", train)
    assert main(_train_argv(root, labels, tmp_path / "ok")) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["classes"]["names"] == ["0", "1", "2", "3"]


def test_fifty_million_is_refused_without_building_the_classes():
    from difffeat.errors import UserError
    from downstream.cls.labels import Labels, infer_class_names

    labels = Labels("big.csv", {"a": "0", "b": "1", "c": "50000000"}, {"a": 2, "b": 3, "c": 4})
    with pytest.raises(UserError, match=r"big.csv: line 4: label '50000000' would make 50000001 classes"):
        infer_class_names(labels, ["a", "b", "c"])
    assert infer_class_names(labels, ["a", "b"]) == ["0", "1"]


def test_a_single_class_is_refused(world, tmp_path, capsys):
    root, _, rows = world
    labels = _write_labels(tmp_path / "one.csv", [(k, "cat") for k, _ in rows if k.startswith("train/")])
    assert main(_train_argv(root, labels, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "one.csv" in err and "a classifier needs at least 2 classes" in err, err
    # also when the class list names more classes than the labels use
    assert main([*_train_argv(root, labels, tmp_path / "run"), "--classes", "cat,dog"]) == 2
    assert "a classifier needs at least 2 classes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_integer_labels_mixed_with_names_are_refused(world, tmp_path, capsys):
    root, _, rows = world
    train = [(k, v) for k, v in rows if k.startswith("train/")]
    labels = _write_labels(tmp_path / "mixed.csv", [(k, "3" if i == 7 else v) for i, (k, v) in enumerate(train)])
    assert main(_train_argv(root, labels, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mixed.csv" in err, err
    assert "(line 9: '3')" in err and "(line 2: 'cat')" in err, err  # an example of each, with its line


# ---- the package: registries, flags, several processes ---------------------------------------------------------
def test_methods_optimizers_and_heads_are_registries_matching_the_config_choices():
    from downstream.cls import config
    from downstream.cls.model import HEADS
    from downstream.cls.objective import METHODS, OPTIMIZERS

    assert tuple(METHODS) == config.METHODS and tuple(OPTIMIZERS) == config.OPTIMIZERS
    assert tuple(HEADS) == config.HEADS


def _field(cfg, name: str):
    """A config value by its field name, ``sub.field`` for a sub-config's."""
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_flags_keep_their_names_and_defaults():
    from difffeat.cli import build_parser
    from difffeat.spine.config_cli import config_from_args
    from downstream.cls.config import ClsTrainConfig, DirMixEConfig, EvalClsConfig

    parser = build_parser()
    cfg = config_from_args(ClsTrainConfig, parser.parse_args(["train-cls", "--features", "a", "--labels", "b",
                                                               "--out", "c"]))
    today = dict(sources="store", pool_grid=1, fusion="concat", method="ce", optim="none", head=None, hidden=256,
                 frame_dim=None, assignment="identity", scale=30.0, epochs=100, batch_size=128, lr=0.05,
                 weight_decay=5e-4, warmup_epochs=5, tau=1.0, rho=0.05, rho_tail=0.1, sse_gamma=0.7, tail_eta=None,
                 dirichlet_draws=3, drop_unseen=False, seed=0, checkpoint_every=10, device="auto",
                 imbsam_tail_weight=2.0, tta_adapt="independent", forward_ratios=[50, 25, 10, 5, 2],
                 backward_ratios=[2, 5, 10, 25, 50], dirichlet_ratio=100.0, dirichlet_concentration=None,
                 many_above=100, few_below=20, drauc_schedule="step", drauc_alpha_step="released", tkpr_k=5,
                 tkpr_surrogate="logistic", tkpr_form="pairwise")
    # the sub-configs' fields (their flags kept: --dm-tau, --lambda-var, --trials, --concentration, --tta-*, --rb-*)
    today.update({"dirmixe.tau": 1.3, "dirmixe.lambda_var": 5.0, "dirmixe.trials": 60, "dirmixe.concentration": 1e4,
                  "aggregation.epochs": 5, "aggregation.steps_per_pass": 0, "aggregation.weight_decay": 5e-4,
                  "reconboost.stages": 16, "reconboost.weight2": 1.0})
    assert {k: _field(cfg, k) for k in today} == today
    assert cfg.dirmixe.tau == DirMixEConfig.tau  # one source
    given = {"--features": ("features", ["f1", "f2"]), "--labels": ("labels", "l.csv"), "--out": ("out", "o"),
             "--config": None, "--split": ("split", "train/"), "--test-split": ("test_split", "test/"),
             "--test-labels": ("test_labels", "t.csv"), "--classes": ("classes", "a,b"), "--layer": ("layers", ["x"]),
             "--sources": ("sources", "layer"), "--pool-grid": ("pool_grid", 2), "--fusion": ("fusion", "weighted"),
             "--method": ("method", "la"), "--optim": ("optim", "sam"), "--head": ("head", "cosine"),
             "--hidden": ("hidden", 8), "--frame-dim": ("frame_dim", 3), "--assignment": ("assignment", "random"),
             "--scale": ("scale", 2.0), "--epochs": ("epochs", 3), "--batch-size": ("batch_size", 4),
             "--lr": ("lr", 0.5), "--weight-decay": ("weight_decay", 0.0), "--warmup-epochs": ("warmup_epochs", 0),
             "--tau": ("tau", 2.0), "--rho": ("rho", 0.2), "--rho-tail": ("rho_tail", 0.3),
             "--sse-gamma": ("sse_gamma", 0.5), "--tail-eta": ("tail_eta", 4.0), "--dm-tau": ("dirmixe.tau", 1.1),
             "--lambda-var": ("dirmixe.lambda_var", 1.0), "--trials": ("dirmixe.trials", 5),
             "--concentration": ("dirmixe.concentration", 9.0), "--tta-epochs": ("aggregation.epochs", 2),
             "--tta-steps": ("aggregation.steps_per_pass", 3), "--rb-stages": ("reconboost.stages", 2),
             "--rb-lr": ("reconboost.lr", 0.2), "--rb-correct-lr": ("reconboost.correct_lr", 0.3),
             "--tta-momentum": ("aggregation.momentum", 0.5), "--dm-switch-fraction": ("dirmixe.switch_fraction", 0.5),
             "--rb-weight2": ("reconboost.weight2", 0.5), "--dirichlet-draws": ("dirichlet_draws", 1),
             "--imbsam-tail-weight": ("imbsam_tail_weight", 1.0), "--tta-adapt": ("tta_adapt", "scored"),
             "--tta-weight-decay": ("aggregation.weight_decay", 0.0), "--forward-ratios": ("forward_ratios", [10.0]),
             "--backward-ratios": ("backward_ratios", [3.0]), "--dirichlet-ratio": ("dirichlet_ratio", 3.0),
             "--dirichlet-concentration": ("dirichlet_concentration", 1e5), "--many-above": ("many_above", 50.0),
             "--few-below": ("few_below", 5.0), "--drauc-epsilon": ("drauc_epsilon", 0.1),
             "--drauc-schedule": ("drauc_schedule", "cosine"), "--tkpr-k": ("tkpr_k", 2),
             "--tkpr-surrogate": ("tkpr_surrogate", "hinge"),
             "--seed": ("seed", 4), "--checkpoint-every": ("checkpoint_every", 2), "--device": ("device", "cpu")}
    argv = ["train-cls", "--drop-unseen", "--resume", "--overwrite", "--stop-after", "2"]
    for flag, item in given.items():
        if item is not None:
            values = item[1] if isinstance(item[1], list) else [item[1]]
            for v in values:
                argv += [flag, str(v)]
    args = parser.parse_args(argv)
    cfg = config_from_args(ClsTrainConfig, args)
    assert all(_field(cfg, field) == value for field, value in (v for v in given.values() if v is not None))
    assert cfg.drop_unseen and args.resume and args.overwrite and args.stop_after == 2 and args.config is None
    args = parser.parse_args(["eval-cls", "--run", "r", "--features", "f", "--labels", "l", "--split", "test/",
                              "--out", "o", "--no-tta", "--dirichlet-draws", "2", "--seed", "1", "--drop-unseen"])
    ev = config_from_args(EvalClsConfig, args)
    assert (ev.run, ev.features, ev.labels, ev.split, ev.out, ev.tta, ev.dirichlet_draws, ev.seed, ev.drop_unseen) \
        == ("r", ["f"], "l", "test/", "o", False, 2, 1, True)


def test_sub_configs_are_nested_and_older_flat_configs_still_load(tmp_path, capsys):
    """DirMixE, its test-time aggregation and ReconBoost are sub-configs: saved as nested dicts, their errors named
    by field path in the library and by flag on the command line; a config written with the former flat names
    (dm_tau, tta_lr, rb_lr …) loads to the same values."""
    import json

    from difffeat.cli import main
    from difffeat.spine.run import ConfigError
    from downstream.cls.config import ClsTrainConfig

    base = {"features": ["f"], "labels": "l.csv", "out": str(tmp_path / "o")}
    cfg = ClsTrainConfig.from_dict({**base, "dirmixe": {"tau": 1.6}, "aggregation.lr": 0.025,
                                    "reconboost": {"stages": 2}})
    saved = cfg.to_dict()
    assert saved["dirmixe"]["tau"] == 1.6 and saved["aggregation"]["lr"] == 0.025 and saved["reconboost"]["stages"] == 2
    assert "dm_tau" not in saved and ClsTrainConfig.from_dict(saved) == cfg
    flat = {**base, "dm_tau": 1.6, "tta_lr": 0.025, "rb_stages": 2}
    (tmp_path / "config.json").write_text(json.dumps({"config": flat}))
    assert ClsTrainConfig.from_dict(flat) == cfg == ClsTrainConfig.from_run(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"^dirmixe\.trials: must be ≥ 1"):
        ClsTrainConfig.from_dict({**base, "dirmixe": {"trials": 0}})
    with pytest.raises(ConfigError, match=r"^aggregation: must be a mapping"):
        ClsTrainConfig.from_dict({**base, "aggregation": 3})
    assert main(["train-cls", "--features", "f", "--labels", "l", "--out", str(tmp_path / "x"), "--trials", "0"]) == 2
    assert "--trials: must be ≥ 1" in capsys.readouterr().err
    # what ReconBoost leaves to train-cls: learning rates (one serves both phases), momentum, weight decay
    rb = ClsTrainConfig.from_dict({**base, "lr": 0.2, "momentum": 0.5}).reconboost_config()
    assert (rb.lr, rb.correct_lr, rb.momentum, rb.weight_decay) == (0.2, 0.2, 0.5, 5e-4)
    rb = ClsTrainConfig.from_dict({**base, "reconboost": {"lr": 0.01}}).reconboost_config()
    assert (rb.lr, rb.correct_lr) == (0.01, 0.01)
    assert ClsTrainConfig.from_dict({**base, "scale": 16.0}).dirmixe_config().scale == 16.0
    # what a user typed is checked by name (from_dict passes over what a manifest holds beside its config)
    typed = {**base, "dirmixe.tau": 1.6, "dm_tau": 1.6, "aggregation": {"lr": 0.1, "lrr": 1}, "dirmixe.taus": 2,
             "methodd": "la"}
    assert ClsTrainConfig.unknown_names(typed) == ["aggregation.lrr", "dirmixe.taus", "methodd"]
    assert ClsTrainConfig.unknown_names(saved) == []


def test_a_bad_value_names_its_flag(world, tmp_path, capsys):
    root, labels, _ = world
    assert main(_train_argv(root, labels, tmp_path / "run") + ["--lr", "nan"]) == 2
    assert "--lr: must be a finite number" in capsys.readouterr().err
    assert main(_train_argv(root, labels, tmp_path / "run") + ["--sse-gamma", "2"]) == 2
    assert "--sse-gamma: must be ≤ 1" in capsys.readouterr().err


def test_two_processes_train_as_one_process_with_their_batches_together(world, tmp_path):
    """torchrun, 2 CPU processes with batch 8 each: the gradients averaged, the run equals one process with
    batch 16 (the same samples per step) up to float rounding, and one metrics.json is written."""
    import os
    import subprocess
    import sys

    root, labels, _ = world
    common = ["--quiet", "train-cls", "--features", str(root / "s1"), "--labels", labels, "--split", "train/",
              "--test-split", "test/", "--method", "la", "--optim", "imbsam", "--epochs", "3", "--hidden", "16",
              "--dirichlet-draws", "0", "--checkpoint-every", "2"]
    assert main([*common, "--batch-size", "16", "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    proc = subprocess.run([*launcher, "-m", "difffeat", *common, "--batch-size", "8", "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained ") == 1  # only the main process reports
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    one, two = (json.loads((tmp_path / r / "history.json").read_text()) for r in ("one", "two"))
    assert [h["loss"] for h in one] == pytest.approx([h["loss"] for h in two], rel=1e-5)
    assert [h["iteration"] for h in two] == [4, 8, 12]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["full_test"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["full_test"]


# ---- issue #16: DRAUC and TKPR in train-cls, data-set profiles ---------------------------------------------------
def test_drauc_and_tkpr_train_with_their_own_steps_and_report(world):
    root, labels, _ = world
    common = dict(features=[str(root / "s1")], labels=labels, split="train/", test_split="test/", epochs=4,
                  batch_size=16, dirichlet_draws=1)
    run = train_cls(ClsTrainConfig(**common, method="drauc", drauc_steps=3, out=str(root / "drauc")), progress=False)
    history = json.loads((run / "history.json").read_text())
    # DRAUC's step schedule, per epoch and without warm-up: ×0.1 at ⌊E/2⌋ and ⌊3E/4⌋ (0-based epochs 2 and 3)
    assert [h["lr"] for h in history] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(math.isfinite(r["accuracy"]["default"]) for r in metrics["distributions"])
    state = load_file(run / "checkpoints" / "step-0000004" / "drauc_loss.safetensors")
    assert {"a", "b", "alpha", "lambdas"} <= set(state) and state["a"].shape == (4,)
    # one per batch of the last epoch: the dual period restarts every epoch, as the released train.py
    assert (state["alpha"] >= 0).all() and int(state["_calls"]) == sum(TRAIN_COUNTS) // 16
    run = train_cls(ClsTrainConfig(**common, method="tkpr", tkpr_k=2, out=str(root / "tkpr")), progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["full_test"]["accuracy"] > 0.5  # a separable world: the ranking surrogate learns it
    with pytest.raises(Exception, match="optim"):
        ClsTrainConfig(**common, method="drauc", optim="sam", out="x").resolve()


def _train_args(*extra):
    from difffeat.cli import build_parser

    return build_parser().parse_args(["train-cls", "--features", "f", "--labels", "l", "--out", "o", *extra])


def test_profile_sets_the_released_values_and_given_flags_win():
    from downstream.cls.profile import config_from_profile

    cfg = config_from_profile(_train_args("--method", "dirmixe", "--profile", "imagenet-lt", "--lambda-var", "3",
                                          "--dm-tau", "1.3"))
    # from the profile: ImageNet-LT's τ would be 1.6, but --dm-tau 1.3 (the default value, given) wins
    dm = cfg.dirmixe
    assert (dm.tau, dm.lambda_var, dm.concentration, dm.trials) == (1.3, 3.0, 1e4, 60)
    assert (cfg.dirichlet_ratio, cfg.dirichlet_concentration) == (50, 1e4)
    assert cfg.forward_ratios == [50, 25, 10, 5, 2] and cfg.backward_ratios == [2, 5, 10, 25, 50]
    tta = cfg.aggregation
    assert (tta.lr, tta.weight_decay, tta.batch_size) == (0.025, 5e-4, 64)
    assert cfg.extra == {"profile": "imagenet-lt"}
    cfg = config_from_profile(_train_args("--profile", "inat", "--method", "dirmixe"))
    assert (cfg.dirmixe.concentration, cfg.dirichlet_ratio, cfg.dirichlet_concentration, cfg.dirmixe.tau) == \
        (1e5, 3, 1e5, 1.3)
    assert cfg.forward_ratios == [3, 2]
    cfg = config_from_profile(_train_args("--profile", "cifar10-lt", "--optim", "imbsam", "--method", "vs"))
    assert (cfg.many_above, cfg.few_below) == (1000, 200)  # CIFAR-10's shot thresholds
    assert (cfg.vs_gamma, cfg.vs_tau) == (0.05, 1.0) and cfg.dirmixe.lambda_var == 5.0  # dirmixe's not applied
    cfg = config_from_profile(_train_args("--profile", "cifar100-lt", "--optim", "ssesam", "--rho-tail", "0.3"))
    assert (cfg.rho, cfg.rho_tail, cfg.sse_gamma, cfg.tail_eta) == (0.05, 0.3, 0.7, 100)
    cfg = config_from_profile(_train_args("--profile", "cifar100-lt", "--optim", "imbsam"))
    assert (cfg.rho, cfg.tail_eta, cfg.imbsam_tail_weight) == (0.05, 20, 2.0)


def test_a_bad_profile_is_one_line(world, tmp_path, capsys):
    root, labels, _ = world
    for profile, message in (("ade20k", "ade20k' is a segmentation profile"), ("nope", "unknown profile 'nope'")):
        assert main(_train_argv(root, labels, tmp_path / "run") + ["--profile", profile]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    assert not (tmp_path / "run").exists()
