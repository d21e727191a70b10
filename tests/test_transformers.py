"""Transformer backbones (SD3, PixArt, FLUX): layers as image-token maps, flow-matching noise, DiTF's options,
the real-size presets and the built-in mini-dit. Tiny random configs are built here; values are checked
against plain forward hooks and formulas computed independently."""

import json

import pytest
import torch
import torch.nn.functional as F

import difffeat
from difffeat.errors import UserError
from difffeat.models import dit, ditf
from difffeat.models.layers import list_layers, resolve_layers
from difffeat.zoo import dit_presets, mmdit


@pytest.fixture(scope="module")
def mini_parts():
    return mmdit.mini_parts()


def tiny_sd3(mini_parts, layers=3, seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=256, caption_projection_dim=16, pooled_projection_dim=256,
        pos_embed_max_size=16)
    vae, text_encoder, tokenizer = mini_parts
    return mmdit.assemble_pipeline(vae, text_encoder, tokenizer, transformer, mmdit.build_scheduler())


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    return T5EncoderModel(T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   is_encoder_decoder=False)).eval()  # built, not loaded: dropout off by hand


def tiny_flux(mini_parts):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from difffeat.zoo import mini

    vae, _, tokenizer = mini_parts
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=CLIPTextModel.from_pretrained(mini.weights_dir() / "text_encoder"),
                        tokenizer=tokenizer, text_encoder_2=tiny_t5(), tokenizer_2=tokenizer)
    vars(pipe)["difffeat_max_sequence_length"] = 16  # the stand-in T5 slot: 16 tokens keep the test quick
    return pipe


def tiny_pixart(mini_parts):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    vae, _, tokenizer = mini_parts
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, sample_size=16, patch_size=2,
                                           caption_channels=32, norm_num_groups=1)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=tiny_t5(), vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    vars(pipe)["difffeat_max_sequence_length"] = 16
    return pipe


def images(n=3, h=64, w=64, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def plain_hook_tokens(model, module_name, index, **kwargs):
    """What a plain `register_forward_hook` sees: the `index` element of the module's output."""
    got = {}
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, a, out: got.update(out=out))
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    out = got["out"]
    return out[index] if index is not None else out


# ------------------------------------------------------------------------------------------------- SD3
def test_sd3_blocks_are_image_token_maps_any_aspect_ratio(mini_parts):
    pipe = tiny_sd3(mini_parts)
    shapes = dict(list_layers(pipe, 64, 96))  # latent 16×24 → 8×12 patches
    assert shapes["transformer_blocks.0"] == (16, 8, 12)
    assert shapes["pos_embed"] == (16, 8, 12)
    assert "context_embedder" not in shapes  # text stream only: not a map
    # A hook on a joint block sees (text tokens, image tokens); the listing knows the image tokens are second.
    assert dit.token_index(pipe, 64, 96)["transformer_blocks.0"] == 1
    # The last block (context_pre_only) returns (None, image tokens) and is listed too.
    assert shapes["transformer_blocks.2"] == (16, 8, 12)


def test_sd3_clean_features_equal_a_plain_hook(mini_parts):
    pipe = tiny_sd3(mini_parts)
    x = images(2, 64, 96)
    fe = difffeat.FeatureExtractor(pipe, ["transformer_blocks.1", "transformer_blocks.2"], timesteps=(400,),
                                   noise=False, resolution=(64, 96))
    feats = fe.extract(x, prompts=["a red circle", "a small blue square at the top"])
    z0 = fe.encode_latents(x, ["0", "1"])
    emb, pooled = mmdit.encode_text(pipe, ["a red circle", "a small blue square at the top"])
    sigma = dit.sigma_of_t(pipe, 400, (16, 24))
    kwargs = dict(hidden_states=z0, timestep=torch.full((2,), sigma * 1000), encoder_hidden_states=emb,
                  pooled_projections=pooled)
    for name in ("transformer_blocks.1", "transformer_blocks.2"):
        tokens = plain_hook_tokens(pipe.transformer, name, 1, **kwargs)  # [B, 96, C] image tokens
        expected = tokens.transpose(1, 2).reshape(2, 16, 8, 12)  # row-major patch grid
        torch.testing.assert_close(feats[name], expected, rtol=1e-5, atol=1e-5)


def test_early_exit_stops_after_the_deepest_block(mini_parts):
    pipe = tiny_sd3(mini_parts)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, b in enumerate(pipe.transformer.transformer_blocks)]
    difffeat.FeatureExtractor(pipe, ["transformer_blocks.0"], timesteps=(100,)).extract(images(1))
    for h in handles:
        h.remove()
    assert ran == [0]


def test_t_maps_to_the_schedulers_own_sigma_table(mini_parts):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_sd3(mini_parts)
    for shift in (1.0, 3.0):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        table = pipe.scheduler.sigmas  # training table, descending from σ = 1 (its timesteps are 1000·σ)
        for t in (0, 1, 250, 500, 999):
            assert dit.sigma_of_t(pipe, t, (16, 16)) == pytest.approx(float(table[999 - t]), rel=1e-5)
    assert dit.sigma_of_t(pipe, 999, (16, 16)) == pytest.approx(1.0)


def test_dynamic_shift_matches_the_scheduler(mini_parts):
    import numpy as np

    pipe = tiny_flux(mini_parts)
    sched, hw = pipe.scheduler, (16, 24)
    tokens = (hw[0] // 2) * (hw[1] // 2)
    c = sched.config
    mu = c.base_shift + (c.max_shift - c.base_shift) * (tokens - c.base_image_seq_len) / (
        c.max_image_seq_len - c.base_image_seq_len)
    s = np.array([(t + 1) / 1000 for t in (0, 300, 999)])
    sched.set_timesteps(sigmas=s[::-1].copy(), mu=mu)
    assert [dit.sigma_of_t(pipe, t, hw) for t in (999, 300, 0)] == pytest.approx(sched.sigmas[:3].tolist(), rel=1e-5)


def test_noised_latent_is_flow_matchings_interpolation(mini_parts):
    pipe = tiny_sd3(mini_parts)
    z0, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    sigma = dit.sigma_of_t(pipe, 600, (16, 16))
    torch.testing.assert_close(dit.noise_latents(pipe, z0, eps, 600), (1 - sigma) * z0 + sigma * eps)


def test_features_are_order_and_batch_invariant_with_ensembles(mini_parts):
    pipe = tiny_sd3(mini_parts)
    x, prompts, keys = images(3), ["a red circle", "", "a green star"], ["a", "b", "c"]
    layers = ["transformer_blocks.1", "transformer_blocks.1:remod"]
    full = difffeat.FeatureExtractor(pipe, layers, timesteps=(200, 700), ensemble=2, batch_size=8).extract(
        x, prompts=prompts, keys=keys)
    one = difffeat.FeatureExtractor(pipe, layers, timesteps=(200, 700), ensemble=2, batch_size=1).extract(
        x[[2, 0]], prompts=[prompts[2], prompts[0]], keys=["c", "a"])
    for k in full:
        torch.testing.assert_close(one[k][0], full[k][2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one[k][1], full[k][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full["transformer_blocks.1@200"], full["transformer_blocks.1@700"])


# ----------------------------------------------------------------------------------------------- DiTF
def test_remod_is_the_blocks_adaln_applied_to_its_output(mini_parts):
    pipe = tiny_sd3(mini_parts)
    x = images(2)
    fe = difffeat.FeatureExtractor(pipe, ["transformer_blocks.1", "transformer_blocks.1:remod"], timesteps=(500,),
                                   noise=False)
    feats = fe.extract(x, prompts=["a red circle", "a cross"])
    # Independently: the block's shift/scale from the conditioning embedding, LayerNorm without affine.
    _, pooled = mmdit.encode_text(pipe, ["a red circle", "a cross"])
    sigma = dit.sigma_of_t(pipe, 500, (16, 16))
    with torch.no_grad():
        temb = pipe.transformer.time_text_embed(torch.full((2,), sigma * 1000), pooled)
        shift, scale = pipe.transformer.transformer_blocks[1].norm1.linear(F.silu(temb)).chunk(6, dim=1)[:2]
    raw = feats["transformer_blocks.1"].flatten(2).transpose(1, 2)
    expected = F.layer_norm(raw, raw.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(feats["transformer_blocks.1:remod"], expected.transpose(1, 2).reshape(2, 16, 8, 8),
                               rtol=1e-4, atol=1e-4)


def test_massive_activation_channels_are_found_and_suppressed(mini_parts):
    pipe = tiny_sd3(mini_parts)
    planted = [3, 11]
    block = pipe.transformer.transformer_blocks[1]

    def plant(module, args, output):  # a few channels orders of magnitude above the rest, as in real DiTs
        text, image = output
        image = image.clone()
        image[:, :, planted] += 5000.0
        return text, image

    handle = block.register_forward_hook(plant)
    try:
        layers = ["transformer_blocks.1", "transformer_blocks.1:massive=zero", "transformer_blocks.1:massive=clip"]
        feats = difffeat.FeatureExtractor(pipe, layers, timesteps=(300,), noise=False).extract(images(2))
    finally:
        handle.remove()
    raw, zero, clip = (feats[n] for n in layers)
    tokens = raw.flatten(2).transpose(1, 2)
    assert ditf.massive_channels(tokens).nonzero()[:, 1].unique().tolist() == planted
    others = [c for c in range(raw.shape[1]) if c not in planted]
    assert (zero[:, planted] == 0).all()
    torch.testing.assert_close(zero[:, others], raw[:, others])
    torch.testing.assert_close(clip[:, others], raw[:, others])
    bound = raw[:, others].abs().amax(dim=(1, 2, 3))
    assert (clip[:, planted].abs().amax(dim=(1, 2, 3)) <= bound + 1e-6).all()
    assert raw[:, planted].abs().amin() > 1000


def test_massive_detection_leaves_an_ordinary_map_alone():
    tokens = torch.randn(2, 64, 32)
    assert not ditf.massive_channels(tokens).any()
    torch.testing.assert_close(ditf.suppress_massive(tokens, "zero"), tokens)


# -------------------------------------------------------------------------------------- PixArt and FLUX
def test_flux_single_and_double_blocks_as_maps(mini_parts):
    pipe = tiny_flux(mini_parts)
    shapes = dict(list_layers(pipe, 64, 96))
    assert shapes["transformer_blocks.0"] == (16, 8, 12)
    assert shapes["single_transformer_blocks.1"] == (16, 8, 12)  # text tokens of the concatenated stream dropped
    layers = ["single_transformer_blocks.0", "single_transformer_blocks.0:remod"]
    fe = difffeat.FeatureExtractor(pipe, layers, timesteps=(250,), noise=False, resolution=(64, 96))
    feats = fe.extract(images(2, 64, 96), prompts=["a red circle", "a star"])
    z0 = fe.encode_latents(images(2, 64, 96), ["0", "1"])
    embeds, added = dit.encode_prompts(pipe, ["a red circle", "a star"])
    kwargs = dit.forward_kwargs(pipe, z0, torch.tensor([250, 250]), torch.stack(embeds), added)
    tokens = plain_hook_tokens(pipe.transformer, "single_transformer_blocks.0", 1, **kwargs)
    torch.testing.assert_close(feats[layers[0]], tokens.transpose(1, 2).reshape(2, 16, 8, 12), rtol=1e-5, atol=1e-5)
    assert feats[layers[1]].shape == (2, 16, 8, 12)


def test_pixart_blocks_with_ddpm_noise(mini_parts):
    pipe = tiny_pixart(mini_parts)
    assert dict(list_layers(pipe))["transformer_blocks.1"] == (16, 8, 8)
    layers = ["transformer_blocks.1", "transformer_blocks.1:remod"]
    fe = difffeat.FeatureExtractor(pipe, layers, timesteps=(300,), noise=False)
    feats = fe.extract(images(2), prompts=["a red circle", "a star"])
    z0 = fe.encode_latents(images(2), ["0", "1"])
    embeds, added = dit.encode_prompts(pipe, ["a red circle", "a star"])
    kwargs = dit.forward_kwargs(pipe, z0, torch.tensor([300, 300]), torch.stack(embeds), added)
    tokens = plain_hook_tokens(pipe.transformer, "transformer_blocks.1", None, **kwargs)
    torch.testing.assert_close(feats[layers[0]], tokens.transpose(1, 2).reshape(2, 16, 8, 8), rtol=1e-5, atol=1e-5)
    # DDPM-family scheduler: noised with alphas_cumprod, as for UNets.
    z, eps = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    a = pipe.scheduler.alphas_cumprod[300]
    torch.testing.assert_close(dit.noise_latents(pipe, z, eps, 300), a.sqrt() * z + (1 - a).sqrt() * eps)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_sizes_layers_and_techniques_give_one_clear_error(mini_parts):
    pipe = tiny_sd3(mini_parts)
    with pytest.raises(UserError, match=r"multiples of 8 \(VAE factor 4 × patch 2\); nearest valid: height 56 or 64"):
        list_layers(pipe, 60, 64)
    with pytest.raises(UserError, match="multiples of 8"):
        difffeat.FeatureExtractor(pipe, ["transformer_blocks.0"], resolution=(64, 70))
    with pytest.raises(UserError, match="unknown layer 'up_blocks.1' for this SD3Transformer2DModel; did you mean "
                                        "transformer_blocks"):
        resolve_layers(pipe, ["up_blocks.1"])
    with pytest.raises(UserError, match="preset 'dift' does not fit this SD3Transformer2DModel"):
        resolve_layers(pipe, ["dift"])
    with pytest.raises(UserError, match="unknown option 'remodulate'"):
        resolve_layers(pipe, ["transformer_blocks.0:remodulate"])
    with pytest.raises(UserError, match="options apply to transformer blocks only"):
        resolve_layers(pipe, ["pos_embed:remod"])
    with pytest.raises(UserError, match="x: LoRA file or folder not found"):
        difffeat.FeatureExtractor(pipe, ["transformer_blocks.0"], techniques=["lora:x"])


def test_unknown_transformer_and_incomplete_folders_are_named(tmp_path):
    from difffeat.zoo.registry import check_pipeline_folder

    class Odd(torch.nn.Module):
        pass

    with pytest.raises(UserError, match="Odd: a transformer difffeat cannot hook yet"):
        dit.family(Odd())
    folder = tmp_path / "sd3"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder_3": [None, None]}))
    with pytest.raises(UserError, match="missing transformer/, vae/config.json"):
        check_pipeline_folder(folder)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="stabilityai/stable-diffusion-3-medium-diffusers: .*offline"):
        difffeat.load_pipeline("stabilityai/stable-diffusion-3-medium-diffusers")


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", list(dit_presets.TRANSFORMERS))
def test_preset_transformers_have_the_published_parameter_counts(name):
    with torch.device("meta"):
        model = dit_presets.build_transformer(name)
    assert sum(p.numel() for p in model.parameters()) == dit_presets.TRANSFORMERS[name][2]


def test_flux_preset_lists_every_block_on_the_meta_device():
    pipe = difffeat.load_pipeline("flux-random")
    shapes = dict(list_layers(pipe, 512, 512))
    assert shapes["transformer_blocks.18"] == (3072, 32, 32)
    assert shapes["single_transformer_blocks.37"] == (3072, 32, 32)
    assert len(resolve_layers(pipe, ["dit-blocks"], 512, 512)) == 19 + 38


# ---------------------------------------------------------------------------------------------- mini-dit
def test_mini_dit_recipe_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from difffeat.zoo.train_dit import MiniDitTrainConfig, read_losses, train_mini_dit

    cfg = MiniDitTrainConfig(n_train=8, steps=4, batch_size=2, warmup=1, checkpoint_every=2, log_every=1)
    whole = train_mini_dit(tmp_path / "a", cfg=cfg)
    assert train_mini_dit(tmp_path / "b", cfg=cfg, stop_after=3) is None
    split = train_mini_dit(tmp_path / "b", cfg=cfg)
    a = load_file(whole / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_losses(tmp_path / "b" / "losses.csv")] == [1, 2, 3, 4]
    assert json.loads((whole / "model_index.json").read_text())[mmdit.INDEX_KEY] == mmdit.T5_TOKENS


@pytest.mark.skipif(not (mmdit.weights_dir() / "model_index.json").exists(), reason="mini-dit weights not shipped")
def test_shipped_mini_dit_loads_by_diffusers_and_extracts(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    size = sum(f.stat().st_size for f in mmdit.weights_dir().rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    plain = StableDiffusion3Pipeline.from_pretrained(mmdit.weights_dir(), text_encoder_3=None, tokenizer_3=None,
                                                     local_files_only=True)
    assert plain.transformer.config.num_layers == mmdit.TRANSFORMER_CONFIG["num_layers"]
    pipe = difffeat.load_pipeline("mini-dit")
    assert dit.max_sequence_length(pipe) == mmdit.T5_TOKENS
    feats = difffeat.FeatureExtractor(pipe, ["dit-middle", "transformer_blocks.1:massive=zero:remod"],
                                      timesteps=(500,)).extract(images(2), prompts=["a red circle", ""])
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "transformer_blocks.2": (2, 128, 8, 8), "transformer_blocks.1:massive=zero:remod": (2, 128, 8, 8)}
    assert all(torch.isfinite(v).all() for v in feats.values())
