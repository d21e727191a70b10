"""train-seg on hostile and clumsy input (issue #13 items 4, 5, 6, 10, 11; issue #12's weighted variants):
paths from files stay inside the mask root, NaN stops training, an image is never its own mask, a missing
mask file is skipped and reported, a failed checkpoint leaves no temp folder, and the CLI's flags and
defaults are the documented ones."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import difffeat.spine.run
from difffeat.cli import main
from difffeat.errors import UserError
from difffeat.spine.run import ConfigError
from difffeat.store.feature_store import FeatureStoreWriter
from downstream.seg.classes import SegClasses, load_classes
from downstream.seg.config import SegTrainConfig
from downstream.seg.data import FeatureSpec, SegDataset
from downstream.seg.model import HeadConfig, SegModel
from downstream.seg.train import train_seg

K = 3
SIZE = 16


def write_store(path, keys, images=None, layers=(("x", (4, 4, 4)),), fill=None):
    """A store of random features per key (layer name → shape); `fill` = {key: value} overwrites a key's maps."""
    config = {"model": "test", "layers": [n for n, _ in layers], "resolution": [SIZE, SIZE], "resize": "stretch",
              "images": str(images) if images else None}
    with FeatureStoreWriter(path, config) as w:
        for i, key in enumerate(keys):
            rng = np.random.default_rng(i)
            w.add(key, {name: np.full(shape, (fill or {}).get(key, 0.0), np.float32)
                        + rng.normal(size=shape).astype(np.float32) for name, shape in layers})
    return path


def write_png(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def mask(i):
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[: 4 + i] = 1
    m[-3:] = 2
    return m


@pytest.fixture
def flat(tmp_path):
    """An images/ + masks/ root without metadata.csv (a layout the docs support), and a store of its images."""
    root = tmp_path / "root"
    keys = [f"images/{i}.png" for i in range(4)]
    for i in range(4):
        # Grey images with values < K: an image taken for a mask would pass every mask check.
        write_png(root / "images" / f"{i}.png", np.full((SIZE, SIZE), (i + 1) % K))
        write_png(root / "masks" / f"{i}.png", mask(i))
    (root / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    return root, write_store(tmp_path / "feat", keys, images=root), keys


def run_cli(argv, capsys):
    rc = main(["--quiet", *argv])
    return rc, capsys.readouterr().err.strip()


# ------------------------------------------------------------------------ item 6: never the image itself
def test_an_image_is_never_taken_for_its_own_mask(flat, tmp_path):
    root, store, keys = flat
    ds = SegDataset([store], root, load_classes(root / "classes.json"))
    assert ds.keys == keys
    for i in range(4):
        assert torch.equal(ds[i]["mask"], torch.from_numpy(mask(i).astype(np.int64)))
    (root / "masks" / "3.png").unlink()  # no mask: the key is skipped, its image is not used instead
    with pytest.warns(UserWarning, match="1 without a mask"):
        ds = SegDataset([store], root, load_classes(root / "classes.json"))
    assert ds.keys == keys[:3] and ds.report["missing_masks"] == keys[3:]


# --------------------------------------------------------------------------- item 4: paths stay inside
def test_store_keys_and_metadata_cannot_reach_outside_the_mask_root(flat, tmp_path, capsys):
    root, _, _ = flat
    write_png(tmp_path / "outside.png", mask(0))  # a valid mask file outside --masks
    for key in ["../outside.png", str(tmp_path / "outside.png"), "images/../../outside.png"]:
        store = write_store(tmp_path / f"bad-{abs(hash(key))}", [key])
        with pytest.raises(UserError, match="leads outside the mask folder"):
            SegDataset([store], root, load_classes(root / "classes.json"))
        rc, err = run_cli(["train-seg", "--features", str(store), "--masks", str(root), "--out",
                           str(tmp_path / "r"), "--iterations", "1"], capsys)
        assert rc == 2 and "leads outside the mask folder" in err and "\n" not in err, err
        assert not (tmp_path / "r").exists()  # refused before anything was written
    (root / "metadata.csv").write_text("file_name,mask_file_name\nimages/0.png,../outside.png\n")
    with pytest.raises(UserError, match=r"metadata\.csv: mask_file_name '\.\./outside\.png': points outside"):
        SegDataset([write_store(tmp_path / "ok", ["images/0.png"], images=root)], root,
                   load_classes(root / "classes.json"))


# ------------------------------------------------------------------- item 10: a listed mask file missing
def test_a_listed_but_missing_mask_file_is_skipped_and_reported(flat, tmp_path):
    root, store, keys = flat
    rows = ["file_name,mask_file_name"] + [f"images/{i}.png,masks/{i}.png" for i in range(4)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "masks" / "2.png").unlink()
    cfg = SegTrainConfig.from_dict(dict(features=[str(store)], masks=str(root), out=str(tmp_path / "run"), iterations=2,
                                        batch_size=2, hidden=8))
    with pytest.warns(UserWarning, match="whose listed mask file is missing"):
        run = train_seg(cfg, progress=False)
    report = json.loads((run / "report.json").read_text())["train"]
    assert report["keys"] == 3 and [m["key"] for m in report["missing_mask_files"]] == ["images/2.png"]
    assert report["missing_mask_files"][0]["file"].endswith("masks/2.png")


# ------------------------------------------------------------------------------- item 5: NaN stops training
def test_nan_features_stop_training_naming_the_key(flat, tmp_path, capsys):
    root, _, keys = flat
    store = write_store(tmp_path / "nan", keys, images=root, fill={keys[1]: np.nan})
    for cache in ("1073741824", "0"):  # held in RAM, and read on demand
        rc, err = run_cli(["train-seg", "--features", str(store), "--masks", str(root), "--out",
                           str(tmp_path / f"r{cache}"), "--iterations", "2", "--cache-bytes", cache], capsys)
        assert rc == 2 and "'images/1.png' (layer x) hold NaN or Inf" in err and "\n" not in err, err
        assert not (tmp_path / f"r{cache}" / "model.safetensors").exists()


def test_a_diverging_loss_stops_training(flat, tmp_path, capsys):
    root, store, _ = flat
    rc, err = run_cli(["train-seg", "--features", str(store), "--masks", str(root), "--out", str(tmp_path / "r"),
                       "--iterations", "20", "--batch-size", "2", "--hidden", "8", "--lr", "1e6"], capsys)
    assert rc == 2 and "the training loss became" in err and "lower the learning rate" in err, err
    assert not (tmp_path / "r" / "model.safetensors").exists()


# ----------------------------------------------------------------- item 11: no temp folder after a failure
def test_a_failed_checkpoint_write_leaves_no_temp_folder(flat, tmp_path, monkeypatch):
    root, store, _ = flat
    real = difffeat.spine.run.save_tensors

    def disk_full(path, tensors, metadata=None):
        if "optimizer" in str(path):
            raise UserError(f"{path.parent}: cannot write {path.name} (No space left on device)")
        real(path, tensors, metadata)

    monkeypatch.setattr(difffeat.spine.run, "save_tensors", disk_full)
    cfg = SegTrainConfig.from_dict(dict(features=[str(store)], masks=str(root), out=str(tmp_path / "run"), iterations=2,
                                        batch_size=2, hidden=8))
    with pytest.raises(UserError, match="No space left"):
        train_seg(cfg, progress=False)
    left = [p.name for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]
    assert left == []


# ------------------------------------------------------------- issue #12: variants of one store are weighted
def test_weighted_on_one_two_variant_store_differs_from_concat(flat, tmp_path):
    root, _, keys = flat
    layers = (("plain/x", (4, 4, 4)), ("canny/x", (4, 4, 4)))  # as `extract --variant plain= --variant canny=…`
    store = write_store(tmp_path / "two", keys, images=root, layers=layers)
    specs = [FeatureSpec(0, "plain/x", (4, 4, 4)), FeatureSpec(0, "canny/x", (4, 4, 4))]
    weighted = SegModel(specs, K, HeadConfig(variants="weighted", hidden=8))
    assert weighted.amalgamate is not None and weighted.amalgamate.positions == [[0, 1]]
    runs = {}
    for mode in ("concat", "weighted"):
        cfg = SegTrainConfig.from_dict(dict(features=[str(store)], masks=str(root), out=str(tmp_path / mode),
                                            iterations=2, batch_size=2, hidden=8, variants=mode))
        runs[mode] = difffeat.spine.run.load_tensors(train_seg(cfg, progress=False) / "model.safetensors")[0]
    # concat: a conv projection per map; weighted: one per layer, after the learned sum over the two variants
    assert "amalgamate.logits.0" in runs["weighted"] and "amalgamate.logits.0" not in runs["concat"]
    assert "head.proj.1.0.weight" in runs["concat"] and "head.proj.1.0.weight" not in runs["weighted"]


def test_weighted_with_one_variant_is_an_error_never_a_silent_concat(flat, tmp_path, capsys):
    root, store, _ = flat
    for specs in ([FeatureSpec(0, "x", (4, 4, 4))], [FeatureSpec(0, "plain/x", (4, 4, 4))],
                  [FeatureSpec(0, "x", (4, 4, 4)), FeatureSpec(0, "y", (2, 8, 8))]):
        with pytest.raises(ConfigError, match="weighted needs two or more feature variants") as e:
            SegModel(specs, K, HeadConfig(variants="weighted"))
        assert e.value.field == "variants"
    rc, err = run_cli(["train-seg", "--features", str(store), "--masks", str(root), "--out", str(tmp_path / "r"),
                       "--variants", "weighted", "--iterations", "1"], capsys)
    assert rc == 2 and err.startswith("difffeat: error: --variants: weighted needs two or more") and "\n" not in err


# ----------------------------------------------------------------------------------- the command line
OLD_TRAIN_SEG_DEFAULTS = {  # the flags and defaults of train-seg before its options came from SegTrainConfig
    "features": None, "masks": None, "classes": None, "out": "RUN", "split": None, "val_split": None, "layers": None,
    "mask_size": "resize", "head": "conv", "variants": "concat", "ensemble": 10, "hidden": 128, "loss": "ce",
    "auc_weight": 0.5, "margin": 1.0, "class_weights": "none", "memory_bank": False, "bank_capacity": 5,
    "bank_sample_ratio": 1.0, "iterations": 2000, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01,
    "warmup_iterations": 0, "seed": 0, "checkpoint_every": 500, "eval_every": 0, "mixed_precision": "no",
    "num_workers": 0, "stop_after": None, "resume": False, "overwrite": False, "config": None,
}


def test_cli_flags_and_defaults_are_the_documented_ones():
    from difffeat.cli import build_parser
    from difffeat.spine.config_cli import config_from_args
    from downstream.losses.aucseg import DEFAULT_AUC_WEIGHT, DEFAULT_MARGIN

    args = build_parser().parse_args(["train-seg", "--out", "RUN"])
    # the head's options: a sub-config (--head, --variants, --ensemble, --hidden are its flags)
    cfg = config_from_args(SegTrainConfig, build_parser().parse_args(["train-seg", "--features", "f", "--out", "o"]))
    head = {"head": cfg.head.kind, **{k: getattr(cfg.head, k) for k in ("variants", "ensemble", "hidden")}}
    assert {k: head[k] if k in head else getattr(args, k) for k in OLD_TRAIN_SEG_DEFAULTS} == OLD_TRAIN_SEG_DEFAULTS
    args = build_parser().parse_args(["train-seg", "--out", "R", "--features", "a", "--features", "b", "--masks", "m",
                                      "--layer", "x", "--warmup", "7", "--memory-bank", "--no-normalize"])
    assert (args.features, args.layers, args.warmup_iterations, args.memory_bank, getattr(args, "head.normalize")) == (
        ["a", "b"], ["x"], 7, True, False)
    fields = SegTrainConfig.__dataclass_fields__
    assert (fields["auc_weight"].default, fields["margin"].default) == (DEFAULT_AUC_WEIGHT, DEFAULT_MARGIN)
    args = build_parser().parse_args(["eval-seg", "--run", "R", "--features", "f", "--masks", "m"])
    assert (args.split, args.out, args.mask_size, args.batch_size) == (None, None, None, 16)


def test_cli_config_errors_name_the_flag(flat, tmp_path, capsys):
    root, store, _ = flat
    base = ["train-seg", "--features", str(store), "--masks", str(root), "--out", str(tmp_path / "r")]
    no_tail = tmp_path / "classes.json"
    no_tail.write_text(json.dumps({"names": ["a", "b", "c"], "groups": {"head": ["a"], "middle": ["b", "c"]}}))
    for extra, message in [(["--lr", "nan"], "--lr: must be a finite number"),
                           (["--warmup", "-1"], "--warmup: must be ≥ 0"),
                           (["--bank-sample-ratio", "2"], "--bank-sample-ratio: must be ≤ 1"),
                           (["--memory-bank", "--classes", str(no_tail)], "--memory-bank: needs tail classes")]:
        rc, err = run_cli(base + extra, capsys)
        assert rc == 2 and message in err and "\n" not in err, (extra, err)
    rc, err = run_cli(["train-seg", "--masks", str(root), "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "--features: give at least one feature store" in err


def test_memory_bank_without_groups_uses_the_count_grouping(flat, tmp_path):
    root, store, _ = flat  # classes.json has no groups: the tail comes from the training pixel counts
    cfg = SegTrainConfig.from_dict(dict(features=[str(store)], masks=str(root), out=str(tmp_path / "run"), iterations=1,
                                        batch_size=2, hidden=8, memory_bank=True))
    saved = json.loads((train_seg(cfg, progress=False) / "config.json").read_text())
    assert saved["kind"] == "train-seg" and saved["classes"]["groups"]["tail"]
    assert SegClasses.from_dict(saved["classes"]).tail_ids()


def test_the_cli_module_loads_without_torch():
    code = "import sys, downstream.seg.cli, downstream.seg; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_seg_replaces_its_own_scores_and_nothing_else(flat, tmp_path, capsys):
    root, store, _ = flat
    cfg = SegTrainConfig.from_dict(dict(features=[str(store)], masks=str(root), out=str(tmp_path / "run"), iterations=1,
                                        batch_size=2, hidden=8))
    run = train_seg(cfg, progress=False)
    args = ["eval-seg", "--run", str(run), "--features", str(store), "--masks", str(root)]
    for _ in range(2):  # again: its own earlier scores are replaced
        rc, err = run_cli(args, capsys)
        assert rc == 0, err
    saved = json.loads((run / "eval-all" / "config.json").read_text())
    assert saved["kind"] == "eval-seg" and (run / "eval-all" / "metrics.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("my own notes")
    for out in (mine, run):  # a folder of the user's, and the training run itself, are never written into
        rc, err = run_cli([*args, "--out", str(out)], capsys)
        assert rc == 2 and "is not a difffeat eval-seg run" in err and "\n" not in err, err
    assert (mine / "metrics.json").read_text() == "my own notes"


def test_head_options_are_a_sub_config_and_older_flat_configs_load(tmp_path, capsys):
    """train-seg's head options: one sub-config (`head`), saved nested; a config written before the nesting (the
    head's kind under "head", its options at the top) loads to the same values, and an error names the flag."""
    import json

    from difffeat.cli import main
    from difffeat.spine.run import ConfigError
    from downstream.seg.config import HeadConfig

    flat = {"features": ["f"], "out": "o", "head": "mlp", "hidden": 16, "variants": "weighted", "normalize": False}
    cfg = SegTrainConfig.from_dict(flat)
    assert cfg.head == HeadConfig(kind="mlp", hidden=16, variants="weighted", normalize=False)
    saved = cfg.to_dict()
    assert saved["head"]["kind"] == "mlp" and "hidden" not in saved and SegTrainConfig.from_dict(saved) == cfg
    (tmp_path / "config.json").write_text(json.dumps({"config": flat}))
    assert SegTrainConfig.from_run(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match=r"^head\.dropout: must be ≤ 1"):
        SegTrainConfig.from_dict({**flat, "dropout": 2.0})
    assert main(["train-seg", "--features", "f", "--out", str(tmp_path / "x"), "--dropout", "2"]) == 2
    assert capsys.readouterr().err.strip() == "difffeat: error: --dropout: must be ≤ 1, got 2.0"
