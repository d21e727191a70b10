"""Real-size architecture presets (random weights) for tests and benchmarks that need true shapes.

The configs are those of the public checkpoints' `config.json` files, written out as data so that
nothing is downloaded. Weights are random: use these to check layer names, shapes, memory and speed,
never features.
"""

from __future__ import annotations

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD21_UNET = dict(
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# name → (unet config, vae overrides, text encoder configs, pipeline class name)
PRESETS = {
    "sd15-random": (SD15_UNET, {}, (CLIP_L,), "StableDiffusionPipeline"),
    "sd21-random": (SD21_UNET, {"sample_size": 768}, (OPENCLIP_H,), "StableDiffusionPipeline"),
    "sdxl-random": (SDXL_UNET, {"sample_size": 1024, "scaling_factor": 0.13025}, (CLIP_L, OPENCLIP_BIGG),
                    "StableDiffusionXLPipeline"),
}


def build_unet(preset: str):
    """The preset's UNet2DConditionModel with random weights (inside `torch.device('meta')` it costs no memory)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**PRESETS[preset][0])


def build_preset_pipeline(preset: str, seed: int = 0):
    """A whole random-weight pipeline of the preset's architecture.

    The tokenizer is the mini model's word-level one (real CLIP vocabularies are not on disk); its ids
    fit any CLIP vocabulary, which is all random weights need.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difffeat.zoo import mini

    unet_cfg, vae_over, text_cfgs, pipe_cls = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer = mini.build_tokenizer()
    parts = dict(
        unet=build_unet(preset),
        vae=AutoencoderKL(**{**SD_VAE, **vae_over}),
        scheduler=DDPMScheduler(**mini.SCHEDULER_CONFIG),
        tokenizer=tokenizer,
    )
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if pipe_cls == "StableDiffusionXLPipeline":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_cfgs[0], **ids))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfgs[1], **ids))
        parts["tokenizer_2"] = tokenizer
    else:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_cfgs[0], **ids))
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return getattr(diffusers, pipe_cls)(**parts)
