"""AUCSeg = CE + λ·pixel AUC, class weights, and the pixel AUC loss against the pairwise definition and
against the AUCSeg code's per-class loop (the benchmark's reference)."""

import doctest
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import downstream.losses.aucseg as aucseg_module
from downstream.losses import (
    SegLoss,
    aucseg_loss,
    class_weights_from_counts,
    pixel_auc_loss,
    pixel_auc_loss_pairwise,
    seg_cross_entropy,
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "auc_loss.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_auc_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(seed, k=5, absent=(3,), ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, k, 6, 5, generator=g, dtype=torch.float64) * 2
    present = [c for c in range(k) if c not in absent]
    labels = torch.tensor(present)[torch.randint(0, len(present), (2, 6, 5), generator=g)]
    if ignore:
        labels[1, :2] = 255
    return logits, labels


@pytest.mark.parametrize("seed", range(3))
def test_aucseg_is_ce_plus_lambda_times_pairwise_auc(seed):
    logits, labels = inputs(seed)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = aucseg_loss(a, labels, auc_weight=0.7, margin=0.9, class_weights=w)
    # Independent: CE by hand (weighted mean over non-ignored pixels) + the O(n²) pairwise AUC.
    keep = labels != 255
    logp = torch.log_softmax(b, 1).movedim(1, -1)[keep]
    y = labels[keep]
    ce = -(w[y] * logp[torch.arange(len(y)), y]).sum() / w[y].sum()
    want = ce + 0.7 * pixel_auc_loss_pairwise(b, labels, margin=0.9)
    assert torch.allclose(got, want, rtol=1e-10)
    got.backward()
    want.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def test_pixel_auc_single_present_class_and_ignore_pixels():
    logits, labels = inputs(0, absent=(1, 2, 3, 4))  # only class 0 (and ignore) present
    x = logits.clone().requires_grad_()
    loss = pixel_auc_loss(x, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # Ignored pixels do not count: changing their logits changes nothing.
    logits, labels = inputs(1)
    moved = logits.clone()
    moved[1, :, :2] += 5.0
    assert torch.allclose(pixel_auc_loss(logits, labels), pixel_auc_loss(moved, labels), rtol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_aucseg_code_per_class_loop_equals_the_moment_form(seed):
    loop = bench_module().per_class_loop_auc
    logits, labels = inputs(seed, k=7, absent=(2, 6))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast, slow = pixel_auc_loss(a, labels, margin=0.8), loop(b, labels, margin=0.8)
    assert torch.allclose(fast, slow, rtol=1e-10)
    fast.backward()
    slow.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def test_seg_loss_kinds_and_parts():
    logits, labels = inputs(2)
    logits = logits.float()
    total, parts = SegLoss("ce")(logits, labels)
    assert torch.allclose(total, F.cross_entropy(logits, labels, ignore_index=255))
    assert torch.allclose(parts["auc"], pixel_auc_loss(logits, labels))
    total, parts = SegLoss("aucseg", auc_weight=2.0)(logits, labels)
    assert torch.allclose(total, parts["ce"] + 2.0 * parts["auc"])
    with pytest.raises(ValueError, match="unknown loss"):
        SegLoss("focal")


def test_ce_average_all_is_mmseg_by_hand():
    """mmseg's CE (avg_non_ignore=False, AUCSeg's configs): Σ over valid pixels of w_y·ℓ, divided by every pixel.

    Four pixels, two classes, one ignored; logits (2, 0), (0, 1), (1, 1), ignored:
    ℓ = log(1 + e^(−2)), log(1 + e^(−1)), log 2. With w = (1, 3):
    "all"   = (1·ℓ₀ + 3·ℓ₁ + 3·ℓ₂) / 4,  "valid" (torch) = (1·ℓ₀ + 3·ℓ₁ + 3·ℓ₂) / (1 + 3 + 3).
    """
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 5.0]], [[0.0, 1.0, 1.0, -5.0]]]], dtype=torch.float64)
    labels = torch.tensor([[[0, 1, 1, 255]]])
    l0, l1, l2 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)
    assert seg_cross_entropy(logits, labels, average="all").item() == pytest.approx((l0 + l1 + l2) / 4, rel=1e-15)
    assert seg_cross_entropy(logits, labels).item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-15)
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    weighted = (l0 + 3 * l1 + 3 * l2)
    assert seg_cross_entropy(logits, labels, w, average="all").item() == pytest.approx(weighted / 4, rel=1e-15)
    assert seg_cross_entropy(logits, labels, w, average="valid").item() == pytest.approx(weighted / 7, rel=1e-15)
    # AUCSeg = CE_all + λ·AUC; with "valid" the same λ weighs the AUC n_valid/n_all times as much relative to CE
    auc = pixel_auc_loss(logits, labels).item()
    got = aucseg_loss(logits, labels, auc_weight=0.5, ce_average="all").item()
    assert got == pytest.approx((l0 + l1 + l2) / 4 + 0.5 * auc, rel=1e-14)
    total, parts = SegLoss("aucseg", auc_weight=0.5, ce_average="all")(logits, labels)
    assert total.item() == pytest.approx(got, rel=1e-15) and parts["ce"].item() == pytest.approx((l0 + l1 + l2) / 4)
    valid = aucseg_loss(logits, labels, auc_weight=0.5 * 4 / 3, ce_average="valid").item()  # λ·n_all/n_valid
    assert valid == pytest.approx(got * 4 / 3, rel=1e-14)  # the same objective, scaled by n_all/n_valid
    everything_ignored = torch.full((1, 1, 4), 255)
    assert seg_cross_entropy(logits, everything_ignored, average="all").item() == 0.0
    with pytest.raises(ValueError, match="ce_average"):
        SegLoss("aucseg", ce_average="mean")


@pytest.mark.parametrize("seed", range(3))
def test_ce_average_all_equals_mmseg_formula_with_gradients(seed):
    logits, labels = inputs(seed)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = seg_cross_entropy(a, labels, w, average="all")
    # mmseg cross_entropy: F.cross_entropy(reduction="none", weight) then weight_reduce_loss → .mean()
    want = F.cross_entropy(b, labels, weight=w, reduction="none", ignore_index=255).mean()
    assert torch.allclose(got, want, rtol=1e-14)
    got.backward()
    want.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-16)


def test_class_weights_from_counts():
    w = class_weights_from_counts([80, 20, 0], power=1.0)
    # w ∝ 1/freq over seen classes: (1/0.8, 1/0.2) = (1.25, 5), scaled to mean 1 → (0.4, 1.6); unseen 0.
    assert torch.allclose(w, torch.tensor([0.4, 1.6, 0.0]))
    assert torch.allclose(class_weights_from_counts([1, 4], power=0.5), torch.tensor([4 / 3, 2 / 3]))


def test_docstring_examples():
    result = doctest.testmod(aucseg_module)
    assert result.attempted > 0 and result.failed == 0, result  # examples that vanish fail too
