"""What a training step minimises and how: the method's loss (`METHODS`, by name) and the optimizer
(`OPTIMIZERS`, by name: SGD with Nesterov momentum, optionally wrapped in SAM, ImbSAM or SSE-SAM). DRAUC brings
its own optimizer and schedule (`downstream.cls.drauc`).

A method is a small class registered under its name; it sees the epoch (deferred re-weighting, two-stage
losses, DirMixE's final phase) and the batch's position in the epoch (DirMixE's draws). An optimizer kind says
how it is built and how a step calls it: a plain backward, or a closure returning the batch loss (SAM) or its
head and tail parts (ImbSAM, SSE-SAM, with the tail T = {c : n_c < η}; η = 20 for ImbSAM as released,
0.2·n_max for SSE-SAM, unless given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from downstream.cls.config import ClsTrainConfig
from downstream.cls.dirmixe import DirMixELoss, DrawPool, is_final_phase
from downstream.engine import cosine_factor, load_optimizer
from downstream.losses import (
    DRAUCLoss,
    LDAMLoss,
    TLAADRWLoss,
    VSLoss,
    deferred_switch_epoch,
    drw_weights,
    logit_adjusted_loss,
    tkpr_surrogate_loss,
)
from downstream.optim import SAM, SSESAM, GroupLosses, ImbSAM, tail_classes, tail_eta


# ------------------------------------------------------------------------------------------------ methods
class Method:
    """A method's loss of one batch, `loss(logits, targets)`; `counts` are the training class counts (float64)."""

    def __init__(self, config: ClsTrainConfig, counts: torch.Tensor, iterations: int, device: torch.device):
        self.config, self.counts, self.device = config, counts, device

    def set_epoch(self, epoch: int) -> None:
        """Called before every epoch (0-based)."""

    def set_iteration(self, iteration: int) -> None:
        """Called before every batch with its position in the epoch's stream."""

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        return cls
    return add


@register_method("ce")
class CrossEntropy(Method):
    """mean_i −log softmax(z_i)_{y_i}."""

    def __call__(self, logits, targets):
        return F.cross_entropy(logits, targets)


@register_method("la")
class LogitAdjusted(Method):
    """CE of z + τ·log π (`losses.logit_adjusted_loss`)."""

    def __call__(self, logits, targets):
        return logit_adjusted_loss(logits, targets, self.counts.to(logits.device), self.config.tau)


class ModuleMethod(Method):
    """A method whose loss is an `nn.Module` of the losses package."""

    loss: nn.Module

    def __call__(self, logits, targets):
        return self.loss(logits, targets)


@register_method("vs")
class VectorScaling(ModuleMethod):
    """VS: CE(Δ ⊙ z + ι, y), Δ_c = (π_c / max π)^γ, ι_c = τ·log π_c (`losses.vs`)."""

    def __init__(self, config, counts, iterations, device):
        super().__init__(config, counts, iterations, device)
        self.loss = VSLoss(counts, config.vs_gamma, config.vs_tau).to(device)


@register_method("ldam")
class LDAM(ModuleMethod):
    """LDAM, with class-balanced re-weighting from the deferred epoch on (DRW) unless switched off."""

    def __init__(self, config, counts, iterations, device):
        super().__init__(config, counts, iterations, device)
        self.loss = LDAMLoss(counts, config.ldam_margin, config.ldam_scale).to(device)

    def set_epoch(self, epoch):
        if self.config.drw:
            weights = drw_weights(self.counts, epoch, deferred_switch_epoch(self.config.epochs))
            self.loss.weight = weights.to(self.device)


@register_method("tla-adrw")
class TLAADRW(ModuleMethod):
    """VS, then from the deferred epoch on TLA with ADRW weights (`losses.tla_adrw`)."""

    def __init__(self, config, counts, iterations, device):
        super().__init__(config, counts, iterations, device)
        self.loss = TLAADRWLoss(counts, total_epochs=config.epochs, gamma=config.vs_gamma, tau=config.vs_tau,
                                stage2_tau=config.tla_tau, nu=config.adrw_nu).to(device)

    def set_epoch(self, epoch):
        self.loss.set_epoch(epoch)


@register_method("dirmixe")
class DirMixE(Method):
    """DirMixE's objective over the expert logits, with the batch's draws from the run's fixed pool."""

    def __init__(self, config, counts, iterations, device):
        super().__init__(config, counts, iterations, device)
        dm = config.dirmixe_config()
        self.loss = DirMixELoss(counts, dm.tau, dm.lambda_var).to(device)
        self.pool = DrawPool(counts, dm.trials, iterations, dm.concentration, seed=config.seed)
        self.epoch, self.draws = 0, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_iteration(self, iteration):
        self.draws = self.pool.draws(self.epoch, iteration)

    def __call__(self, logits, targets):
        return self.loss(logits, targets, *self.draws, final_phase=is_final_phase(self.epoch, self.config.epochs))


@register_method("drauc")
class DRAUC(Method):
    """One-vs-rest DRAUC (`losses.drauc`): the mean over classes of the min-max square AUC loss F at the
    worst-case (head-input) features, with a, b, α per class. The adversary, PESG and the α ascent run in the
    training step (`downstream.cls.drauc.DRAUCUpdater`); called on clean logits this is F there."""

    def __init__(self, config, counts, iterations, device):
        super().__init__(config, counts, iterations, device)
        self.loss = DRAUCLoss(num_classes=len(counts), epsilon=config.drauc_epsilon, step_size=config.drauc_step_size,
                              steps=config.drauc_steps, lambda_lr=config.drauc_lambda_lr,
                              alpha_step=config.drauc_alpha_step).to(device)

    def __call__(self, logits, targets):
        return self.loss(logits, targets)


@register_method("tkpr")
class TKPR(Method):
    """TKPR's convex surrogate on one-hot targets (`losses.tkpr`, RECONSTRUCTED from the abstract: no released
    code): pairwise 1/K_eff · Σ_{j≤K_eff} φ(z_y − z^N_[j]) over the K_eff = min(K, C − 1) largest other logits, or
    the pointwise form; φ logistic by default. Trained with the configured SGD (no released recipe)."""

    def __call__(self, logits, targets):
        onehot = F.one_hot(targets, logits.shape[-1])
        return tkpr_surrogate_loss(logits, onehot, self.config.tkpr_k, self.config.tkpr_surrogate,
                                   self.config.tkpr_form)


class Objective:
    """The configured method's loss of a batch, and its head / tail parts for ImbSAM and SSE-SAM.

    `sum_across` (set when several processes train together) sums a tensor over them: the group sizes the
    SAM family branches on must be the global ones, or the processes would take different branches.
    """

    def __init__(self, config: ClsTrainConfig, counts: np.ndarray, iterations: int, device: torch.device,
                 sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.method = METHODS[config.method](config, torch.as_tensor(counts, dtype=torch.float64), iterations,
                                             device)
        self.sum_across = sum_across

    def set_epoch(self, epoch: int) -> None:
        self.method.set_epoch(epoch)

    def set_iteration(self, iteration: int) -> None:
        self.method.set_iteration(iteration)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.method(logits, targets)

    def grouped(self, out: torch.Tensor, y: torch.Tensor, tail: torch.Tensor) -> GroupLosses:
        """Head and tail losses for ImbSAM / SSE-SAM: (|G|/|B|)·loss(group G's samples), so that for a mean
        loss L_H + L_T is the batch loss (SSE-SAM's normalisation); an empty group gives 0 with a graph."""
        is_tail = torch.isin(y, tail.to(y.device))
        parts, sizes = [], []
        for mask in (~is_tail, is_tail):
            k = int(mask.sum())
            sizes.append(k)
            parts.append(self(out[..., mask, :], y[mask]) * (k / len(y)) if k else out.sum() * 0.0)
        if self.sum_across is not None:
            sizes = [int(v) for v in self.sum_across(torch.tensor(sizes, device=out.device))]
        return GroupLosses(parts[0], parts[1], sizes[0], sizes[1])


# ------------------------------------------------------------------------------------------ optimizers
@dataclass(frozen=True)
class OptimizerKind:
    """How an optimizer is built (`build(params, config, tail)`) and how a step calls it: `closure` None is
    a plain backward and step; "loss" and "groups" hand the optimizer a closure returning the batch loss or
    its head / tail parts (the SAM family back-propagates itself)."""

    build: Callable[[Iterable[nn.Parameter], ClsTrainConfig, Sequence[int]], torch.optim.Optimizer]
    closure: str | None = None


def _sgd(config: ClsTrainConfig) -> dict:
    return {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay,
            "nesterov": config.nesterov and config.momentum > 0}


OPTIMIZERS: dict[str, OptimizerKind] = {
    "none": OptimizerKind(lambda params, config, tail: torch.optim.SGD(params, **_sgd(config))),
    "sam": OptimizerKind(lambda params, config, tail: SAM(params, torch.optim.SGD, rho=config.rho, **_sgd(config)),
                         closure="loss"),
    "imbsam": OptimizerKind(lambda params, config, tail: ImbSAM(params, torch.optim.SGD, tail_classes=list(tail),
                                                                rho=config.rho, tail_weight=config.imbsam_tail_weight,
                                                                **_sgd(config)), closure="groups"),
    "ssesam": OptimizerKind(lambda params, config, tail: SSESAM(params, torch.optim.SGD, tail_classes=list(tail),
                                                                rho_head=config.rho, rho_tail=config.rho_tail,
                                                                gamma=config.sse_gamma, total_epochs=config.epochs,
                                                                **_sgd(config)), closure="groups"),
}


def build_optimizer(params, config: ClsTrainConfig, tail: Sequence[int]) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.optim].build(params, config, tail)


def tail_split(config: ClsTrainConfig, counts: np.ndarray) -> tuple[float, list[int]]:
    """(η, T = {c : n_c < η}): the tail of ImbSAM and SSE-SAM. η defaults to ImbSAM's released 20 samples with
    `optim` imbsam, and to 0.2·n_max otherwise (the "relative" rule: SSE-SAM's README η = 100 on CIFAR-100-LT
    as a ratio; the report's tail for the other methods)."""
    rule = "imbsam" if config.optim == "imbsam" else "relative"
    eta = config.tail_eta if config.tail_eta is not None else tail_eta(counts, rule)
    return eta, tail_classes(counts, eta)


def epoch_cosine_rate(base_lr: float, epoch: int, epochs: int) -> float:
    """The ImbSAM / SSE-SAM scripts' rate in (0-based) `epoch`: `CosineAnnealingLR(T_max = E, eta_min = 0)` stepped
    at the start of every epoch, before training (cool-xuan/Imbalanced_SAM and Zemdalk/SSE-SAM `utils/trainval.py`),
    so epoch e trains at ½(1 + cos(π(e + 1)/E))·lr, constant within the epoch, and the last epoch at 0.

    >>> [round(epoch_cosine_rate(0.1, e, 4), 6) for e in range(4)]
    [0.085355, 0.05, 0.014645, 0.0]
    """
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch + 1, epochs) / epochs))


class HeadUpdater:
    """The training loop's step for every head but ReconBoost: one optimizer for the whole run."""

    key = None  # one optimizer throughout (ReconBoost's updater names its phase here)

    def __init__(self, model: nn.Module, config: ClsTrainConfig, objective: Objective, tail: Sequence[int]):
        self.model, self.objective, self.base_lr = model, objective, config.lr
        self.schedule, self.epochs = config.lr_schedule, config.epochs
        self.kind = OPTIMIZERS[config.optim]
        self.optimizer = self.kind.build(model.parameters(), config, tail)
        self.tail = torch.as_tensor(tail, dtype=torch.long)

    def restore(self, checkpoint) -> None:
        load_optimizer(self.optimizer, checkpoint)

    def state(self) -> dict:
        """What a checkpoint keeps beside model and optimizer (nothing here)."""
        return {}

    def learning_rate(self, epoch: int, iteration: int, total: int, warmup: int) -> float:
        """The rate of global `iteration` (of `total`, in `epoch`): linear warm-up, then cosine decay per
        iteration ("warmup-cosine"); or `epoch_cosine_rate` ("epoch-cosine", the ImbSAM / SSE-SAM scripts')."""
        if self.schedule == "epoch-cosine":
            return epoch_cosine_rate(self.base_lr, epoch, self.epochs)
        return self.base_lr * cosine_factor(iteration, total, warmup)

    def start_epoch(self, epoch: int) -> None:
        pass

    def step(self, xb: Sequence[torch.Tensor], yb: torch.Tensor) -> torch.Tensor:
        model, objective = self.model, self.objective
        if self.kind.closure is None:
            loss = objective(model(xb), yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return loss
        if self.kind.closure == "groups":
            return self.optimizer.step(lambda: objective.grouped(model(xb), yb, self.tail))
        return self.optimizer.step(lambda: objective(model(xb), yb))

    def end_epoch(self) -> None:
        epoch_end = getattr(self.optimizer, "epoch_end", None)  # SSE-SAM counts epochs for its radius switch
        if epoch_end is not None:
            epoch_end()
