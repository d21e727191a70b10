"""train-seg / eval-seg end to end on a tiny Shapes-LT set with random-weight features; exact resume; CLI errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.cli import main
from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore
from downstream.engine import batch_indices, poly_factor
from downstream.seg.config import SegTrainConfig
from downstream.seg.evaluate import eval_seg
from downstream.seg.pixel_store import write_pixel_store
from downstream.seg.train import train_seg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """30 Shapes-LT scenes (24 train, 3 val, 3 test) and their mini-random `dift` features."""
    from difffeat.data.shapes_lt import synthesize
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    root = tmp_path_factory.mktemp("seg")
    data = synthesize(root / "shapes", n=30, seed=5)
    run_extraction(ExtractRunConfig(images=str(data), out=str(root / "feat"), model="mini-random", layers=["dift"]),
                   progress=False)
    return root, data


def test_train_seg_and_eval_seg_cli_end_to_end(world, capsys):
    root, data = world
    run = root / "run-cli"
    rc = main(["--quiet", "train-seg", "--features", str(root / "feat"), "--masks", str(data), "--split", "train",
               "--val-split", "val", "--loss", "aucseg", "--memory-bank", "--head", "mlp", "--ensemble", "2",
               "--iterations", "6", "--batch-size", "4", "--checkpoint-every", "3", "--out", str(run)])
    assert rc == 0
    assert "trained" in capsys.readouterr().out
    for name in ("config.json", "report.json", "model.safetensors", "history.json", "curves.png", "metrics.json",
                 "confusion.png", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["loss"] == "aucseg" and saved["classes"]["groups"]["tail"]
    assert saved["specs"] == [{"variant": 0, "layer": "up_blocks.1", "shape": [64, 16, 16]}]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"miou", "miou_head", "miou_middle", "miou_tail", "pixel_accuracy", "per_class_iou"} <= set(metrics)
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == 3 * 64 * 64 and metrics["images"] == 3
    history = json.loads((run / "history.json").read_text())
    assert [h["iteration"] for h in history if "loss" in h] == [6] and all(np.isfinite(h["loss"])
                                                                           for h in history if "loss" in h)

    rc = main(["--quiet", "eval-seg", "--run", str(run), "--features", str(root / "feat"), "--masks", str(data),
               "--split", "test"])
    assert rc == 0 and "3 images: mIoU" in capsys.readouterr().out
    test_metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert test_metrics["split"] == "test" and (run / "eval-test" / "confusion.png").is_file()


def test_eval_scores_equal_a_direct_count(world):
    root, data = world
    cfg = SegTrainConfig.from_dict(dict(features=[str(root / "feat")], masks=str(data), out=str(root / "run-direct"),
                                        split="train", iterations=3, batch_size=4, hidden=16,
                                        cache_bytes=0))  # read on demand
    run = train_seg(cfg, progress=False)
    scores = eval_seg(run, [str(root / "feat")], str(data), split="val", progress=False)
    from downstream.seg.evaluate import load_run

    _, model, classes = load_run(run)
    store = FeatureStore(root / "feat")
    keys = [k for k in store.keys() if k.startswith("val/")]
    feats = torch.from_numpy(np.stack([store[k]["up_blocks.1"] for k in keys]))
    preds = model.predict([feats], (64, 64))
    masks = torch.from_numpy(np.stack([np.asarray(Image.open(data / k.replace("images", "masks")))
                                       for k in keys]).astype(np.int64))
    iou = {}
    for c, name in enumerate(classes.names):
        inter = ((preds == c) & (masks == c)).sum().item()
        union = ((preds == c) | (masks == c)).sum().item()
        iou[name] = inter / union if union else None
    assert scores["per_class_iou"] == pytest.approx(iou)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(world):
    root, data = world
    kw = dict(features=[str(root / "feat")], masks=str(data), split="train", iterations=6, batch_size=4,
              checkpoint_every=2, loss="aucseg", memory_bank=True, bank_sample_ratio=0.5, hidden=16, log_every=1)
    whole = train_seg(SegTrainConfig.from_dict(dict(out=str(root / "whole"), **kw)), progress=False)
    part = SegTrainConfig.from_dict(dict(out=str(root / "part"), **kw))
    train_seg(part, progress=False, stop_after=3)
    assert not (root / "part" / "model.safetensors").exists()
    assert json.loads((root / "part" / "checkpoints" / "latest.json").read_text())["step"] == 3
    with pytest.raises(UserError, match="holds a train-seg run; .*--resume"):
        train_seg(part, progress=False)
    train_seg(part, progress=False, resume=True)
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "model.safetensors")), load_file(str(root / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A run repeats from its config.json.
    assert main(["--quiet", "train-seg", "--config", str(whole / "config.json"), "--out", str(root / "again")]) == 0
    c = load_file(str(root / "again" / "model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    ha = json.loads((whole / "history.json").read_text())
    hb = json.loads((root / "part" / "history.json").read_text())
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb])


def test_pixel_store_and_variants(world):
    root, data = world
    pixels = write_pixel_store(data, root / "pixels", patch=4)
    store = FeatureStore(pixels)
    assert len(store) == 30 and store.shapes == {"pixels": (48, 16, 16)}
    key = "train/images/000002.png"
    rgb = np.asarray(Image.open(data / key), np.float32) / 255
    assert np.allclose(store[key]["pixels"][:, 3, 5].reshape(3, 4, 4), rgb[12:16, 20:24].transpose(2, 0, 1))
    cfg = SegTrainConfig.from_dict(dict(features=[str(root / "feat"), str(pixels)], masks=str(data),
                                        out=str(root / "run-two"), split="train", iterations=2, batch_size=4, hidden=8))
    train_seg(cfg, progress=False)  # concatenated variants of different channel counts
    saved = json.loads((root / "run-two" / "config.json").read_text())
    assert [s["variant"] for s in saved["specs"]] == [0, 1]


def test_cli_bad_input_is_one_line_and_exit_2(world, tmp_path, capsys):
    root, data = world
    masks = tmp_path / "masks"
    for split in ("train",):
        (masks / split / "images").mkdir(parents=True)
    bad = np.zeros((64, 64), np.uint8)
    bad[10, 10] = 20
    Image.fromarray(bad, "L").save(masks / "000000.png")
    store = tmp_path / "one"
    from difffeat.store.feature_store import FeatureStoreWriter

    with FeatureStoreWriter(store, {"resolution": [64, 64], "images": None}) as w:
        w.add("000000.png", {"x": np.zeros((2, 16, 16), np.float32)})
    cases = [
        (["train-seg", "--features", str(store), "--masks", str(masks), "--classes", str(data / "classes.json"),
          "--out", str(tmp_path / "r1")], "000000.png: label value 20 is not a class id (0..12)"),
        (["train-seg", "--features", str(tmp_path / "nope"), "--masks", str(data), "--out", str(tmp_path / "r2")],
         "not a difffeat feature store"),
        (["train-seg", "--features", str(root / "feat"), "--masks", str(data), "--split", "nosuch",
          "--out", str(tmp_path / "r3")], "no keys in split 'nosuch'"),
        (["train-seg", "--features", str(store), "--masks", str(masks), "--out", str(tmp_path / "r4")],
         "no classes.json there; give --classes"),
        (["eval-seg", "--run", str(tmp_path), "--features", str(root / "feat"), "--masks", str(data)],
         "not a train-seg run"),
    ]
    for argv, message in cases:
        assert main(["--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err


def test_schedule_and_batch_stream():
    assert poly_factor(0, 100) == 1.0 and poly_factor(50, 100) == 0.5 and poly_factor(25, 100, power=2) == 0.5625
    assert poly_factor(0, 100, warmup=10) == pytest.approx(1e-6) and poly_factor(5, 100, warmup=10) == pytest.approx(
        0.95 * (1 - 0.5 * (1 - 1e-6)))
    epoch = [i for it in range(3) for i in batch_indices(10, 3, seed=1, iteration=it)]
    assert len(set(epoch)) == 9  # one epoch: 3 batches of distinct samples, the last partial batch dropped
    assert batch_indices(10, 3, 1, 4) == batch_indices(10, 3, 1, 4) != batch_indices(10, 3, 2, 4)
    assert batch_indices(2, 8, 0, 0) in ([0, 1], [1, 0])  # fewer samples than a batch: all of them
