"""One `Backbone` class per denoiser family, chosen once per pipeline by `backbone_for(pipe)` (see `base`)."""

from difffeat.models.backbones import flux, pixart, sd3, unet  # noqa: F401 (registers the families)
from difffeat.models.backbones.base import BACKBONES, Backbone, backbone_for, denoiser, register_backbone
from difffeat.models.backbones.transformer import TransformerBackbone

__all__ = ["BACKBONES", "Backbone", "TransformerBackbone", "backbone_for", "denoiser", "register_backbone"]
