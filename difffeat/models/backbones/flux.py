"""FLUX.1: 2×2 latent patches packed into tokens outside the model, double- and single-stream blocks, CLIP pooled +
T5 prompts, flow matching with a resolution-dependent shift, a distilled guidance embedding (dev)."""

from __future__ import annotations

from typing import Any

import torch

from difffeat.models.backbones.base import register_backbone
from difffeat.models.backbones.transformer import TransformerBackbone

# The guidance FLUX-dev is conditioned with (its distilled guidance embedding; FluxPipeline's default).
FLUX_GUIDANCE = 3.5


def pack_flux(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents → FLUX's [B, (H/2)(W/2), 4C] tokens (2×2 latent patches, row-major)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """FLUX's [B, (H/2)(W/2), 4C] tokens → [B, C, H, W] latents (the inverse of `pack_flux`)."""
    b, n, c4 = tokens.shape
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    return tokens.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h * 2, w * 2)


def flux_image_ids(latent_hw: tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


@register_backbone
class FluxBackbone(TransformerBackbone):
    name = "flux"
    model_class = "Flux"
    controlnet_class = "FluxControlNetModel"
    converts_kohya_lora = True
    #: the guidance value a guidance-distilled model (FLUX-dev) is conditioned with
    guidance: float = FLUX_GUIDANCE

    def patch_size(self) -> int:
        return 2  # FLUX packs 2×2 latent cells into one token outside the model

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], dict | None]:
        extra = {} if self.max_sequence_length() is None else {"max_sequence_length": self.max_sequence_length()}
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=self.model.device, **extra)
        return list(embeds), {"pooled_projections": pooled}

    def text_attention_modules(self) -> tuple[list[str], str] | None:
        """Every attention module: the double-stream blocks' joint ones and the single-stream ones."""
        return [n for n, m in self.model.named_modules() if hasattr(m, "processor")], "joint attention"

    def call(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
             sigma: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        latent_hw = tuple(z.shape[-2:])
        sigma = self.sigmas(t, latent_hw, sigma, z.device)
        kw = dict(hidden_states=pack_flux(z), encoder_hidden_states=embeds,
                  pooled_projections=(added or {})["pooled_projections"], timestep=sigma.to(z.dtype),
                  img_ids=flux_image_ids(latent_hw, z.device, z.dtype),
                  txt_ids=torch.zeros(embeds.shape[1], 3, device=z.device, dtype=z.dtype))
        if self.model.config.guidance_embeds:
            kw["guidance"] = torch.full((len(z),), self.guidance, device=z.device, dtype=z.dtype)
        return (), kw

    def prediction(self, sample: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        return unpack_flux(sample, latent_hw)

    def dummy_call(self, latent_hw: tuple[int, int], text_tokens: int = 77, model=None
                   ) -> tuple[tuple, dict[str, Any]]:
        cfg, (h, w) = (model if model is not None else self.model).config, latent_hw
        kw = dict(hidden_states=torch.zeros(1, (h // 2) * (w // 2), cfg.in_channels), timestep=torch.ones(1),
                  encoder_hidden_states=torch.zeros(1, text_tokens, cfg.joint_attention_dim),
                  pooled_projections=torch.zeros(1, cfg.pooled_projection_dim), img_ids=flux_image_ids(latent_hw),
                  txt_ids=torch.zeros(text_tokens, 3))
        if cfg.guidance_embeds:
            kw["guidance"] = torch.ones(1)
        return (), kw
