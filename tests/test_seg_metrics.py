"""Segmentation metrics against a confusion matrix and IoUs computed by hand; the PNG reports."""

import doctest
import json

import pytest
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_jaccard_index

import downstream.seg.metrics as seg_metrics_module
from downstream.plots import save_confusion_png, save_curves_png
from downstream.seg.classes import SegClasses
from downstream.seg.metrics import SegMetrics, confusion_matrix

CLASSES = SegClasses(["a", "b", "c", "d"], groups={"head": ["a"], "middle": ["b"], "tail": ["c", "d"]})


def test_confusion_and_scores_by_hand():
    labels = torch.tensor([[0, 0, 0, 1, 1, 2, 255, 255]])
    preds = torch.tensor([[0, 0, 1, 1, 2, 0, 3, 2]])  # predictions on ignore pixels must not count
    m = confusion_matrix(preds, labels, 4)
    # Rows true, columns predicted, by hand from the six labelled pixels:
    assert m.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    metrics = SegMetrics(CLASSES)
    metrics.update(preds[:, :4], labels[:, :4])  # accumulated over batches
    metrics.update(preds[:, 4:], labels[:, 4:])
    assert torch.equal(metrics.matrix, m)
    s = metrics.compute()
    # IoU a = 2 / (3 + 3 − 2) = 0.5; b = 1 / (2 + 2 − 1) = 1/3; c = 0 / (1 + 1 − 0) = 0; d never true nor
    # predicted: undefined, left out of every mean.
    assert s["per_class_iou"] == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 0.0, "d": None})
    assert s["miou"] == pytest.approx((0.5 + 1 / 3 + 0.0) / 3)
    assert (s["miou_head"], s["miou_middle"], s["miou_tail"]) == pytest.approx((0.5, 1 / 3, 0.0))
    assert s["pixel_accuracy"] == pytest.approx(3 / 6)
    assert s["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert s["pixels"] == 6


@pytest.mark.parametrize("k, dtype", [(2, torch.int64), (4, torch.uint8), (13, torch.int64), (150, torch.int32)])
def test_confusion_equals_torchmetrics_on_full_size_masks(k, dtype):
    """The bincount confusion (int32 codes) is torchmetrics' multiclass confusion matrix, ignore pixels included."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    g = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (2, 375, 500), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
    labels = labels.to(dtype) if dtype != torch.int32 or k < 255 else labels
    preds = torch.randint(0, k, (2, 375, 500), generator=g)
    want = multiclass_confusion_matrix(preds.reshape(-1), labels.long().reshape(-1), k, ignore_index=255)
    kept = labels.clone()
    got = confusion_matrix(preds, labels, k)
    assert torch.equal(labels, kept)  # the caller's labels are left as they were
    assert got.dtype == torch.long and torch.equal(got, want.long())


def test_per_class_iou_agrees_with_torchmetrics_jaccard():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 9, 9), generator=g)
    preds = torch.where(torch.rand(3, 9, 9, generator=g) < 0.6, labels, torch.randint(0, 4, (3, 9, 9), generator=g))
    ours = SegMetrics(CLASSES)
    ours.update(preds, labels)
    ref = multiclass_jaccard_index(preds, labels, 4, average=None)
    assert list(ours.compute()["per_class_iou"].values()) == pytest.approx(ref.tolist())


def test_pngs(tmp_path):
    save_confusion_png(torch.tensor([[5, 1], [0, 3]]), ["x", "y"], tmp_path / "c.png")
    history = [{"iteration": i, "loss": 1 / i, "ce": 0.5 / i, "auc": 0.5 / i, "lr": 1e-3} for i in range(1, 5)]
    history.append({"iteration": 4, "val_miou": 0.4, "val_miou_tail": 0.1})
    save_curves_png(history, tmp_path / "curves.png")
    for name in ("c.png", "curves.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.width > 100
    assert not list(tmp_path.glob("*.tmp*"))


def test_docstring_examples():
    result = doctest.testmod(seg_metrics_module)
    assert result.attempted > 0 and result.failed == 0, result  # examples that vanish fail too


def test_summary_groups_runs_by_config_without_seed(tmp_path):
    from downstream.seg.summary import format_rows, summarize_runs

    runs = []
    for loss, seed, miou in [("ce", 0, 0.2), ("ce", 1, 0.4), ("aucseg", 0, 0.5)]:
        run = tmp_path / f"{loss}-{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"config": {"loss": loss, "seed": seed, "out": str(run)}}))
        (run / "metrics.json").write_text(json.dumps({"miou": miou, "miou_tail": None}))
        runs.append(run)
    rows = summarize_runs(runs)
    assert [(r["group"], r["seeds"]) for r in rows] == [('loss="ce"', [0, 1]), ('loss="aucseg"', [0])]
    assert rows[0]["miou"] == pytest.approx((0.3, 0.1414213), rel=1e-5) and rows[0]["miou_tail"] == (None, None)
    assert "30.0 ± 14.1" in format_rows(rows, markdown=True)
