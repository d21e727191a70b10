"""Generation techniques, img2img and GATE on a diffusion transformer: the built-in mini-dit (SD3 architecture).
Each technique is checked against a direct computation on the stock diffusers modules (plain forward hooks), as
test_techniques.py does for UNets; the SD3 ControlNet is a tiny random one built here."""

import json

import numpy as np
import pytest
import torch

import difffeat
from difffeat.errors import UserError
from difffeat.extraction.extract import encode_latents, item_seed, seeded_normal
from difffeat.models import dit
from difffeat.zoo import mmdit
from pipelines import TechniqueStack, img2img

LAYER = "transformer_blocks.2"  # mini-dit's middle block (of 4)


@pytest.fixture(scope="module")
def pipe():
    return difffeat.load_pipeline("mini-dit")


@pytest.fixture(scope="module")
def images():
    from difffeat.data.shapes_lt import iter_scenes

    scenes = list(iter_scenes("test", 3, seed=5))
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return x, [s.fine_caption for s in scenes]


def random_sd3_controlnet(seed: int, **config):
    """A 2-block SD3ControlNetModel of mini-dit's width whose zero-initialised layers are made non-zero."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    base = {k: v for k, v in mmdit.TRANSFORMER_CONFIG.items() if k != "out_channels"}
    net = SD3ControlNetModel(**{**base, "num_layers": 2, **config})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "controlnet_blocks" in name or "pos_embed_input" in name:
                p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3-controlnet") / "cn"
    random_sd3_controlnet(1).save_pretrained(path)
    return str(path)


def features(pipe, x, prompts, techniques=(), layers=(LAYER,), t=500, **kw):
    return difffeat.FeatureExtractor(pipe, list(layers), timesteps=(t,), techniques=list(techniques), **kw).extract(
        x, prompts=prompts, keys=["a", "b", "c"][: len(x)])


def hooked_block(pipe, name: str, **kwargs) -> torch.Tensor:
    """The image tokens of a joint block, seen by a plain forward hook, on the 8×8 patch grid."""
    out = {}
    module = dict(pipe.transformer.named_modules())[name]
    handle = module.register_forward_hook(lambda m, a, o: out.update(tokens=o[1]))  # (text, image)
    try:
        with torch.no_grad():
            pipe.transformer(**kwargs)
    finally:
        handle.remove()
    tokens = out["tokens"]
    return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[2], 8, 8)


def noised(pipe, x, keys, t):
    """(z0, seeded noise, z_t) as the extractor draws them: flow matching's (1 − σ)·z0 + σ·ε."""
    z0 = encode_latents(pipe, x, keys)
    eps = torch.stack([seeded_normal(z0.shape[1:], item_seed(0, k, t, 0)) for k in keys])
    sigma = dit.sigma_of_t(pipe, t, tuple(z0.shape[-2:]))
    return z0, eps, (1 - sigma) * z0 + sigma * eps


# ------------------------------------------------------------------------------------------ prompts and CFG
def test_prompt_techniques_change_features_and_the_empty_template_is_the_empty_prompt(pipe, images):
    x, caps = images
    fields = [{"caption": c} for c in caps]
    run = lambda techniques, prompts: difffeat.FeatureExtractor(pipe, [LAYER], timesteps=(500,),
                                                                techniques=techniques).extract(
        x, prompts=prompts, fields=fields)[LAYER]
    plain = run([], [""] * 3)
    captioned = run(["prompt:caption"], [""] * 3)
    assert (captioned - plain).abs().mean() > 1e-3  # the caption conditions the transformer
    torch.testing.assert_close(captioned, run([], caps), rtol=0, atol=0)  # the same as giving the captions
    torch.testing.assert_close(run(["prompt:empty"], caps), plain, rtol=0, atol=0)
    torch.testing.assert_close(run(["prompt:{prompt}"], caps), run([], caps), rtol=0, atol=0)
    stack = TechniqueStack(pipe, ["prompt:caption", "prompt:fine"])  # chains as on a UNet
    assert stack.prompt("x", fields[0]) == caps[0] + ", high quality, best quality, highly realistic, masterpiece"


def test_cfg_combines_branches(pipe, images):
    x, caps = images
    run = lambda techniques, prompts: features(pipe, x, prompts, techniques)[LAYER]
    cond, uncond = run([], caps), run([], [""] * 3)
    assert (cond - uncond).abs().mean() > 1e-3
    torch.testing.assert_close(run(["cfg:1"], caps), cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(["cfg:0"], caps), uncond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(["cfg:3"], caps), uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_denoise_from_runs_euler_steps_on_the_velocity(pipe, images):
    x, caps = images
    keys = ["a", "b", "c"]
    got = features(pipe, x, caps, ["denoise-from:700,steps=2"], t=300)[LAYER]
    z0, eps, _ = noised(pipe, x, keys, 300)
    hw = tuple(z0.shape[-2:])
    sigma = lambda s: dit.sigma_of_t(pipe, s, hw)
    embeds, pooled = mmdit.encode_text(pipe, caps)
    z = (1 - sigma(700)) * z0 + sigma(700) * eps  # the same draw, noised at the start
    for s, s_next in ((700, 500), (500, 300)):
        with torch.no_grad():
            v = pipe.transformer(hidden_states=z, timestep=torch.full((3,), sigma(s) * 1000),
                                 encoder_hidden_states=embeds, pooled_projections=pooled).sample
        z = z + (sigma(s_next) - sigma(s)) * v
    want = hooked_block(pipe, LAYER, hidden_states=z, timestep=torch.full((3,), sigma(300) * 1000),
                        encoder_hidden_states=embeds, pooled_projections=pooled)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------- ControlNet
def test_sd3_controlnet_adds_its_block_residuals(pipe, images, controlnet_dir):
    from pipelines.canny import canny_tensor

    x, caps = images
    keys = ["a", "b", "c"]
    spec = f"controlnet:{controlnet_dir},scale=0.8"
    ex = difffeat.FeatureExtractor(pipe, ["transformer_blocks.0", LAYER], timesteps=(500,), techniques=[spec])
    got = ex.extract(x, prompts=caps, keys=keys)
    again = ex.extract(x, prompts=caps, keys=keys)
    assert all(torch.equal(got[k], again[k]) for k in got)  # deterministic (the control latents: posterior mean)
    _, _, zt = noised(pipe, x, keys, 500)
    embeds, pooled = mmdit.encode_text(pipe, caps)
    timestep = torch.full((3,), dit.sigma_of_t(pipe, 500, (16, 16)) * 1000)
    vae = pipe.vae
    with torch.no_grad():  # diffusers' SD3 ControlNet pipeline: the control image as (unshifted) VAE latents
        control = vae.encode(canny_tensor(x) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        [(technique, net)] = ex.stack.residuals
        blocks = net(hidden_states=zt, controlnet_cond=control, conditioning_scale=0.8, encoder_hidden_states=embeds,
                     pooled_projections=torch.zeros_like(pooled), timestep=timestep, return_dict=False)[0]
    want = hooked_block(pipe, LAYER, hidden_states=zt, timestep=timestep, encoder_hidden_states=embeds,
                        pooled_projections=pooled, block_controlnet_hidden_states=blocks)
    torch.testing.assert_close(got[LAYER], want, rtol=1e-4, atol=1e-4)
    plain = features(pipe, x, caps, layers=("transformer_blocks.0", LAYER))
    assert (plain[LAYER] - got[LAYER]).abs().mean() > 1e-3  # the residuals did something
    # diffusers adds block N's residual after block N: its own output is untouched, the next blocks see it.
    torch.testing.assert_close(plain["transformer_blocks.0"], got["transformer_blocks.0"], rtol=1e-5, atol=1e-6)


def test_sd3_controlnet_without_its_own_patch_embedding_takes_the_transformers(pipe, images, tmp_path):
    x, caps = images
    random_sd3_controlnet(3, use_pos_embed=False).save_pretrained(tmp_path / "shared")  # SD3.5-large style
    got = features(pipe, x, caps, [f"controlnet:{tmp_path / 'shared'}"])[LAYER]
    [(_, net)] = TechniqueStack(pipe, [f"controlnet:{tmp_path / 'shared'}"]).residuals
    torch.testing.assert_close(net.pos_embed.proj.weight, pipe.transformer.pos_embed.proj.weight, rtol=0, atol=0)
    assert (got - features(pipe, x, caps)[LAYER]).abs().mean() > 1e-3


def test_controlnet_of_the_other_backbone_is_refused_naming_both(pipe, mini_pipe, controlnet_dir, tmp_path):
    from pipelines.techniques.controlnet import mini_canny_dir

    with pytest.raises(UserError, match=r"is a ControlNetModel, made for a UNet2DConditionModel, but this model's "
                                        r"backbone is a SD3Transformer2DModel"):
        TechniqueStack(pipe, [f"controlnet:{mini_canny_dir()}"])
    with pytest.raises(UserError, match=r"is a SD3ControlNetModel, made for a SD3Transformer2DModel, but this "
                                        r"model's backbone is a UNet2DConditionModel"):
        TechniqueStack(mini_pipe, [f"controlnet:{controlnet_dir}"])
    with pytest.raises(UserError, match="no built-in canny ControlNet for a SD3Transformer2DModel"):
        TechniqueStack(pipe, ["controlnet:canny"])
    random_sd3_controlnet(2, num_attention_heads=2).save_pretrained(tmp_path / "narrow")
    with pytest.raises(UserError, match=r"does not fit this model's transformer: width 64 vs the transformer's 128"):
        TechniqueStack(pipe, [f"controlnet:{tmp_path / 'narrow'}"])
    with pytest.raises(UserError, match="LoRA file or folder not found"):  # LoRA itself runs: test_dit_lora.py
        TechniqueStack(pipe, ["lora:some/file.safetensors"])


# --------------------------------------------------------------------------------------------------- img2img
def test_img2img_is_diffusers_flow_matching_img2img(pipe, images):
    """img2img on mini-dit equals a hand-written loop on diffusers' own flow-matching scheduler and transformer
    (StableDiffusion3Img2ImgPipeline's semantics), with our per-key noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x, caps = images
    got = img2img(pipe, x, prompts=caps, keys=["a", "b", "c"], strength=0.5, steps=10, seed=3)
    assert got.shape == x.shape and 0 <= got.min() and got.max() <= 1
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    sched.set_begin_index(5)
    z0 = encode_latents(pipe, x)
    noise = torch.stack([seeded_normal(z0.shape[1:], item_seed(3, k, "img2img")) for k in "abc"])
    embeds, pooled = mmdit.encode_text(pipe, caps)
    z = sched.scale_noise(z0, sched.timesteps[5:6].repeat(3), noise)
    with torch.no_grad():
        for t in sched.timesteps[5:]:
            v = pipe.transformer(hidden_states=z, timestep=t.expand(3), encoder_hidden_states=embeds,
                                 pooled_projections=pooled).sample
            z = sched.step(v, t, z).prev_sample
        want = ((pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_img2img_at_low_strength_reproduces_the_input(pipe, images, controlnet_dir):
    x, caps = images
    with torch.no_grad():  # the best any reconstruction can do: the VAE's own round trip
        vae_only = ((pipe.vae.decode(encode_latents(pipe, x) / pipe.vae.config.scaling_factor).sample + 1) / 2)
    vae_only = vae_only.clamp(0, 1)
    low = img2img(pipe, x, ["cfg:2", f"controlnet:{controlnet_dir}"], prompts=caps, strength=0.1, steps=10)
    high = img2img(pipe, x, ["cfg:2", f"controlnet:{controlnet_dir}"], prompts=caps, strength=0.7, steps=10)
    assert low.shape == high.shape == x.shape
    assert (low - vae_only).abs().mean() < 2e-3
    assert (low - x).abs().mean() < (vae_only - x).abs().mean() + 2e-3 < (high - x).abs().mean()
    with pytest.raises(UserError, match="run no denoising step"):
        img2img(pipe, x, prompts=caps, strength=0.05, steps=10)


# ------------------------------------------------------------------------------------------------------ GATE
def test_gate_cli_ranks_candidates_on_mini_dit(pipe, shapes_dir, controlnet_dir, tmp_path):
    from difffeat.cli import main

    cands = tmp_path / "cands.yaml"
    cands.write_text(f"cfg: [prompt:caption, 'cfg:2']\ncn: ['controlnet:{controlnet_dir}']\n")
    out = tmp_path / "gate"
    rc = main(["--quiet", "gate", str(shapes_dir / "test"), "--candidates", str(cands), "--model", "mini-dit",
               "--layer", "dit-middle", "--n", "2", "--steps", "4", "--boot", "100", "--out", str(out)])
    assert rc == 0
    ranking = json.loads((out / "ranking.json").read_text())["ranking"]
    assert {r["candidate"] for r in ranking} == {"reference", "cfg", "cn"}
    assert all(np.isfinite(r["psnr"]) for r in ranking)
