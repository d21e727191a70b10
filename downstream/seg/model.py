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
- Several feature variants (stores, or ``NAME/`` layer prefixes of one store) are concatenated, or mixed
  before the head (`downstream.seg.amalgamate`): `VariantSum` (``weighted``, a static per-channel softmax) or
  `Amalgamation` (``amalgamate``, the content-shift paper's input-conditioned weight assigners), whose Eq. 5
  terms ``SegModel(features, with_penalty=True)`` returns beside the logits, for the objective to weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difffeat.spine.run import ConfigError
from downstream.seg.amalgamate import Amalgamation, VariantSum, variant_layout
from downstream.seg.config import HeadConfig
from downstream.seg.data import FeatureSpec

__all__ = ["Amalgamation", "FeatureNorm", "HeadConfig", "MultiScaleConvHead", "PixelMLPEnsemble", "SegModel",
           "VariantSum", "finest_grid", "variant_mixer"]


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


def variant_mixer(specs: Sequence[FeatureSpec], config: HeadConfig) -> VariantSum | Amalgamation | None:
    """The module that mixes the feature variants before the head, as `config.variants` asks (None: concat).

    An option that cannot act on the features given is an error, never a silent concat: ``weighted`` or
    ``amalgamate`` with a single variant, variants whose layers differ, more assigners than V · layers.
    """
    mode = config.variants
    if mode == "concat":
        return None
    try:
        layout = variant_layout(specs, config.concat_after)
    except ValueError as e:
        raise ConfigError("variants", str(e)) from None
    if len(layout.names) < 2:
        raise ConfigError("variants", f"{mode} needs two or more feature variants (several feature stores, or one "
                          "store with NAME/LAYER variants); these features are one")
    if mode == "weighted":
        return VariantSum(specs, config.concat_after)
    most = len(layout.names) * len(layout.layers)
    if config.assigners > most:
        raise ConfigError("assigners", f"must be ≤ variants × layers = {len(layout.names)} × {len(layout.layers)} = "
                          f"{most}, got {config.assigners}")
    return Amalgamation(specs, config.assigners, config.assigner, config.concat_after,
                        weighting=config.amalgamation_weighting, hidden=config.assigner_hidden)


class SegModel(nn.Module):
    """Feature maps → [normalisation] → [variant amalgamation] → head; what `train_seg` trains and saves."""

    def __init__(self, specs: Sequence[FeatureSpec], num_classes: int, config: HeadConfig | None = None):
        super().__init__()
        config = (config or HeadConfig()).validate()
        self.config = config
        self.specs = list(specs)
        self.num_classes = num_classes
        self.norm = FeatureNorm([s.shape[0] for s in specs]) if config.normalize else None
        self.amalgamate = variant_mixer(specs, config)
        shapes = self.amalgamate.out_shapes if self.amalgamate is not None else [s.shape for s in specs]
        if config.kind == "mlp":
            self.head = PixelMLPEnsemble(shapes, num_classes, config.ensemble)
        else:
            self.head = MultiScaleConvHead(shapes, num_classes, config.hidden, config.dropout)

    def forward(self, features: Sequence[torch.Tensor], with_penalty: bool = False):
        """Member logits, each [B, K, h, w] at the finest feature grid; with `with_penalty`, ``(logits, terms)``:
        the amalgamation's Eq. 5 terms on this forward's weights (a dict of scalar tensors,
        `Amalgamation.eq5_terms`; None without an amalgamation), which the objective weights and adds to the loss
        (`downstream.seg.objective.SegObjective`)."""
        if self.norm is not None:
            features = self.norm(features)
        terms = None
        if self.amalgamate is not None and with_penalty:
            features, terms = self.amalgamate(features, with_terms=True)
        elif self.amalgamate is not None:
            features = self.amalgamate(features)
        logits = self.head(features)
        return (logits, terms) if with_penalty else logits

    @torch.no_grad()
    def predict(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Class ids [B, H, W] at `size`: logits upsampled (bilinear), argmax; majority vote over members."""
        return vote([z.argmax(1) for z in self.frame_logits(features, size)])

    @torch.no_grad()
    def frame_logits(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        """Each member's logits [B, K, H, W], upsampled (bilinear) to the frame `size` the images were seen at."""
        return [F.interpolate(z, size=size, mode="bilinear", align_corners=False) for z in self(features)]


def vote(predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-pixel majority of the members' class ids (ddpm-segmentation's ensemble); ties go to the smallest id."""
    if len(predictions) == 1:
        return predictions[0]
    return torch.stack(list(predictions)).mode(dim=0).values
