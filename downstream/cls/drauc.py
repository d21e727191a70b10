"""DRAUC's training step for `train-cls --method drauc`: the adversary, PESG and the α ascent, with DRAUC's own
learning-rate schedule (EldercatSAM/DRAUC `train.py`; research/longtail_suite.md §2, §7).

Per batch: the worst-case head inputs x + δ* for the current head (`DRAUCLoss.perturb`: per-sample ascent of
F_i − λ·‖δ_i‖² on the standardised features, the dual step on λ every 10 batches of an epoch, counted from the
epoch's first batch with the costs of earlier epochs dropped, as the released `train.py` restarts its batch index
and cost list), the loss F at them, a PESG step on the model and a, b (`downstream.optim.PESG`), then α's
closed-form ascent with the same rate. The schedule is per epoch and has no warm-up, as released: "step"
multiplies the rate by 0.1 at ⌊E/2⌋ and ⌊3E/4⌋ (the code's epochs 50 and 75 of 100); "cosine" is the code's
`CosineAnnealingLR(T_max = E)`. Under both, PESG's reference point moves to the mean iterate at ⌊E/2⌋ and
⌊3E/4⌋ (the code's `update_regularizer` at its `decay_epochs`, which it calls whatever the schedule).

The random start of each batch's ascent comes from a generator seeded by (seed, epoch, batch), so a resumed
run repeats an uninterrupted one. One process only: the batch class means, λ and a, b would differ between
processes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from difffeat.errors import UserError
from downstream.cls.config import ClsTrainConfig
from downstream.engine import load_optimizer
from downstream.optim import PESG

LOSS_STATE = "drauc_loss"  # the checkpoint entry of a, b, α, λ and the dual step's running sums


def milestones(epochs: int) -> tuple[int, int]:
    """The decay epochs (0-based, from then on): ⌊E/2⌋ and ⌊3E/4⌋, the code's 50 and 75 of 100: the step schedule's
    ×0.1 and, under either schedule, PESG's reference update.

    >>> milestones(100), milestones(10)
    ((50, 75), (5, 7))
    """
    return epochs // 2, (3 * epochs) // 4


def drauc_rate(base_lr: float, epoch: int, epochs: int, schedule: str = "step") -> float:
    """DRAUC's learning rate in (0-based) `epoch`: ×0.1 per milestone passed ("step"), or cosine annealing to 0
    over the epochs ("cosine", eta_min 0), constant within an epoch.

    >>> [round(drauc_rate(0.1, e, 100), 6) for e in (0, 49, 50, 74, 75, 99)]
    [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    >>> round(drauc_rate(0.1, 50, 100, "cosine"), 12)
    0.05
    """
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in milestones(epochs))
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise UserError(f"DRAUC schedule must be step or cosine, got {schedule!r}")


class DRAUCUpdater:
    """The training loop's step for `--method drauc` (see the module doc); the same interface as `HeadUpdater`."""

    key = None

    def __init__(self, model: nn.Module, config: ClsTrainConfig, objective, world: int = 1):
        if world > 1:
            raise UserError("method drauc trains in one process (its batch means and dual variables are per "
                            "process); launch it without torchrun / accelerate")
        self.model, self.config = model, config
        self.loss = objective.method.loss
        self.base_lr = config.lr
        params = [*model.parameters(), *self.loss.minimized_parameters()]
        self.optimizer = PESG(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                              epoch_decay=config.drauc_epoch_decay, seed=config.seed)
        self.epoch, self.batch = 0, 0

    def restore(self, checkpoint) -> None:
        load_optimizer(self.optimizer, checkpoint)
        self.loss.load_state_dict(checkpoint.load(LOSS_STATE))

    def state(self) -> dict:
        return {LOSS_STATE: {k: v.detach().clone() for k, v in self.loss.state_dict().items()}}

    def learning_rate(self, epoch: int, iteration: int, total: int, warmup: int) -> float:
        return drauc_rate(self.base_lr, epoch, self.config.epochs, self.config.drauc_schedule)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0
        if epoch in milestones(self.config.epochs):  # under either schedule, as released
            self.optimizer.update_reference()
        self.loss.restart_dual_period()

    def step(self, blocks: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        model = self.model
        normed = model.norm(blocks)
        dims = [b.shape[1] for b in normed]

        def head(x: torch.Tensor) -> torch.Tensor:
            return model.forward_normed(list(x.split(dims, 1)))

        gen = torch.Generator().manual_seed(zlib.crc32(f"drauc/{self.config.seed}/{self.epoch}/{self.batch}".encode()))
        self.batch += 1
        worst = self.loss.perturb(head, torch.cat(normed, 1), targets, generator=gen)
        loss = self.loss(head(worst), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss.alpha.grad = None
        loss.backward()
        self.optimizer.step()
        self.loss.ascend_alpha(self.optimizer.param_groups[0]["lr"])
        return loss

    def end_epoch(self) -> None:
        pass
