"""Stable Diffusion 3 (MMDiT; the built-in mini-dit): joint attention, CLIP (+ T5) prompts with pooled projections,
flow matching with a static shift, timestep given as 1000·σ."""

from __future__ import annotations

from typing import Any

import torch

from difffeat.errors import UserError
from difffeat.models.backbones.base import register_backbone
from difffeat.models.backbones.transformer import TransformerBackbone


@register_backbone
class SD3Backbone(TransformerBackbone):
    name = "sd3"
    model_class = "SD3"
    controlnet_class = "SD3ControlNetModel"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], dict | None]:
        pipe, device = self.pipe, self.model.device
        extra = {} if self.max_sequence_length() is None else {"max_sequence_length": self.max_sequence_length()}
        window = pipe.tokenizer.model_max_length - 2
        if pipe.text_encoder_3 is None:  # CLIP alone would cut a longer prompt short without a word
            for p in prompts:
                if len(pipe.tokenizer(p, truncation=False, verbose=False).input_ids) - 2 > window:
                    raise UserError(f"prompt longer than the {window} tokens this model's text encoder takes: "
                                    f"{p[:60]!r}…")
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                  do_classifier_free_guidance=False, **extra)
        return list(embeds), {"pooled_projections": pooled}

    def call(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
             sigma: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        sigma = self.sigmas(t, tuple(z.shape[-2:]), sigma, z.device)
        return (), dict(hidden_states=z, timestep=(sigma * 1000).to(z.dtype), encoder_hidden_states=embeds,
                        pooled_projections=(added or {})["pooled_projections"])

    def dummy_call(self, latent_hw: tuple[int, int], text_tokens: int = 77, model=None
                   ) -> tuple[tuple, dict[str, Any]]:
        cfg, (h, w) = (model if model is not None else self.model).config, latent_hw
        return (), dict(hidden_states=torch.zeros(1, cfg.in_channels, h, w), timestep=torch.ones(1),
                        encoder_hidden_states=torch.zeros(1, text_tokens, cfg.joint_attention_dim),
                        pooled_projections=torch.zeros(1, cfg.pooled_projection_dim))
