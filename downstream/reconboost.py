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
(`train_cls`) gives ReconBoost the learning rate and warm-up + cosine schedule of the other heads (the code's
lr 0.01 with step decay is tuned for thousands of iterations per epoch; on a few hundred pooled vectors it
leaves the learners under-trained). The code's
memory-consolidation ("GA") term compares two detached tensors, so it has no gradient: it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ReconBoostConfig:
    stages: int = 16  # modality-update + rectification rounds (sources visited in turn)
    stage_epochs: int = 4  # epochs of each modality update (`epochs_per_stage`)
    correct_epochs: int = 2  # epochs of each global rectification (`correct_epoch`)
    weight1: float = 5.0  # λ₁
    weight2: float = 1.0  # λ₂, the reconcilement weight
    lr: float = 0.01  # modality-update SGD (`m_lr`)
    correct_lr: float = 0.01  # rectification SGD (`e_lr`)
    head_hidden: int = 128  # width of the shared head's hidden layer

    @property
    def epochs(self) -> int:
        return self.stages * (self.stage_epochs + self.correct_epochs)


def schedule(epoch: int, config: ReconBoostConfig, num_sources: int) -> tuple[int, str, int]:
    """(stage, phase "update" | "rectify", source) of 0-based `epoch`."""
    stage, pos = divmod(epoch, config.stage_epochs + config.correct_epochs)
    return stage, ("update" if pos < config.stage_epochs else "rectify"), stage % num_sources


class ReconBoostModel(nn.Module):
    """Per-source encoders g_m, a shared head h and the boost rate β; forward(blocks) = β·Σ_m h(g_m(x^m))."""

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 256, head_hidden: int = 128):
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


def phase_optimizer(model: ReconBoostModel, phase: str, source: int, config: ReconBoostConfig,
                    momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD over what the phase trains (a fresh one per phase, as the code builds them)."""
    if phase == "update":
        return torch.optim.SGD(model.source_parameters(source), lr=config.lr, momentum=momentum,
                               weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.correct_lr, momentum=momentum, weight_decay=weight_decay)


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
