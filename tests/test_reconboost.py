"""ReconBoost across feature sources: the KL reconcilement term against a direct computation, the alternation,
and which parameters each phase trains; the weighted-sum fusion it is compared with."""

import pytest
import torch
import torch.nn.functional as F

from downstream.cls.model import WeightedSources
from downstream.cls.reconboost import (
    ReconBoostConfig,
    ReconBoostModel,
    phase_loss,
    phase_optimizer,
    reconcilement_loss,
    schedule,
)


def _kl(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(t ‖ p) = Σ_c t_c (log t_c − log p_c) per row, with 0·log 0 = 0 (t need not sum to 1)."""
    safe = torch.where(t > 0, t, torch.ones_like(t))
    return (t * (torch.log(safe) - torch.log(p))).sum(1)


def test_reconcilement_term_is_the_kl_regulariser():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    others = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    l1, l2, c = 5.0, 1.0, 5
    loss = reconcilement_loss(logits, others, y, l1, l2)

    p = torch.softmax(logits, 1)
    q = torch.softmax(others, 1)
    onehot = F.one_hot(y, c).double()
    ce = -(onehot * torch.log(p)).sum(1)
    kl = _kl(onehot * q, p)  # KL(y⊙q ‖ p) = q_y log q_y − q_y log p_y
    q_y = q[torch.arange(6), y]
    direct = ((l1 * ce - l2 * kl) / c + l2 * q_y * torch.log(q_y) / c).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    # the constant does not depend on φ_m: the gradient is that of (λ₁·CE − λ₂·KL)/C
    (grad,) = torch.autograd.grad(loss, logits)
    (want,) = torch.autograd.grad(((l1 * ce - l2 * kl) / c).mean(), logits)
    assert torch.allclose(grad, want, atol=1e-12)
    # the code's form, −mean over classes of one-hot · (λ₁ − λ₂ q) · log p
    code = (-(onehot * (l1 - l2 * q) * torch.log(p)).mean(-1)).mean()
    assert loss.item() == pytest.approx(code.item(), rel=1e-12)
    # no gradient into the other sources; λ₂ = 0 is plain CE scaled by λ₁/C
    others.requires_grad_()
    reconcilement_loss(logits, others, y, l1, l2).backward()
    assert others.grad is None
    assert reconcilement_loss(logits, others, y, 3.0, 0.0).item() == pytest.approx(
        (3.0 * F.cross_entropy(logits, y) / c).item(), rel=1e-12)
    # a logit adjustment enters both softmaxes
    a = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64))
    assert reconcilement_loss(logits, others, y, l1, l2, adjust=a).item() == pytest.approx(
        reconcilement_loss(logits + a, others + a, y, l1, l2).item(), rel=1e-12)


def test_samples_the_others_get_wrong_weigh_more():
    logits = torch.zeros(2, 3, requires_grad=True)
    others = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])  # right on sample 0, wrong on sample 1
    reconcilement_loss(logits, others, torch.tensor([0, 0]), 5.0, 1.0).backward()
    g = logits.grad[:, 0]  # d/dz_y = −(λ₁ − λ₂ q_y)(1 − p_y)/(C·B)
    assert float(g[1]) < float(g[0]) < 0
    q = torch.softmax(others, 1)[:, 0]
    assert float(g[1] / g[0]) == pytest.approx(float((5.0 - q[1]) / (5.0 - q[0])), rel=1e-5)


def test_schedule_alternates_sources_then_rectifies():
    cfg = ReconBoostConfig(stages=4, stage_epochs=2, correct_epochs=1)
    got = [schedule(e, cfg, 2) for e in range(cfg.epochs)]
    assert cfg.epochs == 12
    assert got[:6] == [(0, "update", 0), (0, "update", 0), (0, "rectify", 0),
                       (1, "update", 1), (1, "update", 1), (1, "rectify", 1)]
    assert got[6][2] == 0 and got[9][2] == 1


def test_an_update_trains_one_source_and_the_shared_head_only():
    torch.manual_seed(0)
    model = ReconBoostModel([4, 3, 5], num_classes=3, hidden=8, head_hidden=6)
    cfg = ReconBoostConfig(lr=0.1)
    blocks = [torch.randn(10, d) for d in (4, 3, 5)]
    y = torch.randint(0, 3, (10,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = phase_optimizer(model, "update", 1, cfg)
    phase_loss(model, blocks, y, "update", 1, cfg).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoders.1.0.weight", "encoders.1.0.bias", "head.0.weight", "head.0.bias", "head.2.weight",
                       "head.2.bias"}
    # rectification: CE of β·Σ_m φ_m, every parameter (β included) trains
    logits = model(blocks)
    direct = model.boost_rate * sum(model.head(model.encoders[m](x)) for m, x in enumerate(blocks))
    assert torch.allclose(logits, direct)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = phase_optimizer(model, "rectify", 0, cfg)
    loss = phase_loss(model, blocks, y, "rectify", 0, cfg)
    assert loss.item() == pytest.approx(F.cross_entropy(direct, y).item(), rel=1e-6)
    loss.backward()
    opt.step()
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_weighted_sum_of_sources():
    ws = WeightedSources([4, 4], width=8)
    with torch.no_grad():
        ws.logits[0] = torch.tensor([0.0, 1.0, 2.0, -1.0])
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    w = torch.softmax(ws.logits.detach(), 0)
    assert torch.allclose(ws([a, b]), w[0] * a + w[1] * b)  # per-feature softmax over sources, no projection
    assert sum(ws.source_weights()) == pytest.approx(1.0)
    projected = WeightedSources([4, 6], width=5)  # widths differ: project each to `width` first
    assert projected([a, torch.randn(3, 6)]).shape == (3, 5) and projected.out_features == 5
