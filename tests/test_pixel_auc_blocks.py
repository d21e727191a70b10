"""`pixel_auc_loss`'s blocked moment pass (`_ClassMoments`): several blocks, batches, dtypes and its
hand-written backward, against the pairwise definition and torch.autograd.gradcheck."""

import pytest
import torch

import downstream.losses.pixel_auc as pixel_auc_module
from downstream.losses import pixel_auc_loss, pixel_auc_loss_pairwise


def inputs(seed, b=3, k=5, h=7, w=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, k, h, w, generator=g) * 2).to(dtype)
    labels = torch.randint(0, k - 1, (b, h, w), generator=g)  # class k − 1 absent
    labels[0, :2] = 255
    labels[b - 1, :, -1] = 255
    return logits, labels


@pytest.mark.parametrize(("block_elements", "max_pixels"), [(1, 1 << 14), (7, 1 << 14), (40, 1 << 14),
                                                        (1 << 19, 1 << 14), (1 << 19, 5)])
def test_blocked_moments_equal_pairwise_value_and_gradient(monkeypatch, block_elements, max_pixels):
    # B·K = 15: 1 and 7 elements give one pixel per block; 40: 2 pixels; 2¹⁹: one block of all n = 42
    # pixels, or blocks of 5 (a short last block) under the pixel cap.
    monkeypatch.setattr(pixel_auc_module, "CPU_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(pixel_auc_module, "MAX_BLOCK_PIXELS", max_pixels)
    logits, labels = inputs(block_elements + max_pixels)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = pixel_auc_loss(a, labels, margin=0.8)
    slow = pixel_auc_loss_pairwise(b, labels, margin=0.8)
    assert torch.allclose(fast, slow, rtol=1e-10)
    fast.backward()
    slow.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12)
    assert torch.all(a.grad[0, :, :2] == 0)  # ignored pixels get no gradient


def test_class_moments_backward_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(pixel_auc_module, "CPU_BLOCK_ELEMENTS", 9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bins = torch.tensor([[0, 1, 3, 2, 0], [1, 1, 0, 3, 2]]).view(2, 1, 5)  # 3 = the ignore bin
    assert torch.autograd.gradcheck(lambda t: pixel_auc_module._ClassMoments.apply(t, bins), (x,))
    # One output unused: its gradient arrives as None.
    assert torch.autograd.gradcheck(lambda t: pixel_auc_module._ClassMoments.apply(t, bins)[1], (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_logits_match_float64(monkeypatch, dtype):
    monkeypatch.setattr(pixel_auc_module, "CPU_BLOCK_ELEMENTS", 32)
    logits, labels = inputs(5, dtype=dtype)
    x = logits.clone().requires_grad_()
    ref = logits.double().requires_grad_()
    got, want = pixel_auc_loss(x, labels), pixel_auc_loss(ref, labels)
    assert got.dtype == dtype
    got.backward()
    want.backward()
    assert x.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    assert torch.allclose(x.grad.double(), ref.grad, rtol=tol * 10, atol=tol * ref.grad.abs().max().item())


def test_labels_outside_the_classes_are_refused():
    logits, labels = inputs(0, b=1)
    for bad in (5, 7, -1):
        wrong = labels.clone()
        wrong[0, 3, 3] = bad
        with pytest.raises(ValueError, match=f"label {bad} "):
            pixel_auc_loss(logits, wrong)
