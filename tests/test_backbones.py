"""The backbone object (issue #25): one class per denoiser family owns what differs between families, so a new
family is one class. Here a tiny random `SanaTransformer2DModel` (a family difffeat does not ship) lists its layers
and gives features through the unchanged extraction code once its class is registered, and the family classes
difffeat ships are the ones `backbone_for` picks."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch

from difffeat import FeatureExtractor, list_layers, load_pipeline
from difffeat.errors import UserError
from difffeat.models.backbones import BACKBONES, TransformerBackbone, backbone_for, register_backbone

CAPTION = 16  # the tiny Sana's text width


class SanaBackbone(TransformerBackbone):
    """Sana (linear-attention DiT): cross-attention to a caption, DDPM-noised here (the test reuses mini's
    scheduler), timestep as an integer. Prompts come from a fixed random table (no Gemma tokenizer offline)."""

    name = "sana"
    model_class = "Sana"

    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], dict | None]:
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)))
            out.append(torch.randn(4, CAPTION, generator=g))
        return out, {"encoder_attention_mask": torch.ones(len(prompts), 4, dtype=torch.long)}

    def call(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
             sigma: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        return (), dict(hidden_states=z, encoder_hidden_states=embeds, timestep=t.to(z.device),
                        encoder_attention_mask=(added or {}).get("encoder_attention_mask"))

    def dummy_call(self, latent_hw: tuple[int, int], text_tokens: int = 77, model=None
                   ) -> tuple[tuple, dict[str, Any]]:
        cfg = (model if model is not None else self.model).config
        return (), dict(hidden_states=torch.zeros(1, cfg.in_channels, *latent_hw), timestep=torch.ones(1),
                        encoder_hidden_states=torch.zeros(1, text_tokens, cfg.caption_channels))


@pytest.fixture
def sana_pipe():
    from diffusers import SanaTransformer2DModel

    base = load_pipeline("mini-random")
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=base.vae.config.latent_channels, out_channels=base.vae.config.latent_channels,
        num_attention_heads=2, attention_head_dim=8, num_layers=3, num_cross_attention_heads=2,
        cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=CAPTION, sample_size=16, patch_size=1,
    ).eval()
    register_backbone(SanaBackbone)
    try:
        yield types.SimpleNamespace(vae=base.vae, scheduler=base.scheduler, transformer=transformer)
    finally:
        BACKBONES.remove(SanaBackbone)


def test_a_new_family_is_one_class(sana_pipe):
    assert isinstance(backbone_for(sana_pipe), SanaBackbone)
    layers = dict(list_layers(sana_pipe))
    assert {"transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"} <= set(layers)
    assert layers["transformer_blocks.1"] == (16, 16, 16)  # 2 heads × 8 dims on the 16×16 latent grid
    fe = FeatureExtractor(sana_pipe, ["dit-middle", "transformer_blocks.0"], timesteps=[200], batch_size=2)
    images = torch.rand(2, 3, 64, 64)
    out = fe.extract(images, keys=["a", "b"])
    assert set(out) == {"transformer_blocks.0", "transformer_blocks.1"}
    assert tuple(out["transformer_blocks.1"].shape) == (2, 16, 16, 16)
    assert torch.isfinite(out["transformer_blocks.1"]).all()
    again = fe.extract(images, keys=["a", "b"])  # seeded per key: the same features again
    assert np.array_equal(out["transformer_blocks.0"].numpy(), again["transformer_blocks.0"].numpy())


def test_the_shipped_families_are_picked_by_their_denoiser():
    assert backbone_for(load_pipeline("mini-random")).name == "unet"
    assert backbone_for(load_pipeline("mini-dit-random")).name == "sd3"


def test_an_unknown_denoiser_is_one_line():
    pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="Linear: a denoiser difffeat cannot hook yet"):
        backbone_for(pipe)
