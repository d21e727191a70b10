"""DirMixE: Dirichlet draws around the configured means, the per-draw loss, the semi-variance, the final phase,
and SADE's test-time aggregation, each against an independent computation."""

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import downstream.cls.dirmixe as dirmixe_module
from downstream.cls.dirmixe import (
    AggregationConfig,
    DirMixEHead,
    DirMixELoss,
    DrawPool,
    aggregate,
    aggregation_loss,
    dirmixe_objective,
    draw_losses,
    is_final_phase,
    semi_variance,
)
from downstream.losses.prior import PRIOR_FLOOR

tta = dirmixe_module.test_time_aggregation  # not imported by name: pytest would collect it as a test

COUNTS = np.array([500, 200, 80, 30, 10, 4], dtype=float)


def test_doctests():
    assert doctest.testmod(dirmixe_module).failed == 0


def test_dirichlet_draws_have_the_configured_means():
    prior = COUNTS / COUNTS.sum()
    inverse = prior[::-1]  # counts are sorted, so the inverse prior is the reversed vector
    pool = DrawPool(COUNTS, trials=60, iterations=200, concentration=1e3, seed=1)
    ks, w = pool.ks.numpy(), pool.w.numpy()
    assert np.allclose(w.sum(1), 1) and (w > 0).all()
    assert abs((ks == 0).mean() - 1 / 3) < 0.02 and abs((ks == 2).mean() - 1 / 3) < 0.02  # p_k = 1/3
    for k, mean in enumerate([prior, np.full(6, 1 / 6), inverse]):
        draws = w[ks == k]
        # Dir(α0·π): E w = π, Var w_c = π_c(1 − π_c)/(α0 + 1); the sample mean is within 5 standard errors.
        se = np.sqrt(mean * (1 - mean) / (1e3 + 1) / len(draws))
        assert np.all(np.abs(draws.mean(0) - mean) < 5 * se + 1e-12), k
        assert np.allclose(draws.var(0), mean * (1 - mean) / 1001, rtol=0.15)
    # every epoch reshuffles the same pool; T draws per iteration; a resumed run sees the same draws
    ks0, w0 = pool.draws(epoch=3, iteration=5)
    assert ks0.shape == (60,) and w0.shape == (60, 6)
    again = DrawPool(COUNTS, trials=60, iterations=200, concentration=1e3, seed=1).draws(3, 5)
    assert torch.equal(ks0, again[0]) and torch.equal(w0, again[1])
    epoch = torch.cat([pool.draws(4, i)[1] for i in range(200)])
    assert torch.equal(epoch[torch.argsort(epoch[:, 0])], pool.w[torch.argsort(pool.w[:, 0])])


def test_semi_variance_against_the_direct_formula():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 60):
        values = rng.gamma(2.0, 1.0, n)
        m = values.mean()
        above = values[values > m]
        direct = ((above - m) ** 2).sum() / max(len(above) - 1, 1)
        assert float(semi_variance(torch.tensor(values))) == pytest.approx(direct, rel=1e-12, abs=1e-15)
    losses = torch.tensor([1.0, 2.0, 4.0, 9.0], requires_grad=True)  # m = 4: 9 above, V₊ = 25 / 1
    total = dirmixe_objective(losses, final_phase=True, lambda_var=2.0)
    assert float(total.detach()) == pytest.approx(4.0 + 2 * 25.0)
    assert float(dirmixe_objective(losses.detach(), final_phase=False, lambda_var=2.0)) == pytest.approx(4.0)
    total.backward()  # m is not detached: d/dℓ_t of m + λ·(ℓ_4 − m)² = ¼ − 2λ(ℓ_4 − m)·¼ for t ≠ 4
    assert losses.grad.tolist() == pytest.approx([0.25 - 5.0, 0.25 - 5.0, 0.25 - 5.0, 0.25 + 2 * 2 * 5 * 0.75])


def test_final_phase_switches_where_the_code_does():
    assert not is_final_phase(159, 200) and is_final_phase(160, 200)  # 1-based epoch 161 of 200
    assert not is_final_phase(143, 180) and is_final_phase(144, 180)  # 145 of 180 (ImageNet-LT)
    assert not is_final_phase(79, 100) and is_final_phase(80, 100)  # 81 of 100 (iNat)


def test_per_draw_loss_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 6, generator=g)
    y = torch.tensor([0, 1, 5, 3, 5])
    ks = torch.tensor([2, 0, 1, 2])
    w = torch.distributions.Dirichlet(torch.ones(6)).sample((4,))
    prior = torch.tensor(COUNTS / COUNTS.sum())
    tau = 1.3
    got = draw_losses(z, y, ks, w, torch.log(prior), tau)
    for t in range(4):
        shifted = z[ks[t]] - tau * (torch.log(w[t]) - torch.log(prior)).float()
        direct = -(shifted.log_softmax(-1)[torch.arange(5), y]).mean()
        assert float(got[t]) == pytest.approx(float(direct), rel=1e-5)
    # the code's eps form log(w^τ/π^τ + 1e-9) agrees while w^τ/π^τ ≫ 1e-9 …
    code = z[ks] - torch.log(w[:, None] ** tau / prior.float() ** tau + 1e-9)
    code_losses = F.cross_entropy(code.reshape(-1, 6), y.repeat(4), reduction="none").view(4, 5).mean(1)
    assert torch.allclose(code_losses, got, rtol=1e-4)
    # … and ours stays exact and finite where w underflows (floored at PRIOR_FLOOR, no inf / NaN)
    tiny = torch.zeros(1, 6).index_fill_(1, torch.tensor([0]), 1.0)
    out = draw_losses(z, y, torch.tensor([0]), tiny, torch.log(prior), tau)
    assert torch.isfinite(out).all()
    shift = tau * (math.log(PRIOR_FLOOR) - torch.log(prior[1]))
    assert float(out[0]) > float(shift) - 50  # the rare-class shift is the exact −τ·log(1e-8/π), not −20.7


def test_loss_with_a_zero_count_class_is_finite_and_trains_every_expert():
    counts = np.array([50, 10, 0, 3])
    loss_fn = DirMixELoss(counts, tau=1.3, lambda_var=5.0)
    pool = DrawPool(counts, trials=12, iterations=1, seed=0)
    head = DirMixEHead(5, 4, hidden=8)
    x, y = torch.randn(16, 5), torch.tensor([0, 1, 3, 0] * 4)
    loss = loss_fn(head(x), y, *pool.draws(0, 0), final_phase=True)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [c.weight.grad for c in head.classifiers]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    used = set(pool.draws(0, 0)[0].tolist())
    assert all((g.abs().sum() > 0) == (k in used) for k, g in enumerate(grads))


def _gaussian_world():
    """4 classes in R^6 with unit covariance; experts = Bayes rules under forward, uniform and backward priors."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 6, generator=g) * 1.2
    train = torch.tensor([0.7, 0.2, 0.07, 0.03])
    priors = [train, torch.full((4,), 0.25), train.flip(0)]

    def experts(x):
        ll = -0.5 * torch.cdist(x, mu) ** 2
        return torch.stack([ll + torch.log(p) for p in priors])

    def sample(prior, n):
        y = torch.multinomial(torch.tensor(prior), n, replacement=True, generator=g)
        return mu[y] + torch.randn(n, 6, generator=g), y

    return experts, sample


def test_test_time_aggregation_weights_sum_to_one_and_follow_the_shift():
    experts, sample = _gaussian_world()
    for prior, best in (([0.03, 0.07, 0.2, 0.7], 2), ([0.7, 0.2, 0.07, 0.03], 0)):
        x, y = sample(prior, 400)
        weights, log = tta(experts, x, AggregationConfig(), seed=0)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6) and (weights > 0).all()
        assert int(weights.argmax()) == best and len(log) <= 5
        assert all(sum(r["weights"]) == pytest.approx(1.0, abs=1e-6) for r in log)
        z = experts(x)
        equal = (aggregate(z).argmax(-1) == y).float().mean()
        adapted = (aggregate(z, weights).argmax(-1) == y).float().mean()
        assert adapted > equal + 0.01, (prior, float(equal), float(adapted))
    # the objective is SADE's: −mean cos(softmax(Σ ω_k z_k(x1)), softmax(Σ ω_k z_k(x2)))
    z1, z2 = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    a = torch.tensor([0.3, -1.0, 0.2])
    w = torch.softmax(a, 0)
    p1 = torch.softmax(sum(w[k] * z1[k] for k in range(3)), -1)
    p2 = torch.softmax(sum(w[k] * z2[k] for k in range(3)), -1)
    direct = -((p1 * p2).sum(1) / (p1.norm(dim=1) * p2.norm(dim=1))).mean()
    assert float(aggregation_loss(a, z1, z2)) == pytest.approx(float(direct), rel=1e-6)


def test_aggregation_stops_once_a_weight_is_small():
    experts, sample = _gaussian_world()
    x, _ = sample([0.03, 0.07, 0.2, 0.7], 200)
    _, log = tta(experts, x, AggregationConfig(epochs=5, lr=1.0), seed=0)
    assert len(log) < 5 and min(log[-1]["weights"]) < 0.05
    assert all(min(r["weights"]) >= 0.05 for r in log[:-1])
