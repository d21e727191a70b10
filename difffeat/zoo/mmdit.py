"""The built-in *mini-dit* model: a small Stable-Diffusion-3-architecture pipeline (MMDiT) for the Shapes-LT world.

Same parts as SD3 (AutoencoderKL, CLIP text encoders with pooled projections, `SD3Transformer2DModel` with joint
text–image attention and AdaLN-Zero blocks, flow-matching Euler scheduler), only smaller, so that it trains on a
CPU and ships with the package. It is loaded by `StableDiffusion3Pipeline.from_pretrained` like any SD3 folder.

Why SD3 and not PixArt: SD3's text encoders are CLIP models, so the mini model's trained CLIP encoder and its
word-level tokenizer are reused as they are (PixArt needs a T5 encoder, which the mini world does not have);
SD3's joint attention (text tokens travel through every block beside the image tokens) is also the harder case
for feature extraction (a block returns both streams), and it is the MMDiT family FLUX and SD3.5 belong to.

What is reused from *mini*, frozen: the VAE (4 latent channels, factor 4: 64×64 images → 16×16 latents), and the
CLIP text encoder, placed in both of SD3's CLIP slots (`text_encoder` and `text_encoder_2`, the same weights
saved twice, 1.7 MB each) as a `CLIPTextModelWithProjection` whose projection is the identity. SD3's third
encoder (T5) is absent (`text_encoder_3=None`, which diffusers allows: it then feeds zeros in the T5 slot). The
model was trained with an empty T5 slot, so call the pipeline with ``max_sequence_length=0`` (difffeat does;
see `T5_TOKENS`). The tokenizer keeps mini's vocabulary with a 48-token window: every Shapes-LT caption fits
(≤ 40 tokens), and CLIP's causal attention makes the first 48 positions identical to a 77-token encoding.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from difffeat.data.shapes_lt import SIZE

VAE_FACTOR = 4
LATENT_SIZE = SIZE // VAE_FACTOR
TEXT_TOKENS = 48  # CLIP window: the longest Shapes-LT caption is 40 tokens with its start/end tokens
T5_TOKENS = 0  # zero-filled T5 tokens the model was trained with (SD3's default is 256): pass as max_sequence_length
TEXT_WIDTH = 128  # the mini CLIP encoder's width
INDEX_KEY = "_difffeat_max_sequence_length"  # where a saved folder records T5_TOKENS (read by the registry)
SEQUENCE_LENGTH_ATTR = "difffeat_max_sequence_length"  # where a loaded pipeline keeps it (`difffeat.models.dit`)

TRANSFORMER_CONFIG = dict(
    sample_size=LATENT_SIZE,
    patch_size=2,  # 16×16 latents → an 8×8 token grid
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,  # width 128
    joint_attention_dim=2 * TEXT_WIDTH,  # SD3 concatenates its two CLIP encoders' states along channels
    caption_projection_dim=128,
    pooled_projection_dim=2 * TEXT_WIDTH,  # and their pooled projections
    pos_embed_max_size=16,  # positions for up to 16×16 patches: images up to 128×128
    qk_norm="rms_norm",  # SD3.5's query/key RMS norm: steadier training at a high learning rate
)
# SD3's scheduler without the resolution shift (shift 3.0 is for 1024² images; these are 64²).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def weights_dir() -> Path:
    """Folder of the shipped mini-dit pipeline (package data)."""
    return Path(str(resources.files("difffeat.zoo") / "weights" / "mini-dit"))


def mini_parts():
    """The mini model's frozen VAE and CLIP text encoder (from the shipped mini weights), as SD3 parts.

    Returns (vae, text_encoder, tokenizer): the VAE with a zero shift factor (SD3's pipeline reads one), the
    text encoder as a `CLIPTextModelWithProjection` with an identity projection, the tokenizer with a
    `TEXT_TOKENS` window.
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difffeat.zoo import mini
    from difffeat.zoo.folders import check_pipeline_folder

    path = mini.weights_dir()
    check_pipeline_folder(path)
    vae = AutoencoderKL.from_pretrained(path / "vae")
    vae.register_to_config(shift_factor=0.0)
    clip = CLIPTextModel.from_pretrained(path / "text_encoder")
    config = CLIPTextConfig(**{**clip.config.to_dict(), "projection_dim": clip.config.hidden_size,
                               "architectures": ["CLIPTextModelWithProjection"]})
    text_encoder = CLIPTextModelWithProjection(config)
    # transformers ≥ 5 keeps CLIPTextModel's weights without the "text_model." prefix; older versions with it.
    state = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items()}
    text_encoder.text_model.load_state_dict(state)
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(clip.config.hidden_size))
    tokenizer = mini.build_tokenizer()
    tokenizer.model_max_length = TEXT_TOKENS
    for m in (vae, text_encoder):
        m.requires_grad_(False).eval()
    return vae, text_encoder, tokenizer


def build_transformer(seed: int = 0):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae, text_encoder, tokenizer, transformer, scheduler):
    """A StableDiffusion3Pipeline from mini-dit parts: the one CLIP encoder in both CLIP slots, no T5."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    vars(pipe)[SEQUENCE_LENGTH_ATTR] = T5_TOKENS  # difffeat encodes prompts with the T5 slot it was trained with
    return pipe


def save_pipeline(pipe, out: str | Path) -> Path:
    """`save_pretrained` (safetensors), with the T5 token count recorded in ``model_index.json`` under a key
    diffusers ignores (``_``-prefixed), so that `difffeat.load_pipeline` of the folder encodes prompts alike."""
    import json

    from difffeat.utils.atomic import write_json_atomic

    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    write_json_atomic(out / "model_index.json", {**index, INDEX_KEY: T5_TOKENS})
    return out


def random_mini_dit_pipeline(seed: int = 0):
    """The mini-dit architecture with a random transformer (and mini's trained VAE and text encoder)."""
    vae, text_encoder, tokenizer = mini_parts()
    return assemble_pipeline(vae, text_encoder, tokenizer, build_transformer(seed), build_scheduler())


def encode_text(pipe, prompts: list[str]):
    """(prompt_embeds [B, T, D], pooled [B, P]) exactly as the pipeline conditions when it generates, with the
    T5 slot the model was trained with."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=pipe.transformer.device,
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    return embeds, pooled
