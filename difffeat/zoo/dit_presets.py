"""Real-size transformer presets (random weights): SD3-medium, PixArt-Σ and FLUX.1-dev architectures by name.

The configs are those of the public checkpoints' `config.json` files, written out as data so that nothing is
downloaded; the transformers' parameter counts equal the published ones (tests/test_transformers.py). Their
real sizes (2.0 B, 0.6 B and 11.9 B parameters, plus T5-XXL text encoders of 4.8 B) do not fit a test machine,
so a preset pipeline is built on the ``meta`` device: no memory, every layer and shape there
(`difffeat layers --model flux-random` lists every block), no values. `build_transformer(name)` makes the
transformer alone, with real random weights unless called inside ``torch.device("meta")``; `materialize(pipe)`
gives every meta component of a pipeline random weights (a benchmark's cost is the same as with real ones).

Tokenizers are the mini model's word-level one (real vocabularies are not on disk); T5 slots that a
pipeline allows to be empty (SD3's third encoder) are left empty.
"""

from __future__ import annotations

SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
PIXART_SIGMA = dict(
    sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
    num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    num_embeds_ada_norm=1000, interpolation_scale=2, use_additional_conditions=False,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# VAEs: SD3's and FLUX's 16-channel autoencoders; PixArt-Σ uses SDXL's.
VAE16 = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)
SD3_VAE = dict(VAE16, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(VAE16, scaling_factor=0.3611, shift_factor=0.1159)
SDXL_VAE = dict(VAE16, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.13025)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)

# name → (transformer class, config, published parameter count of the transformer)
TRANSFORMERS = {
    "sd3-medium-random": ("SD3Transformer2DModel", SD3_MEDIUM, 2_028_328_000),
    "pixart-sigma-random": ("PixArtTransformer2DModel", PIXART_SIGMA, 610_856_096),
    "flux-random": ("FluxTransformer2DModel", FLUX_DEV, 11_901_408_320),
}


def build_transformer(name: str):
    """The preset's transformer with random weights (inside ``torch.device('meta')`` it costs no memory)."""
    import diffusers

    cls, config, _ = TRANSFORMERS[name]
    return getattr(diffusers, cls)(**config)


def build_preset_pipeline(name: str):
    """The preset's whole pipeline on the meta device: shapes and layer names, no values (see the module doc)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from difffeat.zoo import mini
    from difffeat.zoo.presets import CLIP_L, OPENCLIP_BIGG

    tokenizer = mini.build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        transformer = build_transformer(name)
        if name == "sd3-medium-random":
            from diffusers import StableDiffusion3Pipeline

            return StableDiffusion3Pipeline(
                transformer=transformer, vae=AutoencoderKL(**SD3_VAE),
                scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, projection_dim=768, **ids)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **ids)),
                tokenizer=tokenizer, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
        if name == "pixart-sigma-random":
            from diffusers import PixArtSigmaPipeline

            return PixArtSigmaPipeline(
                transformer=transformer, vae=AutoencoderKL(**SDXL_VAE), tokenizer=tokenizer,
                text_encoder=T5EncoderModel(T5Config(**T5_XXL)),
                scheduler=DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                                      prediction_type="epsilon", variance_type="learned_range"))
        from diffusers import FluxPipeline

        return FluxPipeline(
            transformer=transformer, vae=AutoencoderKL(**FLUX_VAE),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                      max_image_seq_len=4096),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)), tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_2=tokenizer)


def materialize(pipe, dtype=None) -> list[str]:
    """Give every component of `pipe` that lives on the meta device random weights, in place; returns their names.

    Each is built again from its own config (diffusers models by ``from_config``, transformers models by their
    class), so buffers that hold values (CLIP's position ids, rotary tables) are right, not uninitialised memory.
    `dtype` (a torch dtype) casts the new components; the memory is the real model's."""
    import torch

    built = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module) or not any(p.is_meta for p in module.parameters()):
            continue
        cls = type(module)
        fresh = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
        fresh = fresh.eval().requires_grad_(False)
        # Built in float32; cast only to another dtype (diffusers warns on any `to(dtype)` of a VAE).
        setattr(pipe, name, fresh.to(dtype) if dtype not in (None, torch.float32) else fresh)
        built.append(name)
    return built
