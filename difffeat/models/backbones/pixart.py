"""PixArt-α / Σ: cross-attention blocks, T5 prompts with an attention mask, DDPM noising, resolution and aspect-ratio
conditions (α), a prediction of ε (and the variance, whose half is dropped)."""

from __future__ import annotations

from typing import Any

import torch

from difffeat.models.backbones.base import register_backbone
from difffeat.models.backbones.transformer import TransformerBackbone


@register_backbone
class PixArtBackbone(TransformerBackbone):
    name = "pixart"
    model_class = "PixArt"
    injects_lora = True

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], dict | None]:
        extra = {} if self.max_sequence_length() is None else {"max_sequence_length": self.max_sequence_length()}
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                     device=self.model.device, clean_caption=False, **extra)
        return list(embeds), {"encoder_attention_mask": mask}

    def text_attention_modules(self) -> tuple[list[str], str] | None:
        return [n for n, m in self.model.named_modules() if getattr(m, "is_cross_attention", False)], \
            "cross-attention"

    def call(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
             sigma: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        added = added or {}
        latent_hw = tuple(z.shape[-2:])
        cond = {"resolution": None, "aspect_ratio": None}
        if self.model.use_additional_conditions:
            h, w = latent_hw[0] * self.vae_factor(), latent_hw[1] * self.vae_factor()
            cond = {"resolution": torch.tensor([[h, w]] * len(z), dtype=z.dtype, device=z.device),
                    "aspect_ratio": torch.tensor([[h / w]] * len(z), dtype=z.dtype, device=z.device)}
        kw = dict(hidden_states=z, encoder_hidden_states=embeds, timestep=t.to(z.device), added_cond_kwargs=cond)
        if "encoder_attention_mask" in added:
            kw["encoder_attention_mask"] = added["encoder_attention_mask"]
        return (), kw

    def prediction(self, sample: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """ε: the first half of the channels when the model also predicts the variance, as PixArt's pipeline reads
        it."""
        if sample.shape[1] == 2 * self.pipe.vae.config.latent_channels:
            return sample.chunk(2, dim=1)[0]
        return sample

    def dummy_call(self, latent_hw: tuple[int, int], text_tokens: int = 77, model=None
                   ) -> tuple[tuple, dict[str, Any]]:
        model = model if model is not None else self.model
        cfg, (h, w) = model.config, latent_hw
        cond = {"resolution": torch.zeros(1, 2), "aspect_ratio": torch.zeros(1, 1)} if model.use_additional_conditions \
            else {"resolution": None, "aspect_ratio": None}
        return (), dict(hidden_states=torch.zeros(1, cfg.in_channels, h, w), timestep=torch.ones(1, dtype=torch.long),
                        encoder_hidden_states=torch.zeros(1, text_tokens, cfg.caption_channels),
                        added_cond_kwargs=cond)
