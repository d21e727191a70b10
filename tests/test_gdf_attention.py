"""The GDF attention feature `gdf-up-cross` (issue #12 item 2): on the SD-1.5 architecture, 2 × 77 = 154 token
channels at the 64×64 conv grid of 512² inputs; its values are softmax(QKᵀ·scale), averaged over heads and over
the layers of one resolution, recomputed here from the layers' own projections."""

import pytest
import torch
import torch.nn.functional as F

from difffeat import load_pipeline
from difffeat.errors import UserError
from difffeat.extraction.extract import FeatureExtractor
from difffeat.models.attention_feature import attention_groups, attention_modules, merge_attention
from difffeat.models.layers import list_layers, resolve_layers
from difffeat.zoo.presets import build_unet


class _Shell:
    """Just what list_layers reads from a pipeline: a UNet and a VAE config."""

    def __init__(self, unet, factor=8):
        self.unet = unet
        self.vae_scale_factor = factor


def test_sd15_gdf_up_cross_is_154_channels_at_the_conv_grid():
    with torch.device("meta"):
        shell = _Shell(build_unet("sd15-random"))
    groups = attention_groups(shell, ["gdf-up-cross"], 512, 512)
    assert groups == {f"gdf-up-cross.{s}x{s}": [f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2"
                                                for i in range(3)] for b, s in ((1, 16), (2, 32))}
    shapes = dict(list_layers(shell, 512, 512))
    conv_grid = max((shapes[n][1:] for n in resolve_layers(shell, ["gdf-legacy"], 512, 512)), key=lambda s: s[0] * s[1])
    assert conv_grid == (64, 64)
    tokens = 77  # SD-1.5's CLIP text length
    fake = {f"{m}:probs": torch.zeros(1, tokens, *shapes[m][1:], device="meta") for m in attention_modules(groups)}
    merged = merge_attention(fake, groups, conv_grid)
    assert sum(v.shape[1] for v in merged.values()) == 154
    assert all(v.shape[-2:] == (64, 64) for v in merged.values())


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return load_pipeline("mini-random")


def test_values_are_the_head_and_layer_mean_of_softmax_qk(pipe):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompt = "a large red circle in the center"
    groups = attention_groups(pipe, ["gdf-up-cross"])
    assert list(groups) == ["gdf-up-cross.8x8", "gdf-up-cross.16x16"]  # mini at 64²: up_blocks 1 and 2
    fe = FeatureExtractor(pipe, ["up_blocks.2"], noise=False, prompt=prompt, attention=attention_modules(groups))
    feats = fe.extract(images)
    merged = merge_attention(feats, groups, tuple(feats["up_blocks.2"].shape[-2:]))
    got = merged["gdf-up-cross.8x8:probs"]
    assert got.shape == (2, 77, 16, 16) and torch.allclose(got.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    # Reference: each layer's softmax(QKᵀ·scale) from its own projections, mean over heads, then over the layers.
    modules = dict(pipe.unet.named_modules())
    qk: dict[str, dict] = {}
    hooks = []
    for name in groups["gdf-up-cross.8x8"]:
        qk[name] = {}
        m = modules[name]
        hooks += [m.to_q.register_forward_hook(lambda mod, a, o, d=qk[name]: d.__setitem__("q", o)),
                  m.to_k.register_forward_hook(lambda mod, a, o, d=qk[name]: d.__setitem__("k", o))]
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([prompt] * 2, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        pipe.unet(z, torch.full((2,), 50), pipe.text_encoder(ids)[0])
    for h in hooks:
        h.remove()
    maps = []
    for name, d in qk.items():
        m = modules[name]
        q, k = (d[x].unflatten(-1, (m.heads, -1)).transpose(1, 2) for x in ("q", "k"))
        probs = (q @ k.transpose(-1, -2) * m.scale).softmax(-1).mean(1)  # [B, N, T]
        maps.append(probs.transpose(1, 2).reshape(2, 77, 8, 8))
    ref = F.interpolate(torch.stack(maps).mean(0), size=(16, 16), mode="nearest")
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_attention_presets_refuse_what_they_cannot_record(pipe):
    with pytest.raises(UserError, match="not a cross-attention module"):
        attention_groups(pipe, ["up_blocks.1.attentions.0.transformer_blocks.0.attn1"])
    with pytest.raises(UserError, match="resize mode"):
        merge_attention({}, {}, mode="bicubic")


def test_extractor_preset_and_fixed_attention_prompt(pipe):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    own, fixed = ["a red circle", "a blue star"], "a scene of shapes"
    fe = FeatureExtractor(pipe, ["up_blocks.2"], attention=["gdf-up-cross"], attention_prompt=fixed, seed=3)
    got = fe.extract(images, prompts=own)
    assert list(got) == ["up_blocks.2", "gdf-up-cross.8x8:probs", "gdf-up-cross.16x16:probs"]
    assert got["gdf-up-cross.8x8:probs"].shape == (2, 77, 16, 16)
    # the layers come from the images' own prompts, the attention maps from a pass with the fixed prompt
    plain = FeatureExtractor(pipe, ["up_blocks.2"], seed=3).extract(images, prompts=own)
    assert torch.allclose(got["up_blocks.2"], plain["up_blocks.2"], atol=1e-6)
    groups = attention_groups(pipe, ["gdf-up-cross"])
    maps = FeatureExtractor(pipe, ["up_blocks.2"], attention=attention_modules(groups), seed=3).extract(
        images, prompts=[fixed, fixed])
    expected = merge_attention(maps, groups, (16, 16))
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    mixed = FeatureExtractor(pipe, ["up_blocks.2"], attention=["gdf-up-cross"], seed=3).extract(images, prompts=own)
    assert not torch.allclose(mixed["gdf-up-cross.8x8:probs"], got["gdf-up-cross.8x8:probs"], atol=1e-4)


def test_concat_nearest_is_gdf_aggregate_output():
    from difffeat.extraction.extract import concat_features

    a, b = torch.rand(1, 2, 4, 4), torch.rand(1, 3, 8, 8)
    out = concat_features({"a": a, "b": b}, mode="nearest")
    assert torch.equal(out[:, :2], a.repeat_interleave(2, -1).repeat_interleave(2, -2)) and torch.equal(out[:, 2:], b)
    assert not torch.equal(concat_features({"a": a, "b": b}), out)  # bilinear stays the default
