import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import downstream.losses.class_balanced as class_balanced_module
import downstream.losses.drauc as drauc_module
import downstream.losses.ldam as ldam_module
import downstream.losses.prior as prior_module
import downstream.losses.tkpr as tkpr_module
import downstream.losses.tla_adrw as tla_adrw_module
import downstream.losses.vs as vs_module
from difffeat.errors import UserError
from downstream.losses import logit_adjusted_loss
from downstream.losses.class_balanced import class_balanced_weights, deferred_switch_epoch, drw_weights
from downstream.losses.drauc import DRAUCLoss, distribution_aware_budgets, drauc_instance_loss
from downstream.losses.ldam import CosineClassifier, LDAMLoss, ldam_loss, ldam_margins
from downstream.losses.prior import PRIOR_FLOOR, class_prior
from downstream.losses.tkpr import SURROGATES, ranking_loss, tkpr, tkpr_loss, tkpr_surrogate_loss
from downstream.losses.tla_adrw import TLAADRWLoss, adrw_weights, tla_adrw_loss
from downstream.losses.vs import VSLoss, vs_loss


@pytest.fixture(autouse=True)
def _grad_enabled():  # a session fixture elsewhere switches autograd off
    with torch.enable_grad():
        yield


def ce(row, y):
    """Cross-entropy of one row of python floats, by hand."""
    return -row[y] + math.log(sum(math.exp(v) for v in row))


# ---- VS, LA -----------------------------------------------------------------------------------------------


def test_vs_loss_against_hand_formula():
    counts, gamma, tau = [4.0, 1.0, 3.0], 0.5, 0.7
    z = [[1.0, 2.0, -0.5], [0.3, -1.0, 0.8]]
    y = [1, 2]
    expected = []
    for row, t in zip(z, y):
        adj = [v * (n / 4.0) ** gamma + tau * math.log(n / 8.0) for v, n in zip(row, counts)]
        expected.append(ce(adj, t))
    got = vs_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(y), counts, gamma=gamma, tau=tau)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-12)


def test_vs_reduces_to_ce_and_la():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (12,), generator=g)
    counts = torch.tensor([500.0, 100, 20, 5, 1])
    assert torch.allclose(vs_loss(z, y, counts, gamma=0.0, tau=0.0), F.cross_entropy(z, y))
    assert torch.allclose(vs_loss(z, y, counts, gamma=0.0, tau=0.6), logit_adjusted_loss(z, y, counts, tau=0.6))
    # the truncated (TLA) form is LA whatever γ
    assert torch.allclose(vs_loss(z, y, counts, gamma=0.3, tau=0.6, multiplicative=False),
                          logit_adjusted_loss(z, y, counts, tau=0.6))
    assert torch.allclose(logit_adjusted_loss(z, y, counts, tau=0.0), F.cross_entropy(z, y))


def test_vs_per_pixel_equals_flattened_rows():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4, 5), generator=g)
    y[0, 0] = 255
    flat_z, flat_y = z.movedim(1, -1).reshape(-1, 3), y.reshape(-1)
    keep = flat_y != 255
    a = vs_loss(z, y, [5, 2, 1], gamma=0.2, tau=1.0, ignore_index=255)
    b = vs_loss(flat_z[keep], flat_y[keep], [5, 2, 1], gamma=0.2, tau=1.0)
    assert torch.allclose(a, b)


# ---- class-balanced, DRW, ADRW, TLA -------------------------------------------------------------------------


def test_class_balanced_weights_against_effective_number():
    counts, beta = [10, 2, 1], 0.9
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    expected = [3 * r / sum(raw) for r in raw]
    assert class_balanced_weights(counts, beta).tolist() == pytest.approx(expected, rel=1e-6)
    assert class_balanced_weights(counts, 0.0).tolist() == [1.0, 1.0, 1.0]
    zero = class_balanced_weights([10, 0, 1], beta)
    assert torch.isfinite(zero).all() and zero[1] == pytest.approx(zero[2])  # zero counts as one sample
    assert drw_weights(counts, epoch=159, switch_epoch=160).tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(drw_weights(counts, 160, 160, beta), class_balanced_weights(counts, beta))
    assert deferred_switch_epoch(200) == 160 and deferred_switch_epoch(400) == 320 and deferred_switch_epoch(50) == 40


def test_tla_adrw_against_weighted_mean_formula():
    counts, tau, nu = [6.0, 3.0, 1.0], 0.75, 0.25
    prior = [n / 10 for n in counts]
    raw = [p ** -nu for p in prior]
    w = [3 * r / sum(raw) for r in raw]
    assert adrw_weights(counts, nu).tolist() == pytest.approx(w, rel=1e-6)
    z, y = [[0.2, 1.0, -1.0], [2.0, 0.0, 0.5], [0.0, 0.1, 0.2]], [0, 2, 2]
    terms = [w[t] * ce([v + tau * math.log(p) for v, p in zip(row, prior)], t) for row, t in zip(z, y)]
    expected = sum(terms) / sum(w[t] for t in y)
    got = tla_adrw_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(y), counts, tau=tau, nu=nu)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tla_adrw_two_stages_switch_at_the_deferred_epoch():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    counts = [50, 20, 5, 1]
    loss = TLAADRWLoss(counts, total_epochs=10, gamma=0.1, tau=1.0, stage2_tau=0.5, nu=0.3)
    assert loss.switch_epoch == 8
    loss.set_epoch(7)
    assert loss.stage == 1 and torch.allclose(loss(z, y), vs_loss(z, y, counts, gamma=0.1, tau=1.0))
    loss.set_epoch(8)
    assert loss.stage == 2 and torch.allclose(loss(z, y), tla_adrw_loss(z, y, counts, tau=0.5, nu=0.3))
    # with ν = 0 the second stage is plain logit adjustment
    assert torch.allclose(tla_adrw_loss(z, y, counts, tau=0.5, nu=0.0), logit_adjusted_loss(z, y, counts, 0.5))


# ---- LDAM ---------------------------------------------------------------------------------------------------


def test_ldam_margins_loss_and_cosine_classifier_against_formulas():
    counts = [81.0, 16.0, 1.0]
    expected_m = [0.5 * n ** -0.25 / 1.0 for n in counts]
    assert ldam_margins(counts, 0.5).tolist() == pytest.approx(expected_m)
    head = CosineClassifier(3, 3).double()
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]], dtype=torch.float64)
    cos = head(x)
    w = head.weight.detach()
    for i in range(2):
        for c in range(3):
            direct = float(x[i] @ w[c]) / (float(x[i].norm()) * float(w[c].norm()))
            assert cos[i, c].item() == pytest.approx(direct, rel=1e-12)
    y, s = [2, 0], 30.0
    weight = [0.5, 1.0, 2.0]
    terms = []
    for i, t in enumerate(y):
        row = [s * (cos[i, c].item() - (expected_m[c] if c == t else 0.0)) for c in range(3)]
        terms.append(ce(row, t))
    plain = ldam_loss(cos, torch.tensor(y), torch.tensor(expected_m, dtype=torch.float64), scale=s)
    assert plain.item() == pytest.approx(sum(terms) / 2, rel=1e-10)
    weighted = LDAMLoss(counts, max_margin=0.5, scale=s, weight=torch.tensor(weight)).double()
    expected_w = sum(weight[t] * v for t, v in zip(y, terms)) / sum(weight[t] for t in y)
    assert weighted(cos, torch.tensor(y)).item() == pytest.approx(expected_w, rel=1e-6)


# ---- zero-count classes -------------------------------------------------------------------------------------


def test_zero_count_classes_never_give_nan():
    counts = [100, 0, 5]
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0, 2])  # the zero-count class does appear as a target
    prior = class_prior(counts)
    assert prior[1] == pytest.approx(PRIOR_FLOOR, rel=1e-6) and prior.sum() == pytest.approx(1.0)
    losses = [vs_loss(z, y, counts, gamma=0.3, tau=1.0), tla_adrw_loss(z, y, counts),
              ldam_loss(z.tanh(), y, ldam_margins(counts)),
              F.cross_entropy(z, y, weight=class_balanced_weights(counts).double()),
              F.cross_entropy(z, y, weight=adrw_weights(counts).double())]
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert ldam_margins(counts).tolist()[1] == 0.5
    with pytest.warns(UserWarning, match=r"\[1\]"):
        VSLoss(counts)
    with pytest.raises(UserError):
        class_prior([0, 0])
    with pytest.raises(UserError):
        class_prior([3, -1])


# ---- DRAUC --------------------------------------------------------------------------------------------------


def _auc_minmax_direct(h, pos, a, b, alpha, m=1.0, k=1.0):
    hp, hn = h[pos], h[~pos]
    return (((hp - a) ** 2).mean() + ((hn - b) ** 2).mean() + 2 * alpha * (m + hn.mean() - hp.mean())
            - k * alpha ** 2)


def test_drauc_instance_loss_means_to_the_minmax_objective():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0])
    a, b, alpha = (torch.tensor(v, dtype=torch.float64) for v in (0.7, 0.2, 0.4))
    inst = drauc_instance_loss(z, y, a, b, alpha, margin=0.8, alpha_penalty=1.5)
    direct = _auc_minmax_direct(torch.sigmoid(z), y == 1, a, b, alpha, 0.8, 1.5)
    assert inst.mean().item() == pytest.approx(direct.item(), rel=1e-12)
    # one-vs-rest: the mean over classes that have positives and negatives (class 3 is absent)
    zc = torch.randn(8, 4, generator=g, dtype=torch.float64)
    yc = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    ac, bc, alc = (torch.rand(4, generator=g, dtype=torch.float64) for _ in range(3))
    per_class = [_auc_minmax_direct(torch.sigmoid(zc[:, c]), yc == c, ac[c], bc[c], alc[c]) for c in range(3)]
    got = drauc_instance_loss(zc, yc, ac, bc, alc).mean()
    assert got.item() == pytest.approx(torch.stack(per_class).mean().item(), rel=1e-12)
    # no class with both positives and negatives: 0, with a gradient path, no NaN
    only = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = drauc_instance_loss(only, torch.tensor([1, 1, 1]), a, b, alpha).mean()
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(only.grad).all()


def test_drauc_budgets_alpha_ascent_and_dual_update():
    eps_neg, eps_pos = distribution_aware_budgets(0.5, 0.1, 2.0)
    assert eps_pos == 1.0 and 0.1 * eps_pos + 0.9 * eps_neg == pytest.approx(0.5)  # the fixed ε₋
    with pytest.raises(UserError):
        distribution_aware_budgets(0.5, 0.6, 2.0)
    loss_fn = DRAUCLoss(margin=1.0, epsilon=0.3, lambda_lr=0.5, lambda_period=2, lambda_init=0.2,
                        alpha_step="autograd").double()
    z = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        loss_fn.a.fill_(0.6)
        loss_fn.b.fill_(0.3)
        loss_fn.alpha.fill_(0.25)
    loss_fn(z, y).backward()
    h = torch.sigmoid(z)
    d_alpha = 2 * (1.0 + h[y == 0].mean() - h[y == 1].mean()) - 2 * 0.25
    loss_fn.ascend_alpha(0.1)
    assert loss_fn.alpha.item() == pytest.approx(0.25 + 0.1 * d_alpha.item(), rel=1e-10)
    # dual: λ ← max(0, λ − η(ε − mean cost)) on calls 0, 2, 4, … with the mean since the last step
    loss_fn.update_dual(torch.tensor([0.1, 0.3]), torch.zeros(2, dtype=torch.long))  # mean 0.2
    assert loss_fn.lambdas.item() == pytest.approx(0.2 - 0.5 * (0.3 - 0.2))
    loss_fn.update_dual(torch.tensor([1.0]), torch.zeros(1, dtype=torch.long))
    assert loss_fn.lambdas.item() == pytest.approx(0.15)  # no step on call 1
    loss_fn.update_dual(torch.tensor([0.0]), torch.zeros(1, dtype=torch.long))  # mean of 1.0 and 0.0
    assert loss_fn.lambdas.item() == pytest.approx(0.15 - 0.5 * (0.3 - 0.5))
    for _ in range(8):
        loss_fn.update_dual(torch.tensor([0.0]), torch.zeros(1, dtype=torch.long))
    assert loss_fn.lambdas.item() == 0.0  # projected, never negative


def released_drauc_step(h, y, a, b, alpha, lr, margin=1.0, k=1.0, clip=1.0, epoch_decay=2e-3, weight_decay=1e-5,
                        refs=(0.0, 0.0)):
    """EldercatSAM/DRAUC, written from `losses.py: DRAUCLoss.forward` (with the code's k) and `optimizers/DRAUC.py:
    DRAUCOptim.step` (no momentum) for the scores h held fixed: a and b take the clipped PESG step first, then
    α ← clamp(α + lr·(2(m + b − a) − 2α), 0, 999) with the new a, b, and only if α received a gradient."""
    a, b, alpha = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (a, b, alpha))
    pos, neg = (y == 1).double(), (y == 0).double()
    mean = lambda t: t.sum() / (torch.count_nonzero(t) + 1e-6)
    loss = (mean((h - a) ** 2 * pos) + mean((h - b) ** 2 * neg)
            + 2 * alpha * (margin + mean(h * neg) - mean(h * pos)) - k * alpha ** 2)
    loss.backward()
    with torch.no_grad():
        for p, ref in zip((a, b), refs):
            d_p = torch.clamp(p.grad, -clip, clip) + epoch_decay * (p - ref) + weight_decay * p
            p.sub_(lr * d_p)
        if alpha.grad is not None:
            alpha.copy_(torch.clamp(alpha + lr * (2 * (margin + b - a) - 2 * alpha), 0, 999))
    return a.item(), b.item(), alpha.item()


@pytest.mark.parametrize("seed", range(3))
def test_drauc_released_alpha_step_equals_the_code(seed):
    """Default `alpha_step="released"`: after the same step on a and b, α moves by lr·(2(m + b − a) − 2α) with
    the updated a, b; float64 agreement with the code's update written out (k = 1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(12, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    a0, b0, alpha0 = (float(v) for v in torch.rand(3, generator=g, dtype=torch.float64))
    lr = 0.3
    want = released_drauc_step(h, y, a0, b0, alpha0, lr)
    loss_fn = DRAUCLoss(margin=1.0).double()
    assert loss_fn.alpha_step == "released"
    with torch.no_grad():
        loss_fn.a.fill_(a0)
        loss_fn.b.fill_(b0)
        loss_fn.alpha.fill_(alpha0)
    logits = torch.logit(h)
    loss_fn(logits, y).backward()
    with torch.no_grad():  # the same PESG step on a and b (refs 0, no momentum), then the α step
        for p in loss_fn.minimized_parameters():
            p.sub_(lr * (torch.clamp(p.grad, -1.0, 1.0) + 2e-3 * p + 1e-5 * p))
    loss_fn.ascend_alpha(lr)
    got = (loss_fn.a.item(), loss_fn.b.item(), loss_fn.alpha.item())
    # a, b: the exact class counts here against the code's count_nonzero + 1e-6 (a ~1e-7 relative difference)
    assert got[:2] == pytest.approx(want[:2], rel=1e-6)
    by_hand = min(max(alpha0 + lr * (2 * (1.0 + got[1] - got[0]) - 2 * alpha0), 0.0), 999.0)
    assert got[2] == pytest.approx(by_hand, rel=1e-14, abs=1e-15)
    assert got[2] == pytest.approx(want[2], rel=1e-6)
    assert loss_fn.alpha.grad is None


def test_drauc_alpha_steps_by_hand_and_their_common_fixed_point():
    z = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 1])
    h = torch.sigmoid(z)
    released = DRAUCLoss(margin=0.8, alpha_penalty=2.0).double()
    with torch.no_grad():
        released.a.fill_(0.6)
        released.b.fill_(0.3)
        released.alpha.fill_(0.25)
    released.ascend_alpha(0.1)  # no backward reached α yet: nothing moves, as in the code
    assert released.alpha.item() == 0.25
    released(z, y).backward()
    released.ascend_alpha(0.1)  # 0.25 + 0.1·(2(0.8 + 0.3 − 0.6) − 2·2·0.25)
    assert released.alpha.item() == pytest.approx(0.25 + 0.1 * (2 * 0.5 - 1.0), abs=1e-15)
    # at a = mean₊h, b = mean₋h both steps are the same: one fixed point α* = (m + mean₋h − mean₊h)/k
    star = (0.8 + h[y == 0].mean() - h[y == 1].mean()).item() / 2.0
    for rule in ("released", "autograd"):
        fn = DRAUCLoss(margin=0.8, alpha_penalty=2.0, alpha_step=rule).double()
        with torch.no_grad():
            fn.a.fill_(h[y == 1].mean().item())
            fn.b.fill_(h[y == 0].mean().item())
            fn.alpha.fill_(star)
        fn(z, y).backward()
        fn.ascend_alpha(0.5)
        assert fn.alpha.item() == pytest.approx(star, rel=1e-12)
    with pytest.raises(UserError, match="alpha_step"):
        DRAUCLoss(alpha_step="closed-form")


def test_drauc_perturb_respects_budgets_improves_the_robust_objective_and_leaves_the_head_alone():
    g = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(5, 1).double()
    head = lambda v: linear(v).squeeze(-1)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    loss_fn = DRAUCLoss(distribution_aware=True, pos_ratio=0.2, budget_ratio=3.0, epsilon=0.04,
                        step_size=0.05, lambda_init=0.5).double()
    budgets = torch.tensor(distribution_aware_budgets(0.04, 0.2, 3.0), dtype=torch.float64)  # (ε₋, ε₊)
    assert torch.allclose(loss_fn.budgets, budgets)
    scale = x.norm(dim=1).median()

    def objective(x_new):  # F_i − λ_g·c_i, the per-sample robust objective
        cost = ((x_new - x) ** 2).sum(1) / scale ** 2
        return drauc_instance_loss(head(x_new), y, loss_fn.a, loss_fn.b, loss_fn.alpha).detach() - 0.5 * cost, cost

    loss_fn.steps = 0  # the random start alone: radius U(0, 1)·√ε_g
    start, start_cost = objective(loss_fn.perturb(head, x, y, torch.Generator().manual_seed(9), update_dual=False))
    assert (start_cost <= budgets[y] + 1e-12).all() and (start_cost > 0).all()
    loss_fn.steps = 6
    x_adv = loss_fn.perturb(head, x, y, torch.Generator().manual_seed(9), update_dual=False)
    best, _ = objective(x_adv)
    assert (best >= start - 1e-12).all() and (best > start + 1e-6).any()
    assert all(p.grad is None for p in linear.parameters()) and not x_adv.requires_grad
    assert (loss_fn.lambdas == 0.5).all()
    loss_fn.perturb(head, x, y, torch.Generator().manual_seed(9))  # now with the dual step, one λ per group
    assert loss_fn.lambdas.shape == (2,) and (loss_fn.lambdas != 0.5).all()
    # one-vs-rest with a module head: eval mode during the attack, train mode after
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.5)).double()
    ovr = DRAUCLoss(num_classes=3, steps=2).double()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    out = ovr.perturb(net, x, labels, generator=g)
    assert net.training and torch.isfinite(out).all()
    ovr(net(out), labels).backward()
    assert all(p.grad is not None for p in net.parameters())


# ---- TKPR ---------------------------------------------------------------------------------------------------


def _tkpr_brute(scores, targets, k):
    values = []
    for s, t in zip(scores.tolist(), targets.tolist()):
        pos = [i for i, v in enumerate(t) if v]
        neg = [j for j, v in enumerate(t) if not v]
        if not pos:
            continue
        if not neg:
            values.append(0.0)
            continue
        k_eff = min(k, len(neg))
        values.append(sum(min(k, sum(s[j] >= s[i] for j in neg)) / k_eff for i in pos) / len(pos))
    return sum(values) / len(values)


def _ranking_brute(scores, targets):
    values = []
    for s, t in zip(scores.tolist(), targets.tolist()):
        pos = [i for i, v in enumerate(t) if v]
        neg = [j for j, v in enumerate(t) if not v]
        if pos:
            values.append(sum(s[j] >= s[i] for i in pos for j in neg) / max(len(pos) * len(neg), 1))
    return sum(values) / len(values)


def _surrogate_brute(scores, targets, k, phi, form):
    values = []
    for s, t in zip(scores.tolist(), targets.tolist()):
        pos = [i for i, v in enumerate(t) if v]
        neg = sorted((s[j] for j, v in enumerate(t) if not v), reverse=True)[:k]
        if not pos:
            continue
        f = lambda v: float(phi(torch.tensor(v, dtype=torch.float64)))
        if form == "pairwise":
            values.append(sum(f(s[i] - n) for i in pos for n in neg) / (max(len(neg), 1) * len(pos)))
        else:
            values.append(sum(f(s[i]) for i in pos) / len(pos) + sum(f(-n) for n in neg) / max(len(neg), 1))
    return sum(values) / len(values)


@pytest.mark.parametrize("seed", range(3))
def test_tkpr_equals_brute_force_definition(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (9, 7), generator=g).double()  # small integers: many ties
    targets = (torch.rand(9, 7, generator=g) < 0.35).long()
    targets[0] = 0  # no positive: left out
    targets[1] = 1  # no negative: 0
    for k in (1, 2, 3, 7):
        assert tkpr_loss(scores, targets, k).item() == pytest.approx(_tkpr_brute(scores, targets, k), abs=1e-12)
        assert tkpr(scores, targets, k).item() == pytest.approx(1 - _tkpr_brute(scores, targets, k), abs=1e-12)
        assert tkpr_loss(scores, targets, k) >= ranking_loss(scores, targets) - 1e-12
    assert ranking_loss(scores, targets).item() == pytest.approx(_ranking_brute(scores, targets), abs=1e-12)
    assert torch.allclose(tkpr_loss(scores, targets, 7), ranking_loss(scores, targets))  # K ≥ |N|


@pytest.mark.parametrize("form", ["pairwise", "pointwise"])
def test_tkpr_surrogates_equal_brute_force(form):
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(6, 5, generator=g) < 0.4).long()
    targets[0] = 1
    for name, phi in SURROGATES.items():
        got = tkpr_surrogate_loss(scores, targets, 2, surrogate=name, form=form)
        assert got.item() == pytest.approx(_surrogate_brute(scores.detach(), targets, 2, phi, form), rel=1e-10)
        (grad,) = torch.autograd.grad(got, scores)
        assert torch.isfinite(grad).all()
    if form == "pairwise":  # φ ≥ 1[t ≤ 0] upper-bounds the measure
        assert tkpr_surrogate_loss(scores, targets, 2, "hinge") >= tkpr_loss(scores, targets, 2)


def test_docstring_examples():
    for module in (prior_module, vs_module, class_balanced_module, ldam_module, tla_adrw_module, drauc_module,
                   tkpr_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)  # none may vanish
