"""Diffusion transformers (SD3, PixArt, FLUX) as functions of a pipeline: the names earlier versions gave them.

Each family is a backbone class now (`difffeat.models.backbones`: `SD3Backbone`, `PixArtBackbone`, `FluxBackbone`),
which owns what differs between families; these functions ask the pipeline's backbone (`backbone_for`) and keep
their signatures, so code and notebooks written against them run unchanged. New code asks the backbone itself.
"""

from __future__ import annotations

import copy

import torch

from difffeat.models.backbones import TransformerBackbone, backbone_for, denoiser
from difffeat.models.backbones.base import (  # noqa: F401 (importable here as before)
    backbone_class,
    ddim_step,
    is_flow_matching,
    shift_mu,
)
from difffeat.models.backbones.flux import (  # noqa: F401 (importable here as before)
    FLUX_GUIDANCE,
    flux_image_ids,
    pack_flux,
    unpack_flux,
)
from difffeat.models.backbones.transformer import max_sequence_length  # noqa: F401 (importable here as before)
from difffeat.models.layer_presets import BLOCK_LISTS, blocks  # noqa: F401 (importable here as before)
from difffeat.models.maps import as_map as as_grid  # noqa: F401 (importable here as before)
from difffeat.models.maps import image_tokens  # noqa: F401 (importable here as before)

__all__ = ["denoiser", "is_transformer", "family", "patch_size", "vae_factor", "native_latent_size",
           "check_image_size", "is_flow_matching", "sigma_of_t", "noise_latents", "max_sequence_length",
           "encode_prompts", "forward_kwargs", "prediction", "dummy_kwargs", "list_layers", "token_index", "blocks"]


class _ModelOnly:
    """A stand-in pipeline around a bare model, for the functions below that take a model."""

    def __init__(self, model):
        self.transformer = model


def _backbone_of_model(model) -> TransformerBackbone:
    return backbone_class(model, TransformerBackbone)(_ModelOnly(model))


def is_transformer(pipe) -> bool:
    return isinstance(backbone_for(pipe), TransformerBackbone)


def family(model) -> str:
    """"sd3", "pixart" or "flux" for the transformers difffeat knows; a UserError naming the class otherwise."""
    return backbone_class(model, TransformerBackbone).name


def patch_size(model) -> int:
    """Latent cells per token along a side (FLUX packs 2×2 latent cells into one token outside the model)."""
    return _backbone_of_model(model).patch_size()


def vae_factor(pipe) -> int:
    return backbone_for(pipe).vae_factor()


def native_latent_size(pipe) -> tuple[int, int]:
    return backbone_for(pipe).native_latent_size()


def check_image_size(pipe, height: int, width: int) -> None:
    """A UserError naming the valid sizes when height × width does not tile into whole patches."""
    backbone_for(pipe).check_image_size(height, width)


def sigma_of_t(pipe, t: int, latent_hw: tuple[int, int]) -> float:
    """The flow-matching noise level σ ∈ (0, 1] of integer timestep t ∈ [0, 1000) (`Backbone.sigma_of_t`)."""
    return backbone_for(pipe).sigma_of_t(t, latent_hw)


def noise_latents(pipe, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """z0 noised to integer timestep t: flow matching's interpolation, or DDPM's for other schedulers."""
    return backbone_for(pipe).noise_latents(z0, noise, t)


def encode_prompts(pipe, prompts: list[str]) -> tuple[list[torch.Tensor], dict]:
    """Per prompt a [T, D] embedding, and the per-row extra conditions the transformer takes."""
    return backbone_for(pipe).encode_prompts(list(prompts))


def forward_kwargs(pipe, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
                   guidance: float = FLUX_GUIDANCE, sigma: torch.Tensor | None = None) -> dict:
    """The keyword arguments of one transformer call on latents z [B, C, h, w] at integer timesteps t [B]."""
    backbone = backbone_for(pipe)
    if getattr(backbone, "guidance", guidance) != guidance:  # FLUX-dev's distilled guidance, another value
        backbone = copy.copy(backbone)
        backbone.guidance = guidance
    return backbone.call(z, t, embeds, added, sigma=sigma)[1]


def prediction(pipe, sample: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    return backbone_for(pipe).prediction(sample, latent_hw)


def dummy_kwargs(model, latent_hw: tuple[int, int], text_tokens: int) -> dict:
    """Zero inputs of the right shapes for one call (the shape trace on the meta device)."""
    return _backbone_of_model(model).dummy_call(latent_hw, text_tokens)[1]


def list_layers(pipe, height: int | None = None, width: int | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """`[(name, (C, h, w)), …]` of a transformer pipeline's modules that produce the image tokens, in forward
    order; a UserError when height × width does not fit the patches."""
    return backbone_for(pipe).list_layers(height, width)


def token_index(pipe, height: int | None = None, width: int | None = None) -> dict[str, int | None]:
    """Per listed module, which element of its output tuple holds the image tokens (None: the output itself)."""
    return backbone_for(pipe).token_index(height, width)


def probs_processor_for(model, latent_hw: tuple[int, int]):
    """`difffeat.models.dit_attention.probs_processor` for transformer `model` on latents of size `latent_hw` (its image
    token count bound): the backbone's `attention_recorder`."""
    return _backbone_of_model(model).attention_recorder(latent_hw)
