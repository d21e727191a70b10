"""DirMixE: a mixture of experts over Dirichlet meta-distributions of test label priors (Yang et al., ICML 2024;
research/aucseg_dirmixe.md part B), for heads on stored features, with SADE's test-time aggregation.

Model (B.1): three experts on a shared trunk, each its own block (Linear → ReLU) and cosine classifier
(s = 30). Training (B.2–B.4): expert k learns under test priors w drawn from component k of

    E = Σ_k ⅓·Dir(α0·π_k),  π_1 = training prior (forward-LT), π_2 = uniform, π_3 = inverse prior (backward-LT),

through the per-draw logit-adjusted loss ℓ(w, k) = CE(z_k − log(w^τ/π_train^τ + 1e-9), y), so z_k becomes the
predictor for test priors near π_k; per iteration, over T draws, the objective is the mean m of the ℓ_t, plus
λ·V₊ in the final phase, V₊ = Σ_{ℓ_t > m} (ℓ_t − m)² / max(#{ℓ_t > m} − 1, 1) (semi-variance). At test time
the experts' logits are mixed with weights ω = softmax(a), a learned without labels on unlabelled test
features by maximising the agreement of two augmented views (B.5).

Defaults (B.6, CIFAR-100-LT): T = 60 draws per iteration from a pool of T × iterations-per-epoch draws made
once per run (reshuffled every epoch), α0 = 1e4, τ = 1.3, λ = 5 (CIFAR-10: 15), final phase from epoch
int(0.8·(E + 1)) (1-based) on; aggregation SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, batch 128,
at most 5 passes of one sweep each, stopping after a pass once some ω_k, rounded to 2 decimals, is < 0.05.

As released (scongl/DirMixE `model/loss.py`, `test_training_*_dirmixe.py`; docs/fidelity.md):

- The logit shift is the code's log(w^τ/π^τ + ε), ε = 1e-9 (`LOGIT_SHIFT_EPS`), evaluated in log space as
  logaddexp(τ·(log w − log π), log ε): the same number where w^τ/π^τ is representable, and no underflow to
  w^τ = 0 where it is not. The shift is thereby clamped from below at log ε = −20.7 wherever the draw is nearly
  empty in a class (w^τ/π^τ ≪ 1e-9): on ImageNet / iNat-scale priors α0·π_c < 1 for rare classes and such
  draws are common. It is not the exact τ·(log w − log π); difffeat used that with w floored at 1e-8 before,
  which ends at −τ·log(1e-8/π) instead of −20.7 and errs more on the forward-LT component.
- Test-time aggregation makes one pass over the unlabelled set per epoch (shuffled batches, the last one
  partial, as SADE's DataLoader), and stops after a pass once some weight rounded to 2 decimals is below
  0.05 (`np.round(ω, 2)`, as SADE). `steps_per_pass` > 0 gives difffeat's former schedule instead: at least
  that many batches per pass, cycling a small set (79 was SADE's pass over CIFAR's 10,000 test images).

Departures from the released code, each a bug or a trap there:

1. The prior comes from the training counts of any data set, zero-count classes floored (`PRIOR_FLOOR`);
   the code's priors come from a dataset-name switch that crashes for iNat (`generate_weights`).
2. No checkpoint is selected on the test set (the code keeps `model_best` by test accuracy): the run keeps
   its last weights.
3. Images are not available to a head on stored features, so the two views of test-time aggregation are
   feature-space augmentations (dropout and Gaussian noise on standardised features), not image crops/jitter.
   The adaptation is transductive (on unlabelled test data), as in SADE; note the SADE report (issue #9)
   that longer adaptation can hurt on few classes, hence the 5-pass cap and the early stop.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from downstream.cls.config import AggregationConfig, DirMixEConfig
from downstream.cls.label_shift import DirichletMetaDistribution
from downstream.losses.ldam import CosineClassifier
from downstream.losses.prior import class_prior

NUM_EXPERTS = 3  # one per meta-distribution component: forward, uniform, backward
LOGIT_SHIFT_EPS = 1e-9  # the released shift log(w^τ/π^τ + 1e-9): clamped from below at log 1e-9 ≈ −20.7
EXPERT_NAMES = ("expert_forward", "expert_uniform", "expert_backward")

__all__ = ["AggregationConfig", "DirMixEConfig", "DirMixEHead", "DirMixELoss", "DrawPool", "EXPERT_NAMES",
           "LOGIT_SHIFT_EPS", "NUM_EXPERTS", "aggregate", "aggregation_loss", "augment_features", "dirmixe_objective",
           "draw_losses", "is_final_phase", "logit_shift", "semi_variance", "stops_after_pass", "test_time_aggregation"]


class DirMixEHead(nn.Module):
    """Three experts on the trunk's output: expert k = cosine classifier (scale s) on its own Linear → ReLU block.

    forward(h [B, d]) → logits [3, B, C] (expert-major).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, scale: float = DirMixEConfig.scale):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
                                    for _ in range(NUM_EXPERTS))
        self.classifiers = nn.ModuleList(CosineClassifier(hidden, num_classes, scale) for _ in range(NUM_EXPERTS))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([c(b(h)) for b, c in zip(self.blocks, self.classifiers)])

    def penultimate(self, h: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert (normalised features, effective weight s·W/‖W‖): logits = features @ weightᵀ."""
        return [(F.normalize(b(h), dim=-1), c.scale * F.normalize(c.weight, dim=-1))
                for b, c in zip(self.blocks, self.classifiers)]


def semi_variance(losses: torch.Tensor) -> torch.Tensor:
    """V₊ = Σ_{t: ℓ_t > m} (ℓ_t − m)² / max(#{t: ℓ_t > m} − 1, 1), m = mean ℓ (m not detached, as in the code).

    >>> float(semi_variance(torch.tensor([1.0, 2.0, 3.0, 6.0])))  # m = 3: only 6 is above, (6−3)²/1
    9.0
    """
    m = losses.mean()
    above = (losses > m).to(losses.dtype)
    return ((losses - m) ** 2 * above).sum() / (above.sum() - 1).clamp(min=1)


def logit_shift(draws: torch.Tensor, log_prior: torch.Tensor, tau: float, eps: float = LOGIT_SHIFT_EPS) -> torch.Tensor:
    """The released per-draw logit shift log(w^τ/π^τ + ε) ([T, C], float64), computed as
    logaddexp(τ·(log w − log π), log ε) so that w^τ never underflows: at least log ε for every class.

    >>> w, logp = torch.tensor([[0.5, 0.5, 0.0]]), torch.log(torch.tensor([0.25, 0.25, 0.5]))
    >>> [round(v, 4) for v in logit_shift(w, logp, 1.0)[0].tolist()]  # log 2, log 2, log 1e-9 (w = 0)
    [0.6931, 0.6931, -20.7233]
    """
    w = draws.to(torch.float64)
    exact = tau * (torch.log(w) - log_prior.to(device=w.device, dtype=torch.float64))  # −inf where w = 0
    return torch.logaddexp(exact, torch.full_like(exact, math.log(eps)))


def draw_losses(logits: torch.Tensor, targets: torch.Tensor, ks: torch.Tensor, draws: torch.Tensor,
                log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """ℓ_t = mean_i CE(z_{k_t}(x_i) − log(w_t^τ/π^τ + 1e-9), y_i) for each draw t: a vector [T] (`logit_shift`).

    `logits` [K, B, C] per expert, `ks` [T] expert (component) of each draw, `draws` [T, C] test priors w_t,
    `log_prior` [C] the (floored) training log-prior.
    """
    shift = logit_shift(draws, log_prior, tau).to(logits.dtype)  # [T, C]
    adjusted = logits[ks] - shift[:, None, :]  # [T, B, C]
    t, b, c = adjusted.shape
    ce = F.cross_entropy(adjusted.reshape(t * b, c), targets.repeat(t), reduction="none")
    return ce.view(t, b).mean(1)


def dirmixe_objective(losses: torch.Tensor, final_phase: bool, lambda_var: float) -> torch.Tensor:
    """m = mean ℓ_t, plus λ·V₊ in the final phase."""
    m = losses.mean()
    return m + lambda_var * semi_variance(losses) if final_phase and lambda_var else m


def is_final_phase(epoch: int, total_epochs: int, fraction: float = DirMixEConfig.switch_fraction) -> bool:
    """Whether 0-based `epoch` is in the final (mean + λ·V₊) phase: the code's `epoch > int(0.8·(E + 1))`, 1-based
    (epoch 161 of 200 on)."""
    return epoch + 1 > int(fraction * (total_epochs + 1))


class DrawPool:
    """The run's fixed pool of (k, w) draws: T × `iterations` of them, made once from the meta-distribution,
    reshuffled every epoch (seeded by epoch, so a resumed run sees the same draws); T per iteration."""

    def __init__(self, class_counts, trials: int = DirMixEConfig.trials, iterations: int = 1,
                 concentration: float = DirMixEConfig.concentration, seed: int = 0):
        self.meta = DirichletMetaDistribution(class_counts, concentration)
        self.trials, self.iterations, self.seed = trials, iterations, seed
        ks, w = self.meta.sample(trials * iterations, seed=seed)
        self.ks, self.w = torch.as_tensor(ks, dtype=torch.long), torch.as_tensor(w, dtype=torch.float64)

    def draws(self, epoch: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ks [T], w [T, C]) of `iteration` (0 ≤ iteration < `iterations`) of `epoch`."""
        perm = np.random.default_rng([self.seed, epoch, zlib.crc32(b"dirmixe-pool")]).permutation(len(self.ks))
        rows = torch.as_tensor(perm[iteration * self.trials:(iteration + 1) * self.trials])
        return self.ks[rows], self.w[rows]


class DirMixELoss(nn.Module):
    """The DirMixE objective for expert logits [3, B, C]: `forward(logits, targets, ks, w, final_phase)`."""

    def __init__(self, class_counts, tau: float = DirMixEConfig.tau, lambda_var: float = DirMixEConfig.lambda_var):
        super().__init__()
        self.register_buffer("log_prior", torch.log(class_prior(class_counts)).float())
        self.tau, self.lambda_var = tau, lambda_var

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, ks: torch.Tensor, draws: torch.Tensor,
                final_phase: bool = False) -> torch.Tensor:
        losses = draw_losses(logits, targets, ks.to(logits.device), draws.to(logits.device), self.log_prior, self.tau)
        return dirmixe_objective(losses, final_phase, self.lambda_var)


# -------------------------------------------------------------------------------- test-time aggregation
def augment_features(x: torch.Tensor, config: AggregationConfig, generator: torch.Generator) -> torch.Tensor:
    """A random view of standardised features: dropout to 0 (the training mean), then Gaussian noise."""
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= config.dropout
    return x * keep + config.noise * torch.randn(x.shape, generator=generator, device=x.device)


def aggregation_loss(a: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """−mean_i cos(softmax(ẑ(x1_i)), softmax(ẑ(x2_i))), ẑ = Σ_k softmax(a)_k·z_k; z1, z2 [K, B, C]."""
    w = torch.softmax(a, 0)[:, None, None]
    p1, p2 = torch.softmax((w * z1).sum(0), -1), torch.softmax((w * z2).sum(0), -1)
    return -F.cosine_similarity(p1, p2, dim=-1).mean()


def _pass_batches(n: int, config: AggregationConfig, order_gen: torch.Generator) -> list[torch.Tensor]:
    """The batches (index tensors) of one pass: one shuffled sweep of the set in batches of `batch_size`, the
    last one partial (SADE's DataLoader); or, with `steps_per_pass` > 0 (difffeat's former schedule), at least
    that many full batches, cycling shuffled copies of a small set."""
    size = min(config.batch_size, n)
    if config.steps_per_pass == 0:
        return list(torch.randperm(n, generator=order_gen).split(size))
    steps = max(math.ceil(n / config.batch_size), config.steps_per_pass)
    copies = math.ceil(steps * config.batch_size / n)
    order = torch.cat([torch.randperm(n, generator=order_gen) for _ in range(copies)])
    return [order[step * size:(step + 1) * size] for step in range(steps)]


def stops_after_pass(weights: torch.Tensor, min_weight: float) -> bool:
    """SADE's stop test after a pass: some weight, rounded to 2 decimals as the code reports it
    (``np.round(ω, decimals=2)``), below `min_weight` (0.05).

    >>> stops_after_pass(torch.tensor([0.046, 0.5, 0.454]), 0.05)  # rounds to 0.05: goes on
    False
    >>> stops_after_pass(torch.tensor([0.044, 0.5, 0.456]), 0.05)
    True
    """
    return bool((np.round(weights.detach().cpu().numpy(), decimals=2) < min_weight).any())


def test_time_aggregation(expert_logits: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                          config: AggregationConfig | None = None, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Expert weights ω = softmax(a) [3] learned on unlabelled `features` (standardised, [N, D]); and a log.

    `expert_logits(x)` maps standardised features to expert logits [3, N, C] (the frozen model). Per batch,
    two augmented views are scored without gradient into the model, and `a` (init 0, so ω = ⅓ each) takes an
    SGD step on `aggregation_loss`. At most `epochs` passes (`_pass_batches`: one sweep of the set, as SADE);
    stops after a pass where some ω_k rounded to 2 decimals is below `min_weight` (`stops_after_pass`).
    """
    config = config or AggregationConfig()
    gen = torch.Generator(device=features.device).manual_seed(seed)
    a = torch.zeros(NUM_EXPERTS, device=features.device, requires_grad=True)
    opt = torch.optim.SGD([a], lr=config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay)
    log = []
    n = len(features)
    if n == 0:
        return torch.full((NUM_EXPERTS,), 1.0 / NUM_EXPERTS), log
    order_gen = torch.Generator().manual_seed(seed)
    for epoch in range(config.epochs):
        total, seen = 0.0, 0
        for rows in _pass_batches(n, config, order_gen):
            x = features[rows.to(features.device)]
            with torch.no_grad():
                z1 = expert_logits(augment_features(x, config, gen))
                z2 = expert_logits(augment_features(x, config, gen))
            with torch.enable_grad():
                loss = aggregation_loss(a, z1.float(), z2.float())
                opt.zero_grad()
                loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(x), seen + len(x)
        weights = torch.softmax(a.detach(), 0)
        log.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "weights": weights.tolist()})
        if stops_after_pass(weights, config.min_weight):
            break
    return torch.softmax(a.detach(), 0), log


def aggregate(expert_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k ω_k z_k ([K, N, C] → [N, C]); equal weights (the mean) when `weights` is None."""
    if weights is None:
        return expert_logits.mean(0)
    return (weights.to(expert_logits)[:, None, None] * expert_logits).sum(0)
