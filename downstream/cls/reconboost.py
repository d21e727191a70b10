"""ReconBoost across feature sources (Hua et al., ICML 2024; research/longtail_suite.md §5).

Feature sources (stores of different technique variants, layers, or timesteps) play the modalities. Source m
has a learner φ_m(x) = h(g_m(x^m)): its own encoder g_m (Linear → ReLU) and a head h shared by all sources
(the code's `common_space`); the ensemble predicts F(x) = β·Σ_m φ_m(x^m), β a learned scalar (init 1).

Training alternates stages; stage t updates source m = t mod M, then rectifies the whole ensemble:

1. modality update (`stage_epochs` epochs; only g_m and h train): with q = softmax(β·Σ_{k≠m} φ_k) (no
   gradient) and p = softmax(φ_m),
       ℓ = (1/C)·(−λ₁·log p_y + λ₂·q_y·log p_y) = (λ₁·CE(p, y) − λ₂·KL(y⊙q ‖ p))/C + (λ₂/C)·q_y·log q_y,
   so the λ₂ term is the KL reconcilement regulariser: it pushes φ_m away from what the other sources already
   predict correctly, and up-weights the samples they get wrong (the boosting reading);
2. global rectification (`correct_epochs` epochs; all encoders, h and β train): CE(F(x), y).

A logit adjustment τ·log π (method `la`) is added to every logit before its softmax, in both phases. Defaults
are the CREMA-D setting of the code (λ₁ = 5, λ₂ = 1, SGD momentum 0.9, weight decay 5e-4, 4 epochs per
modality update); rectification runs 2 epochs (the code: 4) since pooled features fit quickly. The trainer
(`downstream.cls.train`) gives ReconBoost the learning rate and warm-up + cosine schedule of the other heads
(the code's lr 0.01 with step decay is tuned for thousands of iterations per epoch; on a few hundred pooled
vectors it leaves the learners under-trained). The code's memory-consolidation ("GA") term compares two
detached tensors, so it has no gradient: it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from downstream.cls.config import ReconBoostConfig
from downstream.engine import cosine_factor, load_optimizer

__all__ = ["ReconBoostConfig", "ReconBoostModel", "ReconBoostUpdater", "phase_loss", "phase_optimizer",
           "reconcilement_loss", "schedule"]


def schedule(epoch: int, config: ReconBoostConfig, num_sources: int) -> tuple[int, str, int]:
    """(stage, phase "update" | "rectify", source) of 0-based `epoch`."""
    stage, pos = divmod(epoch, config.stage_epochs + config.correct_epochs)
    return stage, ("update" if pos < config.stage_epochs else "rectify"), stage % num_sources


class ReconBoostModel(nn.Module):
    """Per-source encoders g_m, a shared head h and the boost rate β; forward(blocks) = β·Σ_m h(g_m(x^m))."""

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 256,
                 head_hidden: int = ReconBoostConfig.head_hidden):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for d in dims)
        self.head = nn.Sequential(nn.Linear(hidden, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))
        self.boost_rate = nn.Parameter(torch.tensor(1.0))

    def learner(self, m: int, x: torch.Tensor) -> torch.Tensor:
        """φ_m(x^m) [B, C]."""
        return self.head(self.encoders[m](x))

    def forward(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.boost_rate * torch.stack([self.learner(m, x) for m, x in enumerate(blocks)]).sum(0)

    def others(self, blocks: Sequence[torch.Tensor], m: int) -> torch.Tensor:
        """β·Σ_{k≠m} φ_k(x^k) [B, C] (zeros when there is no other source)."""
        parts = [self.learner(k, x) for k, x in enumerate(blocks) if k != m]
        if not parts:
            return torch.zeros_like(self.learner(m, blocks[m]))
        return self.boost_rate * torch.stack(parts).sum(0)

    def source_parameters(self, m: int) -> list[nn.Parameter]:
        """What a modality update of source m trains: g_m and the shared head."""
        return [*self.encoders[m].parameters(), *self.head.parameters()]


def reconcilement_loss(logits: torch.Tensor, others: torch.Tensor, targets: torch.Tensor, weight1: float = 5.0,
                       weight2: float = 1.0, adjust: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i (1/C)·(−λ₁ + λ₂·q_{y_i})·log p_{y_i}, p = softmax(φ_m + a), q = softmax(others + a) detached.

    `adjust` a [C] is an optional logit adjustment (τ·log π). See the module doc for the KL form.
    """
    if adjust is not None:
        logits, others = logits + adjust.to(logits), others + adjust.to(others)
    q_y = torch.softmax(others.detach(), -1).gather(1, targets[:, None]).squeeze(1)
    log_p_y = F.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    return ((-weight1 + weight2 * q_y) * log_p_y).mean() / logits.shape[-1]


def phase_optimizer(model: ReconBoostModel, phase: str, source: int, config: ReconBoostConfig) -> torch.optim.Optimizer:
    """SGD over what the phase trains (a fresh one per phase, as the code builds them)."""
    config = config.filled()  # unset settings: the code's
    if phase == "update":
        return torch.optim.SGD(model.source_parameters(source), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.correct_lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def phase_loss(model: ReconBoostModel, blocks: Sequence[torch.Tensor], targets: torch.Tensor, phase: str,
               source: int, config: ReconBoostConfig, adjust: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch in `phase` (see the module doc)."""
    if phase == "update":
        with torch.no_grad():
            others = model.others(blocks, source)
        return reconcilement_loss(model.learner(source, blocks[source]), others, targets, config.weight1,
                                  config.weight2, adjust)
    logits = model(blocks)
    return F.cross_entropy(logits if adjust is None else logits + adjust.to(logits), targets)


class ReconBoostUpdater:
    """ReconBoost's side of the training loop: at each epoch the phase's optimizer (a fresh SGD when a phase
    starts; the checkpointed one when a resumed run starts inside that phase), its base learning rate, and the
    step on a batch. `model` has the `ReconBoostModel` as `.body` and the source standardisation as `.norm`."""

    def __init__(self, model: nn.Module, config: ReconBoostConfig, num_sources: int,
                 adjust: torch.Tensor | None = None):
        self.model, self.config, self.num_sources, self.adjust = model, config.filled(), num_sources, adjust
        self.optimizer: torch.optim.Optimizer | None = None
        self.key: str | None = None  # "stage:phase" of the optimizer, saved with a checkpoint
        self.phase, self.source = "update", 0
        self.checkpoint = None

    def restore(self, checkpoint) -> None:
        """Resume: the optimizer state is loaded when the checkpointed phase's optimizer is built."""
        self.checkpoint = checkpoint

    def start_epoch(self, epoch: int) -> None:
        stage, self.phase, self.source = schedule(epoch, self.config, self.num_sources)
        key = f"{stage}:{self.phase}"
        if key != self.key:
            self.optimizer, self.key = phase_optimizer(self.model.body, self.phase, self.source, self.config), key
            if self.checkpoint is not None and key == self.checkpoint.load("optimizer_key"):
                load_optimizer(self.optimizer, self.checkpoint)

    @property
    def base_lr(self) -> float:
        return self.config.lr if self.phase == "update" else self.config.correct_lr

    def learning_rate(self, epoch: int, iteration: int, total: int, warmup: int) -> float:
        """The phase's base rate with the run's warm-up and cosine decay over global `iteration` of `total`."""
        return self.base_lr * cosine_factor(iteration, total, warmup)

    def state(self) -> dict:
        """What a checkpoint keeps beside model and optimizer (nothing here)."""
        return {}

    def step(self, blocks: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        loss = phase_loss(self.model.body, self.model.norm(blocks), targets, self.phase, self.source, self.config,
                          self.adjust)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def end_epoch(self) -> None:
        pass
