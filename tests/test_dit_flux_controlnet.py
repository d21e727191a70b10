"""`controlnet:PATH` with a FluxControlNetModel on a FLUX transformer, checked against diffusers' own
FluxControlNetPipeline helpers and a plain forward hook; tiny random FLUX pipeline and ControlNets built here."""

import pytest
import torch
from test_transformers import images, tiny_flux, tiny_sd3

import difffeat
from difffeat.errors import UserError
from difffeat.extraction.extract import encode_latents, item_seed, seeded_normal
from difffeat.models import dit
from difffeat.zoo import mmdit
from pipelines import TechniqueStack
from pipelines.canny import canny_tensor

KEYS = ["a", "b", "c"]
PROMPTS = ["a red circle", "a blue star", "two squares"]
BLOCKS = ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]


@pytest.fixture(scope="module")
def mini_parts():
    return mmdit.mini_parts()


@pytest.fixture(scope="module")
def pipe(mini_parts):
    pipe = tiny_flux(mini_parts)
    pipe.vae.register_to_config(shift_factor=0.1159)  # FLUX's VAE shifts its latents: the control latents too
    return pipe


@pytest.fixture(scope="module")
def deep_pipe(mini_parts):
    """The tiny FLUX pipeline with 3 double-stream blocks: 2 ControlNet blocks spread over them differ from 2
    repeated over them."""
    from diffusers import FluxTransformer2DModel

    pipe = tiny_flux(mini_parts)
    pipe.vae.register_to_config(shift_factor=0.1159)
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "num_layers": 3})
    return pipe


def flux_controlnet(pipe, seed: int, nonzero: bool = True, **config):
    """A FluxControlNetModel of the tiny transformer's sizes (1 double-, 1 single-stream block unless `config`
    says otherwise); with `nonzero` its zero-initialised layers (output projections, control embedder) drawn."""
    from diffusers import FluxControlNetModel

    m = pipe.transformer.config
    torch.manual_seed(seed)
    base = dict(patch_size=1, in_channels=m.in_channels, num_layers=1, num_single_layers=1,
                attention_head_dim=m.attention_head_dim, num_attention_heads=m.num_attention_heads,
                joint_attention_dim=m.joint_attention_dim, pooled_projection_dim=m.pooled_projection_dim,
                guidance_embeds=m.guidance_embeds, axes_dims_rope=tuple(m.axes_dims_rope))
    net = FluxControlNetModel(**{**base, **config})
    if nonzero:
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                    p.normal_(0, 0.1)
    return net.eval()


def saved(net, path) -> str:
    net.save_pretrained(path)
    return str(path)


def features(pipe, x, techniques=(), layers=tuple(BLOCKS), t=500):
    return difffeat.FeatureExtractor(pipe, list(layers), timesteps=(t,), techniques=list(techniques)).extract(
        x, prompts=PROMPTS, keys=KEYS)


def by_hand(pipe, x, nets, scales, layers=tuple(BLOCKS), t=500) -> dict[str, torch.Tensor]:
    """The blocks' image tokens on the 8×8 grid as diffusers' FluxControlNetPipeline computes one step at t: its
    own prompt encoding, control-image preparation (VAE latents shifted, scaled and packed; pixels for an XLabs
    ControlNet), ControlNet calls (σ = t/1000 as the transformer takes it) and transformer call with plain hooks."""
    from diffusers import FluxControlNetPipeline
    from PIL import Image

    components = {k: v for k, v in pipe.components.items() if k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                   "text_encoder_2", "tokenizer_2", "transformer")}
    cn = FluxControlNetPipeline(**components, controlnet=nets[0])
    z0 = encode_latents(pipe, x, KEYS)
    eps = torch.stack([seeded_normal(z0.shape[1:], item_seed(0, k, t, 0)) for k in KEYS])
    sigma = dit.sigma_of_t(pipe, t, tuple(z0.shape[-2:]))
    b, c, h, w = z0.shape
    latents = cn._pack_latents((1 - sigma) * z0 + sigma * eps, b, c, h, w)
    img_ids = cn._prepare_latent_image_ids(b, h // 2, w // 2, z0.device, z0.dtype)
    embeds, pooled, txt_ids = cn.encode_prompt(PROMPTS, None, max_sequence_length=16)
    timestep = torch.full((b,), sigma * 1000) / 1000
    guidance = torch.full((b,), 3.5)
    edges = (canny_tensor(x) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(e) for e in edges]
    double = single = None
    with torch.no_grad():
        for net, scale in zip(nets, scales):
            control = cn.prepare_image(pil, width=64, height=64, batch_size=b, num_images_per_prompt=1,
                                       device=z0.device, dtype=pipe.vae.dtype)
            if net.input_hint_block is None:
                control = pipe.vae.encode(control).latent_dist.mean
                control = (control - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
                control = cn._pack_latents(control, b, c, h, w)
            d, s = net(hidden_states=latents, controlnet_cond=control, conditioning_scale=scale, timestep=timestep,
                       guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)
            double = d if double is None else [p + q for p, q in zip(double, d)]
            single = s if single is None else [p + q for p, q in zip(single, s)]
        out, modules = {}, dict(pipe.transformer.named_modules())
        handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: out.update({n: o[1]})) for n in layers]
        try:
            pipe.transformer(hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                             encoder_hidden_states=embeds, controlnet_block_samples=double,
                             controlnet_single_block_samples=single, txt_ids=txt_ids, img_ids=img_ids,
                             controlnet_blocks_repeat=nets[0].input_hint_block is not None)
        finally:
            for handle in handles:
                handle.remove()
    return {n: v.transpose(1, 2).reshape(b, v.shape[2], h // 2, w // 2) for n, v in out.items()}


# ----------------------------------------------------------------------------------------------- residuals
def test_flux_controlnet_adds_its_block_residuals_as_diffusers_pipeline(pipe, tmp_path):
    x = images()
    net = flux_controlnet(pipe, 1)
    got = features(pipe, x, [f"controlnet:{saved(net, tmp_path / 'cn')},scale=0.8"])
    want = by_hand(pipe, x, [net], [0.8])
    plain = features(pipe, x)
    for name in BLOCKS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    # diffusers adds block N's residual after block N: its own output is untouched, the next blocks see it.
    torch.testing.assert_close(got["transformer_blocks.0"], plain["transformer_blocks.0"], rtol=0, atol=0)
    for name in BLOCKS[1:]:
        assert (got[name] - plain[name]).abs().mean() > 1e-3
    # Two ControlNets add their residuals, each times its scale (as FluxMultiControlNetModel does).
    other = flux_controlnet(pipe, 2)
    both = features(pipe, x, [f"controlnet:{tmp_path / 'cn'},scale=0.8",
                              f"controlnet:{saved(other, tmp_path / 'other')},scale=0.5"])
    want = by_hand(pipe, x, [net, other], [0.8, 0.5])
    for name in BLOCKS:
        torch.testing.assert_close(both[name], want[name], rtol=1e-5, atol=1e-5)


def test_xlabs_style_controlnet_takes_pixels_and_repeats_over_the_blocks(deep_pipe, tmp_path):
    pipe, x = deep_pipe, images()
    # An input hint block (stride 8 = the tiny VAE's 4 × FLUX's 2×2 packing), 2 double- and no single-stream
    # blocks, as XLabs'; its residuals go to blocks 0, 1, 0 (repeated), not 0, 0, 1 (spread).
    net = flux_controlnet(pipe, 3, num_layers=2, num_single_layers=0,
                          conditioning_embedding_channels=pipe.transformer.config.in_channels)
    path = saved(net, tmp_path / "xlabs")
    layers = ("transformer_blocks.1", "transformer_blocks.2", "single_transformer_blocks.0")
    got = features(pipe, x, [f"controlnet:{path}"], layers)
    want = by_hand(pipe, x, [net], [1.0], layers)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert (got[layers[1]] - features(pipe, x, layers=layers)[layers[1]]).abs().mean() > 1e-3
    instantx = saved(flux_controlnet(pipe, 4, num_layers=2), tmp_path / "instantx")
    with pytest.raises(UserError, match="controlnet_blocks_repeat=.* ControlNets used together must agree"):
        features(pipe, x, [f"controlnet:{path}", f"controlnet:{instantx}"])


def test_fresh_controlnet_with_zero_output_projections_leaves_features_unchanged(pipe, tmp_path):
    x = images()
    got = features(pipe, x, [f"controlnet:{saved(flux_controlnet(pipe, 5, nonzero=False), tmp_path / 'fresh')}"])
    plain = features(pipe, x)
    for name in BLOCKS:
        torch.testing.assert_close(got[name], plain[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- refusals
def test_controlnets_that_do_not_fit_are_refused_naming_both(pipe, tmp_path):
    fits = r"\(a FluxControlNetModel\) does not fit this model's FluxTransformer2DModel: "
    with pytest.raises(UserError, match=fits + r"inner dim 32 vs the transformer's 16"):
        TechniqueStack(pipe, [f"controlnet:{saved(flux_controlnet(pipe, 6, num_attention_heads=4), tmp_path / 'w')}"])
    deep = saved(flux_controlnet(pipe, 6, num_layers=2, num_single_layers=3), tmp_path / "deep")
    with pytest.raises(UserError, match=fits + r"2 double-stream blocks vs the transformer's 1; "
                                               r"3 single-stream blocks vs the transformer's 2"):
        TechniqueStack(pipe, [f"controlnet:{deep}"])
    with pytest.raises(UserError, match=fits + r"input channels 8 vs 16; control latent channels 16"):
        TechniqueStack(pipe, [f"controlnet:{saved(flux_controlnet(pipe, 6, in_channels=8), tmp_path / 'ch')}"])
    with pytest.raises(UserError, match=r"is a union FluxControlNetModel \(3 control modes.*not supported yet"):
        TechniqueStack(pipe, [f"controlnet:{saved(flux_controlnet(pipe, 6, num_mode=3), tmp_path / 'union')}"])
    with pytest.raises(UserError, match="no built-in canny ControlNet for a FluxTransformer2DModel; pass "
                                        "controlnet:PATH_OR_HUB_ID of a FluxControlNetModel"):
        TechniqueStack(pipe, ["controlnet:canny"])


def test_controlnet_of_another_backbone_is_refused_naming_both_classes(pipe, mini_parts, mini_pipe, tmp_path):
    from diffusers import SD3ControlNetModel

    flux = saved(flux_controlnet(pipe, 7), tmp_path / "flux")
    sd3 = tiny_sd3(mini_parts)
    m = sd3.transformer.config
    saved(SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                             num_attention_heads=2, joint_attention_dim=m.joint_attention_dim,
                             caption_projection_dim=16, pooled_projection_dim=m.pooled_projection_dim,
                             pos_embed_max_size=16), tmp_path / "sd3")
    with pytest.raises(UserError, match=r"is a SD3ControlNetModel, made for a SD3Transformer2DModel, but this "
                                        r"model's backbone is a FluxTransformer2DModel"):
        TechniqueStack(pipe, [f"controlnet:{tmp_path / 'sd3'}"])
    for other, backbone in ((sd3, "SD3Transformer2DModel"), (mini_pipe, "UNet2DConditionModel")):
        with pytest.raises(UserError, match=r"is a FluxControlNetModel, made for a FluxTransformer2DModel, but this "
                                            rf"model's backbone is a {backbone}$"):
            TechniqueStack(other, [f"controlnet:{flux}"])
