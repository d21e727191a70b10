"""The classification model on pooled features: norm → fusion → trunk → head.

Per-source standardisation by training statistics, fusion of the sources (concatenation, a learned
softmax-weighted sum, or ReconBoost's per-source learners, which replace trunk and head), a trunk
(Linear → ReLU, `hidden` wide; none at 0), and a head chosen by name from `HEADS`: linear, cosine (s·cos),
a fixed simplex-ETF or Grassmannian frame (`neural_collapse`); DirMixE brings its own three experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from downstream.cls.config import ClsTrainConfig
from downstream.cls.dirmixe import EXPERT_NAMES, DirMixEHead
from downstream.cls.neural_collapse import FixedFrameClassifier
from downstream.cls.reconboost import ReconBoostModel
from downstream.losses import CosineClassifier


class SourceNorm(nn.Module):
    """Per-feature standardisation of every source by training statistics (buffers, saved with the model)."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.register_buffer("mean", torch.zeros(sum(self.dims)))
        self.register_buffer("std", torch.ones(sum(self.dims)))

    @torch.no_grad()
    def fit(self, blocks: Sequence[torch.Tensor]) -> None:
        x = torch.cat(list(blocks), 1).double()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).nan_to_num(1.0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(self.std))

    def forward(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = (torch.cat(list(blocks), 1) - self.mean) / self.std
        return list(x.split(self.dims, 1))


class WeightedSources(nn.Module):
    """A learned softmax-weighted sum of sources: r = Σ_s softmax_s(a)[s] ⊙ x_s, per feature (the content-shift
    paper's amalgamation); sources of different widths are first projected linearly to `width`."""

    def __init__(self, dims: Sequence[int], width: int):
        super().__init__()
        self.project = len(set(dims)) > 1
        out = width if self.project else int(dims[0])
        self.projections = nn.ModuleList(nn.Linear(d, out) for d in dims) if self.project else None
        self.logits = nn.Parameter(torch.zeros(len(dims), out))
        self.out_features = out

    def forward(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = [p(x) for p, x in zip(self.projections, blocks)] if self.project else list(blocks)
        w = torch.softmax(self.logits, 0)
        return sum(w[s] * x for s, x in enumerate(xs))

    def source_weights(self) -> list[float]:
        """Mean softmax weight of each source (for the report)."""
        return torch.softmax(self.logits.detach(), 0).mean(1).tolist()


# head name → builder(width, num_classes, config, scale)
HeadBuilder = Callable[[int, int, ClsTrainConfig, float], nn.Module]


def _frame(width: int, num_classes: int, config: ClsTrainConfig, scale: float) -> nn.Module:
    return FixedFrameClassifier(width, num_classes, dim=config.frame_dim or width, frame=config.head,
                                assignment=config.assignment, scale=scale, seed=config.seed)


HEADS: dict[str, HeadBuilder] = {
    "linear": lambda width, num_classes, config, scale: nn.Linear(width, num_classes),
    "cosine": lambda width, num_classes, config, scale: CosineClassifier(width, num_classes, scale),
    "etf": _frame,
    "grassmannian": _frame,
}


class ClsModel(nn.Module):
    """norm → fusion → trunk → head; forward(blocks) → logits [B, C] ([3, B, C] for DirMixE)."""

    def __init__(self, dims: Sequence[int], num_classes: int, config: ClsTrainConfig):
        super().__init__()
        self.norm = SourceNorm(dims)
        self.kind, self.method = config.head, config.method
        if config.fusion == "reconboost":
            width = config.hidden or ClsTrainConfig.hidden
            self.body = ReconBoostModel(dims, num_classes, width, config.reconboost_config().head_hidden)
            self.fuse = self.trunk = self.head = None
            return
        self.body = None
        self.fuse = WeightedSources(dims, config.hidden or max(dims)) if config.fusion == "weighted" else None
        width = self.fuse.out_features if self.fuse is not None else sum(dims)
        if config.hidden:
            self.trunk = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU())
            width = config.hidden
        else:
            self.trunk = nn.Identity()
        scale = 1.0 if config.method == "ldam" else config.scale  # LDAM scales cosine logits in its loss
        if config.method == "dirmixe":
            self.head = DirMixEHead(width, num_classes, config.hidden or width, config.scale)
        else:
            self.head = HEADS[config.default_head()](width, num_classes, config, scale)

    def embed(self, normed: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(normed) if self.fuse is not None else torch.cat(list(normed), 1)
        return self.trunk(x)

    def forward_normed(self, normed: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.body is not None:
            return self.body(normed)
        return self.head(self.embed(normed))

    def forward(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_normed(self.norm(blocks))

    @torch.no_grad()
    def penultimate(self, blocks: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None]]:
        """(name, features h, weight W, bias b) with logits = h Wᵀ + b: what the NC metrics look at."""
        if self.body is not None:
            return []
        h = self.embed(self.norm(blocks))
        if isinstance(self.head, DirMixEHead):
            return [(name, f, w, None) for name, (f, w) in zip(EXPERT_NAMES, self.head.penultimate(h))]
        if isinstance(self.head, nn.Linear):
            return [("head", h, self.head.weight, self.head.bias)]
        if isinstance(self.head, CosineClassifier):
            return [("head", F.normalize(h, dim=-1), self.head.scale * F.normalize(self.head.weight, dim=-1), None)]
        return [("head", F.normalize(self.head.projection(h), dim=-1), self.head.scale * self.head.weight, None)]
