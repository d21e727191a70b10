"""Segmentation heads on stored feature maps, and the model that strings normalisation, amalgamation and head.

Every head takes the list of feature maps of a batch (one ``[B, C_i, h_i, w_i]`` tensor per variant and
layer) and returns a list of logits ``[B, K, h, w]`` at the finest input grid: one per ensemble member
(the pixel MLP ensemble) or a single one (the conv head). Each member is trained with its own loss, so
the members of an ensemble learn independently, as in ddpm-segmentation; the trainer upsamples logits to
the mask resolution. Heads know nothing of the loss.

- `PixelMLPEnsemble`: ddpm-segmentation's per-pixel MLP classifier (``Linear(D→128)→ReLU→BN→Linear(128→32)
  →ReLU→BN→Linear(32→K)``, widths 256/128 when K ≥ 30, init N(0, 0.02)), an ensemble of them, majority vote
  at inference; inputs resized (bilinear) to a common grid and concatenated.
- `MultiScaleConvHead`: per-layer 1×1 projection, upsample to the finest grid, concatenate, 3×3 fuse, 1×1
  classifier: the lightest head that mixes layers of different depth and resolution.
- `VariantSum`: the content-shift paper's feature amalgamation in the form its code uses: per layer, a
  softmax over variants of learned per-channel weights, ``r = Σ_v softmax_v(a)[v] ⊙ r_v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from downstream.seg_data import FeatureSpec

HEADS = ("mlp", "conv")
VARIANT_MODES = ("concat", "weighted")


@dataclass
class HeadConfig:
    """Which head and how the feature maps reach it."""

    kind: str = "conv"  # mlp | conv
    variants: str = "concat"  # concat: every variant's maps side by side; weighted: VariantSum first
    ensemble: int = 10  # members of the pixel MLP ensemble (ddpm-segmentation uses 10)
    hidden: int = 128  # conv head: width of each layer's projection and of the fuse conv
    dropout: float = 0.1  # conv head, before the classifier
    normalize: bool = True  # standardise each input channel by train-set statistics

    def to_dict(self) -> dict:
        return asdict(self)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                      align_corners=False)


def finest_grid(shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The largest (h, w) of [C, h, w] shapes: the grid every head predicts on."""
    h, w = max(((s[-2], s[-1]) for s in shapes), key=lambda hw: hw[0] * hw[1])
    return int(h), int(w)


class FeatureNorm(nn.Module):
    """Per-channel standardisation of each input map by statistics of the training set (buffers, saved).

    Diffusion features, VAE latents and raw pixels differ in scale by orders of magnitude; fixing the
    scale up front keeps one learning rate right for all of them.
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        for i, c in enumerate(channels):
            self.register_buffer(f"mean{i}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"std{i}", torch.ones(1, c, 1, 1))
        self.n = len(channels)

    @torch.no_grad()
    def fit(self, samples: Sequence[Sequence[torch.Tensor]]) -> None:
        """Set mean and std from samples: each a list of [C_i, h_i, w_i] maps (one image)."""
        for i in range(self.n):
            x = torch.stack([s[i] for s in samples]).double().transpose(0, 1).reshape(len(samples[0][i]), -1)
            getattr(self, f"mean{i}").copy_(x.mean(1).view(1, -1, 1, 1))
            getattr(self, f"std{i}").copy_(x.std(1).clamp(min=1e-6).view(1, -1, 1, 1))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [(x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}") for i, x in enumerate(features)]


class VariantSum(nn.Module):
    """Softmax-weighted sum over feature variants, per layer and channel (learned; uniform at start).

    Input maps are ordered variant by variant, each variant with the same layers (same channels); a
    variant's map at another grid is resized to the first variant's.
    """

    def __init__(self, specs: Sequence[FeatureSpec]):
        super().__init__()
        variants = sorted({s.variant for s in specs})
        per_variant = [[s for s in specs if s.variant == v] for v in variants]
        first = per_variant[0]
        for group in per_variant[1:]:
            if [s.shape[0] for s in group] != [s.shape[0] for s in first]:
                raise ValueError("weighted variants need the same layers with the same channels in every "
                                 f"feature store; got {[s.shape for s in first]} and {[s.shape for s in group]}")
        self.positions = [[specs.index(group[j]) for group in per_variant] for j in range(len(first))]
        self.logits = nn.ParameterList([nn.Parameter(torch.zeros(len(variants), s.shape[0])) for s in first])
        self.out_shapes = [s.shape for s in first]

    def weights(self) -> list[torch.Tensor]:
        """Per layer, the [V, C] variant weights (each column sums to 1)."""
        return [torch.softmax(a, dim=0) for a in self.logits]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for pos, w in zip(self.positions, self.weights()):
            size = features[pos[0]].shape[-2:]
            out.append(sum(w[v].view(1, -1, 1, 1) * _resize(features[p], size) for v, p in enumerate(pos)))
        return out


def _ddpm_seg_init(module: nn.Module, gain: float = 0.02) -> None:
    """ddpm-segmentation's init_weights('normal', 0.02): weights N(0, gain), BN weights N(1, gain), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


class PixelMLPEnsemble(nn.Module):
    """An ensemble of per-pixel MLPs (ddpm-segmentation's `pixel_classifier`), as 1×1 convolutions.

    A 1×1 conv over a map equals a Linear over its pixels, and BatchNorm2d over a [B, C, h, w] batch equals
    BatchNorm1d over its B·h·w pixels, so this is their classifier applied to every pixel at once.
    """

    def __init__(self, in_shapes: Sequence[Sequence[int]], num_classes: int, members: int = 10):
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        dim = sum(int(s[0]) for s in in_shapes)
        a, b = (256, 128) if num_classes >= 30 else (128, 32)
        self.grid = finest_grid(in_shapes)
        self.members = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, a, 1), nn.ReLU(), nn.BatchNorm2d(a), nn.Conv2d(a, b, 1), nn.ReLU(),
                          nn.BatchNorm2d(b), nn.Conv2d(b, num_classes, 1))
            for _ in range(members)])
        _ddpm_seg_init(self)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([_resize(f, self.grid) for f in features], dim=1)
        return [m(x) for m in self.members]


class MultiScaleConvHead(nn.Module):
    """Per-layer 1×1 projection (+BN, ReLU), upsample to the finest grid, concatenate, 3×3 fuse, 1×1 classify."""

    def __init__(self, in_shapes: Sequence[Sequence[int]], num_classes: int, hidden: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.grid = finest_grid(in_shapes)
        self.proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(int(s[0]), hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
            for s in in_shapes])
        self.fuse = nn.Sequential(nn.Conv2d(hidden * len(in_shapes), hidden, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU(), nn.Dropout2d(dropout))
        self.classify = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([_resize(p(f), self.grid) for p, f in zip(self.proj, features)], dim=1)
        return [self.classify(self.fuse(x))]


class SegModel(nn.Module):
    """Feature maps → [normalisation] → [variant amalgamation] → head; what `train_seg` trains and saves."""

    def __init__(self, specs: Sequence[FeatureSpec], num_classes: int, config: HeadConfig | None = None):
        super().__init__()
        config = config or HeadConfig()
        if config.kind not in HEADS:
            raise ValueError(f"unknown head {config.kind!r} (valid: {', '.join(HEADS)})")
        if config.variants not in VARIANT_MODES:
            raise ValueError(f"unknown variant mode {config.variants!r} (valid: {', '.join(VARIANT_MODES)})")
        self.config = config
        self.specs = list(specs)
        self.num_classes = num_classes
        self.norm = FeatureNorm([s.shape[0] for s in specs]) if config.normalize else None
        self.amalgamate = None
        shapes = [s.shape for s in specs]
        if config.variants == "weighted" and len({s.variant for s in specs}) > 1:
            self.amalgamate = VariantSum(specs)
            shapes = self.amalgamate.out_shapes
        if config.kind == "mlp":
            self.head = PixelMLPEnsemble(shapes, num_classes, config.ensemble)
        else:
            self.head = MultiScaleConvHead(shapes, num_classes, config.hidden, config.dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Member logits, each [B, K, h, w] at the finest feature grid."""
        if self.norm is not None:
            features = self.norm(features)
        if self.amalgamate is not None:
            features = self.amalgamate(features)
        return self.head(features)

    @torch.no_grad()
    def predict(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Class ids [B, H, W] at `size`: logits upsampled (bilinear), argmax; majority vote over members."""
        votes = [F.interpolate(z, size=size, mode="bilinear", align_corners=False).argmax(1) for z in self(features)]
        if len(votes) == 1:
            return votes[0]
        return torch.stack(votes).mode(dim=0).values  # ties go to the smallest class id
