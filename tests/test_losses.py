import doctest

import pytest
import torch
import torch.nn.functional as F

import downstream.losses.logit_adjusted as logit_adjusted_module
import downstream.losses.pixel_auc as pixel_auc_module
from downstream.losses import logit_adjusted_loss, pixel_auc_loss, pixel_auc_loss_pairwise


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auc_moment_form_equals_pairwise_definition(seed):
    g = torch.Generator().manual_seed(seed)
    k = 6
    logits = torch.randn(2, k, 7, 9, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k - 1, (2, 7, 9), generator=g)  # class k-1 absent
    labels[0, :2] = 255
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    fast, slow = pixel_auc_loss(a, labels, margin=0.7), pixel_auc_loss_pairwise(b, labels, margin=0.7)
    assert torch.allclose(fast, slow, rtol=1e-10)
    fast.backward()
    slow.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-8, atol=1e-12)


def test_pixel_auc_by_hand_and_edge_cases():
    # Two pixels, two classes: ℓ(0|1) = (1 − s00 + s10)², ℓ(1|0) = (1 − s11 + s01)², loss = their mean.
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 1.5]]]])
    s = torch.sigmoid(logits)[0, :, 0]  # s[c, p]
    expected = ((1 - s[0, 0] + s[0, 1]) ** 2 + (1 - s[1, 1] + s[1, 0]) ** 2) / 2
    assert torch.allclose(pixel_auc_loss(logits, torch.tensor([[[0, 1]]])), expected)
    one = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = pixel_auc_loss(one, torch.zeros(1, 4, 4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert one.grad is not None and torch.all(one.grad == 0)
    everything_ignored = torch.full((1, 4, 4), 255)
    assert pixel_auc_loss(one, everything_ignored).item() == 0.0


def test_logit_adjusted_loss_matches_cross_entropy_of_shifted_logits():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    counts = torch.tensor([500.0, 100, 20, 5, 1])
    ref = F.cross_entropy(logits + 0.5 * torch.log(counts / counts.sum()), y)
    assert torch.allclose(logit_adjusted_loss(logits, y, counts, tau=0.5), ref)
    assert torch.allclose(logit_adjusted_loss(logits, y, torch.ones(5)), F.cross_entropy(logits, y))


def test_docstring_examples():
    for module in (pixel_auc_module, logit_adjusted_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)  # none may vanish


def test_logit_adjusted_loss_is_finite_with_a_zero_count_class():
    logits = torch.zeros(2, 2, requires_grad=True)
    loss = logit_adjusted_loss(logits, torch.tensor([1, 1]), torch.tensor([5.0, 0.0]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
