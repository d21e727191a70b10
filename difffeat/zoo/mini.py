"""The built-in *mini* model: a small Stable-Diffusion-architecture pipeline for the Shapes-LT world.

Same parts as SD-1.x (AutoencoderKL, CLIP text encoder, UNet2DConditionModel with cross-attention in
several down and up blocks, scaled-linear 1000-step DDPM scheduler), only smaller, so that it trains on
a 2-core CPU and ships with the package. Its configs live here as data; `train.py` fits the weights and
`weights/mini/` holds the trained pipeline in diffusers format.
"""

from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

from difffeat.data.shapes_lt import SIZE, caption_vocabulary

LATENT_SIZE = SIZE // 4
MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=SIZE,
)
TEXT_HIDDEN = 128
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=8,
    norm_num_groups=16,
)
# SD-1.5's noise schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def weights_dir() -> Path:
    """Folder of the shipped mini pipeline (package data)."""
    return Path(str(resources.files("difffeat.zoo") / "weights" / "mini"))


def learn_word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and merge list under which every word of `words` is exactly one token.

    CLIP's tokenizer is byte-pair encoding with an end-of-word marker. A word vocabulary without the
    merges that build each word from its characters makes every word unknown, so we learn real merges:
    repeatedly merge the most frequent adjacent pair (ties broken by the pair itself, for determinism)
    until each word is a single symbol. Applying merges by rank then reproduces these segmentations.
    """
    segs = {w: tuple(w[:-1]) + (w[-1] + EOW,) for w in sorted(set(words))}
    vocab: list[str] = [BOS, EOS]
    symbols = sorted({s for seg in segs.values() for s in seg} | {c for w in segs for c in w})
    vocab += [s for s in symbols if s not in vocab]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for seg in segs.values() for p in zip(seg, seg[1:]))
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and seg[i] == a and seg[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = tuple(out)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_tokenizer():
    """The mini model's CLIPTokenizer: word-level over the Shapes-LT caption vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_word_bpe([*caption_vocabulary(), ","])
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_models(seed: int = 0):
    """Random-weight mini models from the configs above: (vae, text_encoder, tokenizer, unet, scheduler)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    return vae, text_encoder, tokenizer, unet, scheduler


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from mini parts (no safety checker: the world is synthetic shapes)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def random_mini_pipeline(seed: int = 0):
    """The mini architecture with random weights: the baseline that shows what training added."""
    return assemble_pipeline(*build_models(seed))
