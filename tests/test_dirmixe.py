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
    logit_shift,
    semi_variance,
    stops_after_pass,
)
from downstream.losses.prior import PRIOR_FLOOR

tta = dirmixe_module.test_time_aggregation  # not imported by name: pytest would collect it as a test

COUNTS = np.array([500, 200, 80, 30, 10, 4], dtype=float)


def test_doctests():
    result = doctest.testmod(dirmixe_module)
    assert result.attempted > 0 and result.failed == 0, result  # examples that vanish fail too


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
    # the released form log(w^τ/π^τ + 1e-9) (scongl/DirMixE model/loss.py), written out: equal on ordinary draws
    code = z[ks] - torch.log(w[:, None].double() ** tau / prior ** tau + 1e-9).float()
    code_losses = F.cross_entropy(code.reshape(-1, 6), y.repeat(4), reduction="none").view(4, 5).mean(1)
    assert torch.allclose(code_losses, got, rtol=1e-6)
    # … and where w underflows the shift is the released clamp log 1e-9, finite (no inf / NaN)
    empty = torch.zeros(1, 6, dtype=torch.float64).index_fill_(1, torch.tensor([0]), 1.0)
    out = draw_losses(z, y, torch.tensor([0]), empty, torch.log(prior), tau)
    assert torch.isfinite(out).all()
    shift = logit_shift(empty, torch.log(prior), tau)[0]
    assert torch.equal(shift[1:], torch.full((5,), math.log(1e-9), dtype=torch.float64))
    assert float(shift[0]) == pytest.approx(math.log(1.0 / float(prior[0]) ** tau + 1e-9), rel=1e-12)


def released_shift(w: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """scongl/DirMixE `LogitAdjustExpertLoss.forward`: log(w^power / prior^power + 1e-9), in float64."""
    with np.errstate(under="ignore"):
        return np.log(w ** tau / prior ** tau + 1e-9)


def test_logit_shift_on_imagenet_scale_priors_is_the_released_clamp():
    """ImageNet-LT-like counts (1,280 … 5 over 1,000 classes): α0·π_c < 1 for rare classes (α0 = 1e4), so the
    forward component's draws are often far below 1e-8. The shift equals the released formula there, and its
    worst class errs much less than difffeat's former exact shift with w floored at 1e-8."""
    counts = np.floor(1280 * (5 / 1280) ** (np.arange(1000) / 999))
    prior = counts / counts.sum()
    assert (1e4 * prior < 1).sum() > 100
    pool = DrawPool(counts, trials=20, iterations=1, concentration=1e4, seed=0)
    _, w = pool.meta.sample(200, seed=3, component=0)  # the forward-LT component
    assert (w < 1e-8).any(axis=1).mean() > 0.9  # nearly every draw leaves some class near-empty
    tau = 1.6
    ours = logit_shift(torch.as_tensor(w), torch.log(torch.as_tensor(prior)), tau).numpy()
    reference = released_shift(w, prior, tau)
    assert np.abs(ours - reference).max() < 1e-9 and ours.min() >= math.log(1e-9) - 1e-12
    floored = np.maximum(w, PRIOR_FLOOR)
    former = tau * (np.log(floored / floored.sum(1, keepdims=True)) - np.log(prior))
    worst_former = np.median(np.abs(former - reference).max(1))
    worst_ours = np.median(np.abs(ours - reference).max(1))
    assert worst_ours < 1e-9 < 1.0 < worst_former
    assert pool.w.shape == (20, 1000) and torch.isfinite(pool.draws(0, 0)[1]).all()


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
        x, y = sample(prior, 10000)  # CIFAR's test-set size: 79 batches per pass, one sweep each
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


def test_aggregation_stops_once_a_weight_rounds_below_the_threshold():
    experts, sample = _gaussian_world()
    x, _ = sample([0.03, 0.07, 0.2, 0.7], 2000)
    _, log = tta(experts, x, AggregationConfig(epochs=5, lr=1.0), seed=0)
    assert len(log) < 5 and round(min(log[-1]["weights"]), 2) < 0.05
    assert all(round(min(r["weights"]), 2) >= 0.05 for r in log[:-1])
    # SADE's test: np.round(ω, 2) < 0.05, so 0.046 (→ 0.05) goes on and 0.044 (→ 0.04) stops
    assert not stops_after_pass(torch.tensor([0.046, 0.5, 0.454]), 0.05)
    assert stops_after_pass(torch.tensor([0.044, 0.5, 0.456]), 0.05)
    assert not stops_after_pass(torch.tensor([0.05, 0.45, 0.5]), 0.05)


def test_aggregation_makes_one_pass_over_the_set_as_sade():
    """A pass is one shuffled sweep in batches of 128, the last one partial (SADE's DataLoader without
    drop_last): 300 images give batches of 128, 128 and 44, each image once. steps_per_pass > 0 is the former
    schedule: that many full batches, cycling the set."""
    experts, sample = _gaussian_world()
    x, _ = sample([0.25] * 4, 300)
    seen = []

    def counting(v):
        seen.append(v)
        return experts(v)

    _, log = tta(counting, x, AggregationConfig(epochs=1, dropout=0.0, noise=0.0), seed=0)  # views = rows
    assert [len(v) for v in seen[::2]] == [128, 128, 44] and len(log) == 1  # two views per batch
    swept = torch.cat(seen[::2])
    assert torch.equal(swept[torch.argsort(swept[:, 0])], x[torch.argsort(x[:, 0])])  # each image once
    seen.clear()
    tta(counting, x, AggregationConfig(epochs=1, steps_per_pass=79), seed=0)
    assert [len(v) for v in seen[::2]] == [128] * 79
    seen.clear()
    tta(counting, x[:40], AggregationConfig(epochs=2), seed=0)  # a small set: one batch per pass
    assert [len(v) for v in seen[::2]] == [40, 40]
