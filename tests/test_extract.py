import pytest
import torch

from difffeat import load_pipeline
from difffeat.errors import UserError
from difffeat.extraction.extract import FeatureExtractor, concat_features, item_seed, seeded_normal


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return load_pipeline("mini-random")


@pytest.fixture(scope="module")
def images():
    return torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _hooked_forward(pipe, z, t, emb, layer):
    """The reference: a plain register_forward_hook and a full UNet forward."""
    store = {}
    module = dict(pipe.unet.named_modules())[layer]
    h = module.register_forward_hook(lambda m, a, o: store.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    pipe.unet(z, torch.full((len(z),), t), emb)
    h.remove()
    return store["x"]


@torch.no_grad()
def _clean_latents(pipe, x):
    return pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def _embed(pipe, prompt, n):
    ids = pipe.tokenizer([prompt] * n, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids).last_hidden_state


def test_clean_mode_equals_a_plain_forward_hook(pipe, images):
    layers = ["down_blocks.1.attentions.0", "up_blocks.1", "up_blocks.2.resnets.1"]
    got = FeatureExtractor(pipe, layers, timesteps=(50,), noise=False, prompt="a red circle").extract(images)
    z, emb = _clean_latents(pipe, images), _embed(pipe, "a red circle", len(images))
    for layer in layers:
        ref = _hooked_forward(pipe, z, 50, emb, layer)
        assert got[layer].dtype == torch.float32 and got[layer].device.type == "cpu"
        assert _rel(got[layer], ref) < 1e-5, layer


def test_noisy_ensemble_is_the_mean_of_independently_computed_draws(pipe, images):
    keys = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    got = FeatureExtractor(pipe, ["up_blocks.1"], timesteps=(300,), ensemble=3, seed=7).extract(images, keys=keys)
    z0, emb = _clean_latents(pipe, images), _embed(pipe, "", len(images))
    a = pipe.scheduler.alphas_cumprod[300]
    ref = 0
    for d in range(3):
        eps = torch.stack([seeded_normal(z0.shape[1:], item_seed(7, k, 300, d)) for k in keys])
        ref = ref + _hooked_forward(pipe, a.sqrt() * z0 + (1 - a).sqrt() * eps, 300, emb, "up_blocks.1") / 3
    assert _rel(got["up_blocks.1"], ref) < 1e-5
    one = FeatureExtractor(pipe, ["up_blocks.1"], timesteps=(300,), ensemble=1, seed=7).extract(images, keys=keys)
    assert _rel(one["up_blocks.1"], got["up_blocks.1"]) > 1e-3, "three draws are not one draw"


def test_early_exit_skips_the_rest_and_changes_nothing(pipe, images):
    calls = []
    h = pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    kwargs = dict(timesteps=(50, 500), ensemble=2, seed=3)
    fast = FeatureExtractor(pipe, ["up_blocks.0"], **kwargs).extract(images)
    assert not calls, "the forward stopped after up_blocks.0"
    full = FeatureExtractor(pipe, ["up_blocks.0"], early_exit=False, **kwargs).extract(images)
    h.remove()
    assert calls
    assert set(fast) == {"up_blocks.0@50", "up_blocks.0@500"}
    for k in fast:
        assert torch.equal(fast[k], full[k])


def test_features_do_not_depend_on_batch_size_or_order(pipe, images):
    keys = [f"img{i}" for i in range(5)]
    kwargs = dict(timesteps=(100, 400), ensemble=2, seed=11, posterior="sample")
    ref = FeatureExtractor(pipe, ["up_blocks.1", "mid_block"], batch_size=3, **kwargs).extract(images, keys=keys)
    perm = [3, 0, 4, 1, 2]
    other = FeatureExtractor(pipe, ["mid_block", "up_blocks.1"], batch_size=1, **kwargs).extract(
        images[perm], keys=[keys[i] for i in perm])
    for k in ref:
        assert _rel(other[k], ref[k][perm]) < 1e-5, k
    reseeded = FeatureExtractor(pipe, ["up_blocks.1"], batch_size=3, **{**kwargs, "seed": 12}).extract(
        images, keys=keys)
    assert _rel(reseeded["up_blocks.1@100"], ref["up_blocks.1@100"]) > 1e-3


def test_cross_attention_maps_and_unchanged_outputs(pipe, images):
    attn = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    later = "up_blocks.2.resnets.0"
    prompt = "a large red circle in the center"
    with_maps = FeatureExtractor(pipe, [later], noise=False, prompt=prompt, attention=[attn]).extract(images)
    without = FeatureExtractor(pipe, [later], noise=False, prompt=prompt).extract(images)
    assert _rel(with_maps[later], without[later]) < 1e-5, "recording probabilities changes no value"
    probs = with_maps[f"{attn}:probs"]
    assert probs.shape == (5, 77, 8, 8)
    assert torch.allclose(probs.sum(1), torch.ones(5, 8, 8), atol=1e-5)
    # Reference: softmax(QKᵀ·scale) from the layer's own projections, averaged over heads.
    module = dict(pipe.unet.named_modules())[attn]
    got = {}
    hooks = [module.to_q.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             module.to_k.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    _hooked_forward(pipe, _clean_latents(pipe, images), 50, _embed(pipe, prompt, 5), later)
    for h in hooks:
        h.remove()
    q = got["q"].unflatten(-1, (module.heads, -1)).transpose(1, 2)
    k = got["k"].unflatten(-1, (module.heads, -1)).transpose(1, 2)
    ref = (q @ k.transpose(-1, -2) * module.scale).softmax(-1).mean(1)  # [B, N, T]
    assert _rel(probs.flatten(2).transpose(1, 2), ref) < 1e-5


def test_capture_inputs(pipe, images):
    ins = FeatureExtractor(pipe, ["up_blocks.1.upsamplers.0"], noise=False, capture_inputs=True).extract(images)
    outs = FeatureExtractor(pipe, ["up_blocks.1.attentions.2"], noise=False).extract(images)
    assert torch.equal(ins["up_blocks.1.upsamplers.0"], outs["up_blocks.1.attentions.2"])


def test_pil_input_and_concat(pipe, images):
    from PIL import Image

    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images[:2]]
    big = [im.resize((128, 128), Image.NEAREST) for im in pil]
    from difffeat.data.images import resize_image, to_tensor

    fe = FeatureExtractor(pipe, ["down_blocks.1", "up_blocks.1"], noise=False)
    a, b = fe.extract(pil), fe.extract(big)  # PIL images are resized to the native 64² first
    assert a["up_blocks.1"].shape == (2, 64, 16, 16)
    assert _rel(a["up_blocks.1"], fe.extract(images[:2])["up_blocks.1"]) < 0.01  # only 8-bit rounding apart
    ref = fe.extract(to_tensor([resize_image(im, (64, 64)) for im in big]))
    assert torch.equal(b["up_blocks.1"], ref["up_blocks.1"])
    cat = concat_features(a)
    assert cat.shape == (2, 64 + 64, 16, 16)
    assert torch.equal(cat[:, 64:], a["up_blocks.1"])


def test_bad_arguments_fail_before_work(pipe):
    with pytest.raises(UserError, match="timesteps"):
        FeatureExtractor(pipe, ["up_blocks.1"], timesteps=(1000,))
    with pytest.raises(UserError, match="not an attention module"):
        FeatureExtractor(pipe, ["up_blocks.1"], attention=["up_blocks.1"])
    with pytest.raises(UserError, match="unknown layer"):
        FeatureExtractor(pipe, ["up_block.1"])
    with pytest.raises(UserError, match=r"\[B, 3, H, W\]"):
        FeatureExtractor(pipe, ["up_blocks.1"]).extract(torch.rand(2, 64, 64))


def _tiny_sdxl():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difffeat.zoo import mini

    torch.manual_seed(0)
    tok = mini.build_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               vocab_size=len(tok), max_position_embeddings=77, intermediate_size=64, num_attention_heads=2,
               num_hidden_layers=2)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **ids))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=32, **ids))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    vae = AutoencoderKL(**mini.VAE_CONFIG)
    sched = EulerDiscreteScheduler(**{k: v for k, v in mini.SCHEDULER_CONFIG.items() if k != "clip_sample"})
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)


def test_sdxl_architecture_extracts(images):
    pipe = _tiny_sdxl()
    fe = FeatureExtractor(pipe, ["gdf-legacy"], prompt="a red circle", ensemble=2)
    got = fe.extract(images[:2])
    assert list(got) == ["up_blocks.0.upsamplers.0", "up_blocks.1.resnets.1"]
    assert got["up_blocks.0.upsamplers.0"].shape == (2, 64, 16, 16)
    assert all(torch.isfinite(v).all() for v in got.values())
    other = fe.extract(images[:2], prompts=["a blue star", "a blue star"])
    assert _rel(other["up_blocks.1.resnets.1"], got["up_blocks.1.resnets.1"]) > 1e-6, "the prompt conditions SDXL"
