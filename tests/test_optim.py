import doctest

import pytest
import torch
import torch.nn.functional as F

import downstream.optim.head_tail as head_tail_module
import downstream.optim.sam as sam_module
from difffeat.errors import UserError
from downstream.optim import (
    IMBSAM_ETA,
    PESG,
    RELEASED_TAIL_WEIGHT,
    SAM,
    SSESAM,
    GroupLosses,
    ImbSAM,
    split_losses,
    tail_classes,
    tail_eta,
)

TAIL = [2, 3]


@pytest.fixture(autouse=True)
def _grad_enabled():  # a session fixture elsewhere switches autograd off
    with torch.enable_grad():
        yield


def make_problem(seed=0, with_tail=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 3, 0, 1] if with_tail else [0, 1, 0, 0, 1, 1, 0, 1])
    return [w, b], x, y


def per_sample(params, x, y):
    w, b = params
    return F.cross_entropy(x @ w.T + b, y, reduction="none")


def group_grads(params, x, y, at=None):
    """Independent ∇L_H and ∇L_T (batch-normalised) at `at` (default: the current values)."""
    leaves = [p.detach().clone().requires_grad_() for p in (at or params)]
    losses = per_sample(leaves, x, y)
    tail = torch.isin(y, torch.tensor(TAIL))
    head_loss, tail_loss = losses[~tail].sum() / len(y), losses[tail].sum() / len(y)
    gh = torch.autograd.grad(head_loss, leaves, retain_graph=True, allow_unused=True)
    gt = torch.autograd.grad(tail_loss, leaves, allow_unused=True)
    zero = lambda g, p: torch.zeros_like(p) if g is None else g
    return [zero(g, p) for g, p in zip(gh, leaves)], [zero(g, p) for g, p in zip(gt, leaves)]


def unit(grads):
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    return [g / norm for g in grads]


def shifted(params, direction, rho):
    return [p.detach() + rho * d for p, d in zip(params, direction)]


def global_norm(tensors):
    return float(torch.sqrt(sum((t ** 2).sum() for t in tensors)))


def test_sam_perturbation_norm_and_update():
    params, x, y = make_problem()
    start = [p.detach().clone() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)
    per_sample(params, x, y).mean().backward()
    opt.first_step(zero_grad=True)
    assert global_norm([p.detach() - s for p, s in zip(params, start)]) == pytest.approx(0.05, rel=1e-9)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    opt.state.clear()
    opt.zero_grad()
    # the full step against an independent computation: w − lr·∇L(w + ρ·g/‖g‖)
    gh, gt = group_grads(params, x, y)
    g = [a + c for a, c in zip(gh, gt)]
    at = shifted(params, unit(g), 0.05)
    gh2, gt2 = group_grads(params, x, y, at)
    expected = [s - 0.1 * (a + c) for s, a, c in zip(start, gh2, gt2)]
    loss = opt.step(lambda: per_sample(params, x, y).mean())
    assert loss.item() == pytest.approx(per_sample(start, x, y).mean().item())
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, rtol=1e-10, atol=1e-12)
    # (losses, targets) closures mean the same thing
    params2, _, _ = make_problem()
    SAM(params2, torch.optim.SGD, rho=0.05, lr=0.1).step(lambda: (per_sample(params2, x, y), y))
    assert all(torch.allclose(p, q) for p, q in zip(params, params2))


def test_sam_with_zero_radius_is_the_base_optimizer():
    params, x, y = make_problem(1)
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = SAM(params, torch.optim.SGD, rho=0.0, lr=0.05, momentum=0.9, weight_decay=1e-2)
    base = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):
        opt.step(lambda: per_sample(params, x, y).mean())
        base.zero_grad()
        per_sample(ref, x, y).mean().backward()
        base.step()
    assert all(torch.allclose(p, q) for p, q in zip(params, ref))


def test_closure_that_calls_backward_is_refused():
    params, x, y = make_problem()
    opt = SAM(params, torch.optim.SGD, lr=0.1)

    def closure():
        loss = per_sample(params, x, y).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="backward"):
        opt.step(closure)


def test_imbsam_perturbs_only_the_tail_loss():
    params, x, y = make_problem(2)
    start = [p.detach().clone() for p in params]
    gh, gt = group_grads(params, x, y)
    opt = ImbSAM(params, torch.optim.SGD, tail_classes=TAIL, rho=0.1, tail_weight=1.0, lr=0.2)
    # by hand: the perturbation is ρ along the tail gradient alone
    parts = opt.group_losses((per_sample(params, x, y), y))
    parts.head.backward(retain_graph=True)
    opt.store_head_grad()
    parts.tail.backward()
    opt.first_step()
    eps = [p.detach() - s for p, s in zip(params, start)]
    assert global_norm(eps) == pytest.approx(0.1, rel=1e-9)
    for e, d in zip(eps, unit(gt)):
        assert torch.allclose(e, 0.1 * d, atol=1e-12)
    per_sample_now = per_sample(params, x, y)
    opt.group_losses((per_sample_now, y)).tail.backward()
    opt.second_step()
    # update = ∇L_T(w + ε) + ∇L_H(w): the head gradient is taken at the unperturbed w
    _, gt2 = group_grads(params, x, y, shifted(start, unit(gt), 0.1))
    expected = [s - 0.2 * (t + h) for s, t, h in zip(start, gt2, gh)]
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, rtol=1e-10, atol=1e-12)
    # step(closure) does the same
    params2, _, _ = make_problem(2)
    ImbSAM(params2, torch.optim.SGD, tail_classes=TAIL, rho=0.1, tail_weight=1.0, lr=0.2).step(
        lambda: (per_sample(params2, x, y), y))
    assert all(torch.allclose(p, q, atol=1e-12) for p, q in zip(params, params2))


def released_imbsam_steps(params, x, y, tail, rho, steps, **sgd):
    """cool-xuan/Imbalanced_SAM, written from `utils/trainval.py` (optim_mode "imbsam") and `imbsam.py`: head
    loss Σ_H ℓ/B; tail loss Σ_T ℓ/B·2; ε = ρ·g_T/(‖g_T‖ + 1e-16); the tail samples alone forwarded again at
    w + ε; w − ε, then p.grad = ∇L_T(w + ε) + g_H and one step of the base SGD."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    base = torch.optim.SGD(leaves, **sgd)
    tail_mask = torch.isin(y, torch.tensor(tail))
    for _ in range(steps):
        loss = per_sample(leaves, x, y)
        head_loss = loss[~tail_mask].sum() / y.size(0)
        grad_normal = torch.autograd.grad(head_loss, leaves, retain_graph=True)
        tail_loss = loss[tail_mask].sum() / y.size(0) * 2
        g_tail = torch.autograd.grad(tail_loss, leaves)
        grad_norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in g_tail]), p=2) + 1.e-16
        eps = [g * (rho / grad_norm) for g in g_tail]
        with torch.no_grad():
            for p, e in zip(leaves, eps):
                p.add_(e)
        tail_loss = per_sample(leaves, x[tail_mask], y[tail_mask]).sum() / y.size(0) * 2
        g_perturbed = torch.autograd.grad(tail_loss, leaves)
        with torch.no_grad():
            for p, e, g, h in zip(leaves, eps, g_perturbed, grad_normal):
                p.sub_(e)
                p.grad = g + h
        base.step()
    return leaves


@pytest.mark.parametrize("seed", range(3))
def test_imbsam_default_is_the_released_update(seed):
    """The released ×2 on the tail loss (default `tail_weight`), three steps with momentum and weight decay, in
    float64: agreement to rounding (the ε of the norm differs, 1e-12 here against the code's 1e-16)."""
    assert RELEASED_TAIL_WEIGHT == 2.0
    params, x, y = make_problem(seed)
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    want = released_imbsam_steps(params, x, y, TAIL, rho=0.05, steps=3, **sgd)
    opt = ImbSAM(params, torch.optim.SGD, tail_classes=TAIL, rho=0.05, **sgd)
    for _ in range(3):
        opt.step(lambda: (per_sample(params, x, y), y))
    for p, q in zip(params, want):
        assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-12)
    # the ×1 of the former default is another update (the tail part of the gradient halves)
    params1, _, _ = make_problem(seed)
    opt1 = ImbSAM(params1, torch.optim.SGD, tail_classes=TAIL, rho=0.05, tail_weight=1.0, **sgd)
    opt1.step(lambda: (per_sample(params1, x, y), y))
    assert not torch.allclose(params1[0], want[0])


def test_imbsam_tail_weight_by_hand_and_for_group_losses():
    """w ← w − lr·(w_T·∇L_T(w + ε) + ∇L_H(w)), ε = ρ·∇L_T/‖∇L_T‖ (the weight leaves ε alone); a closure that
    returns GroupLosses gets the same weight."""
    params, x, y = make_problem(6)
    start = [p.detach().clone() for p in params]
    gh, gt = group_grads(params, x, y)
    _, gt2 = group_grads(params, x, y, shifted(start, unit(gt), 0.1))
    expected = [s - 0.2 * (3.0 * t + h) for s, t, h in zip(start, gt2, gh)]
    loss = ImbSAM(params, torch.optim.SGD, tail_classes=TAIL, rho=0.1, tail_weight=3.0, lr=0.2).step(
        lambda: (per_sample(params, x, y), y))
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, rtol=1e-10, atol=1e-12)
    parts = split_losses(per_sample(start, x, y), y, torch.tensor(TAIL))
    assert loss.item() == pytest.approx((parts.head + 3.0 * parts.tail).item(), rel=1e-12)  # the objective at w

    def grouped():
        parts = split_losses(per_sample(params2, x, y), y, torch.tensor(TAIL))
        return GroupLosses(parts.head, parts.tail, parts.n_head, parts.n_tail)

    params2, _, _ = make_problem(6)
    ImbSAM(params2, torch.optim.SGD, tail_classes=TAIL, rho=0.1, tail_weight=3.0, lr=0.2).step(grouped)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-14) for p, q in zip(params, params2))
    with pytest.raises(ValueError, match="tail_weight"):
        ImbSAM(params, torch.optim.SGD, tail_classes=TAIL, tail_weight=-1.0, lr=0.1)


def test_tail_rules_released_and_relative():
    """ImbSAM's rule n_c < 20 (30 tail classes on CIFAR-100-LT at ratio 100) and the former 0.2·n_max (65)."""
    counts = [int(500 * 0.01 ** (c / 99)) for c in range(100)]  # CIFAR-100-LT, as the released generators
    assert sum(counts) == 10847 and IMBSAM_ETA == 20
    assert tail_eta(counts) == 20 and len(tail_classes(counts)) == 30
    assert tail_classes(counts) == tail_classes(counts, tail_eta(counts, "imbsam")) == list(range(70, 100))
    assert tail_eta(counts, "relative") == pytest.approx(100.0)
    assert len(tail_classes(counts, tail_eta(counts, "relative"))) == 65
    assert tail_eta([10, 4], "relative", fraction=0.5) == 5.0
    with pytest.raises(UserError, match="imbsam, relative"):
        tail_eta(counts, "bottom-third")


def test_imbsam_without_tail_samples_is_a_plain_step():
    params, x, y = make_problem(3, with_tail=False)
    start = [p.detach().clone() for p in params]
    gh, gt = group_grads(params, x, y)
    assert global_norm(gt) == 0.0
    ImbSAM(params, torch.optim.SGD, tail_classes=TAIL, rho=0.1, lr=0.2).step(lambda: (per_sample(params, x, y), y))
    for p, s, h in zip(params, start, gh):
        assert torch.allclose(p.detach(), s - 0.2 * h)


def test_ssesam_groupwise_then_switches_at_gamma_epochs():
    params, x, y = make_problem(4)
    opt = SSESAM(params, torch.optim.SGD, tail_classes=TAIL, rho_head=0.05, rho_tail=0.1, gamma=0.7,
                 total_epochs=10, lr=0.3)
    closure = lambda: (per_sample(params, x, y), y)
    for epoch in range(10):
        assert opt.rho_head == (0.05 if epoch < 7 else 0.0), epoch  # ⌈0.7·10⌉ = 7, despite 0.7·10 = 7.000…01
        if epoch in (0, 7):
            start = [p.detach().clone() for p in params]
            gh, gt = group_grads(params, x, y)
            head_at = shifted(start, unit(gh), 0.05) if epoch == 0 else start
            gh2, _ = group_grads(params, x, y, head_at)
            _, gt2 = group_grads(params, x, y, shifted(start, unit(gt), 0.1))
            opt.step(closure)
            for p, s, h, t in zip(params, start, gh2, gt2):
                assert torch.allclose(p.detach(), s - 0.3 * (h + t), rtol=1e-10, atol=1e-12)
        opt.epoch_end()
    assert opt.switched
    saved = opt.state_dict()
    fresh = SSESAM(params, torch.optim.SGD, tail_classes=TAIL, gamma=0.7, total_epochs=10, lr=0.3)
    fresh.load_state_dict(saved)
    assert fresh.switched and fresh.base_optimizer.param_groups is fresh.param_groups
    never = SSESAM(params, torch.optim.SGD, tail_classes=TAIL, gamma=0.0, total_epochs=3, lr=0.1)
    for _ in range(5):
        never.epoch_end()
    assert never.rho_head == 0.05


def test_ssesam_manual_steps_perturbation_norms():
    params, x, y = make_problem(5)
    start = [p.detach().clone() for p in params]
    opt = SSESAM(params, torch.optim.SGD, tail_classes=TAIL, rho_head=0.03, rho_tail=0.07, total_epochs=5, lr=0.1)
    for name, rho in (("head", 0.03), ("tail", 0.07)):
        getattr(opt.group_losses((per_sample(params, x, y), y)), name).backward()
        opt.first_step(name)
        assert global_norm([p.detach() - s for p, s in zip(params, start)]) == pytest.approx(rho, rel=1e-9)
        getattr(opt.group_losses((per_sample(params, x, y), y)), name).backward()
        opt.second_step()
        assert all(torch.allclose(p.detach(), s, rtol=0, atol=1e-15) for p, s in zip(params, start))
    opt.base_step()
    assert not all(torch.equal(p.detach(), s) for p, s in zip(params, start))


def test_split_losses_normalisations_and_ignored_pixels():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    targets = torch.tensor([[0, 2], [255, 3]])  # one ignored pixel
    batch = split_losses(losses, targets, torch.tensor(TAIL), "batch", ignore_index=255)
    assert (batch.head.item(), batch.tail.item(), batch.n_head, batch.n_tail) == (1 / 3, 6 / 3, 1, 2)
    group = split_losses(losses, targets, torch.tensor(TAIL), "group", tail_weight=2.0, ignore_index=255)
    assert (group.head.item(), group.tail.item()) == (1.0, 2.0 * 6 / 2)
    empty = split_losses(torch.tensor([1.0]), torch.tensor([0]), torch.tensor(TAIL), "group")
    assert empty.tail.item() == 0.0 and empty.n_tail == 0
    assert tail_classes([500, 100, 19, 3], eta=20) == [2, 3]
    assert isinstance(batch, GroupLosses)


# ---- DRAUC's optimizer (EldercatSAM/DRAUC optimizers/DRAUC.py, DRAUCOptim), written out ------------------------
class ReleasedDRAUCOptim:
    """`DRAUCOptim.step` / `update_regularizer` on plain tensors: d = clamp(g, −c, c) + γ(θ − θ_ref) + wd·θ;
    buf = d (first), then buf·(1 − β) + β·d; θ ← θ − lr·buf; θ_acc += θ; T += 1. Regulariser: θ_ref = θ_acc / T."""

    def __init__(self, params, refs, lr, momentum, weight_decay, epoch_decay, clip_value=1.0):
        self.params = [p.detach().clone() for p in params]
        self.ref = [r.clone() for r in refs]
        self.acc = [torch.zeros_like(p) for p in self.params]
        self.buf = [None] * len(self.params)
        self.lr, self.momentum, self.wd, self.gamma, self.clip = lr, momentum, weight_decay, epoch_decay, clip_value
        self.T = 0

    def step(self, grads):
        for i, p in enumerate(self.params):
            d_p = torch.clamp(grads[i], -self.clip, self.clip) + self.gamma * (p - self.ref[i]) + self.wd * p
            if self.momentum != 0:
                if self.buf[i] is None:
                    self.buf[i] = torch.clone(d_p)
                else:
                    self.buf[i] = self.buf[i] * (1 - self.momentum) + self.momentum * d_p
                d_p = self.buf[i]
            self.params[i] = p - self.lr * d_p
            self.acc[i] = self.acc[i] + self.params[i]
        self.T += 1

    def update_regularizer(self):
        self.ref = [a / self.T for a in self.acc]
        self.acc = [torch.zeros_like(a) for a in self.acc]
        self.T = 0


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_pesg_equals_the_released_drauc_optimizer(momentum):
    """Five steps, a reference update, three more: the parameters equal the released update to float64
    rounding (clipped gradients, the pull towards the reference, weight decay, the EMA momentum)."""
    params, x, y = make_problem(seed=1)
    opt = PESG(params, lr=0.3, momentum=momentum, weight_decay=5e-4, epoch_decay=0.05, seed=2)
    refs = [opt.state[p]["reference"] for p in params]
    assert all(0.004 < float(r.std()) < 0.02 for r in refs)  # N(0, 0.01²) as the code's model_ref
    ref = ReleasedDRAUCOptim(params, refs, lr=0.3, momentum=momentum, weight_decay=5e-4, epoch_decay=0.05)
    largest = 0.0
    for step in range(8):
        if step == 5:
            opt.update_reference()
            ref.update_regularizer()
        opt.zero_grad()
        loss = 10.0 * per_sample(params, x, y).mean()  # gradients partly beyond the clip value
        loss.backward()
        grads = [p.grad.clone() for p in params]
        largest = max(largest, *(float(g.abs().max()) for g in grads))
        opt.step()
        ref.step(grads)
        for a, b in zip(params, ref.params):
            assert torch.allclose(a.detach(), b, rtol=1e-13, atol=1e-15), step
    assert largest > 1.0  # the clip acted
    state = opt.state_dict()  # everything a resumed run needs is in the state dict
    assert state["param_groups"][0]["steps_since_reference"] == 3
    assert {"reference", "accumulated"} <= set(state["state"][0])


def test_imbsam_defaults_of_train_cls_are_the_released_ones():
    """issue #16: `train-cls --optim imbsam` uses the released tail weight 2 and tail threshold η = 20 samples;
    SSE-SAM keeps the 0.2·n_max rule (its README's η = 100 on CIFAR-100-LT, as a ratio)."""
    import numpy as np

    from downstream.cls import ClsTrainConfig
    from downstream.cls.config import IMBSAM_RELEASED_TAIL_WEIGHT
    from downstream.cls.objective import tail_split

    assert IMBSAM_RELEASED_TAIL_WEIGHT == RELEASED_TAIL_WEIGHT
    counts = np.floor(500 * 0.01 ** (np.arange(100) / 99))  # CIFAR-100-LT, imbalance 100
    base = dict(features=["f"], labels="l", out="o")
    imb = ClsTrainConfig(**base, optim="imbsam").resolve()
    assert imb.imbsam_tail_weight == 2.0
    eta, tail = tail_split(imb, counts)
    assert eta == IMBSAM_ETA == 20 and len(tail) == 30
    eta, tail = tail_split(ClsTrainConfig(**base, optim="ssesam").resolve(), counts)
    assert eta == 100 and len(tail) == 65
    eta, tail = tail_split(ClsTrainConfig(**base, optim="imbsam", tail_eta=50.0).resolve(), counts)
    assert eta == 50 and tail == tail_classes(counts, 50)


def test_docstring_examples():
    for module in (sam_module, head_tail_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)  # none may vanish
