"""Quality checks of a text-to-image model on held-out Shapes-LT scenes (the mini model's quality bar).

- `conditioning_mse`: does the UNet use the caption? Noise-prediction MSE with the image's own fine
  caption, the empty caption and another image's caption, at fixed timesteps and seeded noise.
- `colour_accuracy`: does it draw what it is told? The dominant saturated colour of samples from fine
  captions against the colour the caption gives the main object (and against chance).
- `img2img_psnr`: does it reconstruct? PSNR of img2img outputs (strength 0.5) to their inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difffeat.data.shapes_lt import THING_COLOURS, Scene, iter_scenes


def heldout_scenes(n: int, seed: int = 0) -> list[Scene]:
    """The first `n` test-split scenes for `seed`: never seen in training (another split's stream)."""
    return list(iter_scenes("test", n, seed=seed))


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays → float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode_images(pipe, images: list[np.ndarray]) -> torch.Tensor:
    """VAE posterior mean times the scaling factor: the clean latent the UNet is trained on."""
    x = to_tensor(images).to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def embed_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.device)).last_hidden_state


def img2img_steps(steps: int, strength: float) -> int:
    """Denoising steps an img2img call of `steps` at `strength` runs (diffusers skips the first ones)."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


@torch.no_grad()
def conditioning_mse(pipe, scenes: list[Scene], timesteps=(500, 750), seed: int = 0, draws: int = 2,
                     bar=None) -> dict:
    """{t: {"own", "empty", "other"}}: mean ε-prediction MSE under each caption, same noise for all three.
    A tqdm `bar` moves on by one per (t, draw)."""
    z0 = encode_images(pipe, [s.image for s in scenes])
    captions = [s.fine_caption for s in scenes]
    embeds = {
        "own": embed_prompts(pipe, captions),
        "empty": embed_prompts(pipe, [""] * len(scenes)),
        "other": embed_prompts(pipe, captions[1:] + captions[:1]),  # the next scene's caption
    }
    alphas = pipe.scheduler.alphas_cumprod.to(pipe.device)
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for t in timesteps:
        sums = dict.fromkeys(embeds, 0.0)
        for _ in range(draws):
            noise = torch.randn(z0.shape, generator=gen).to(z0)
            a = alphas[t]
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            tt = torch.full((len(scenes),), t, device=pipe.device)
            for kind, emb in embeds.items():
                sums[kind] += torch.mean((pipe.unet(zt, tt, emb).sample - noise) ** 2).item() / draws
            if bar is not None:
                bar.update(1)
        report[int(t)] = sums
    return report


def dominant_colour(image: np.ndarray, tolerance: float = 60.0) -> str | None:
    """The thing colour (THING_COLOURS) with the most pixels within `tolerance` (RGB distance), or None."""
    pix = np.asarray(image, np.float32).reshape(-1, 3)
    palette = np.array(list(THING_COLOURS.values()), np.float32)
    dist = np.linalg.norm(pix[:, None, :] - palette[None], axis=-1)
    nearest = dist.argmin(1)
    counts = np.bincount(nearest[dist.min(1) <= tolerance], minlength=len(palette))
    return list(THING_COLOURS)[int(counts.argmax())] if counts.max() > 0 else None


def colour_present(image: np.ndarray, colour: str, tolerance: float = 60.0, min_pixels: int = 30) -> bool:
    """Whether at least `min_pixels` pixels lie within `tolerance` (RGB distance) of a thing colour."""
    pix = np.asarray(image, np.float32).reshape(-1, 3)
    return int((np.linalg.norm(pix - np.array(THING_COLOURS[colour], np.float32), axis=1) <= tolerance).sum()) \
        >= min_pixels


def colour_accuracy(pipe, scenes: list[Scene], seed: int = 0, steps: int = 50, guidance: float = 4.0,
                    bar=None) -> dict:
    """Samples from fine captions (DDIM): do they show the main object in the colour the caption names?

    - `accuracy`: the sample's dominant thing colour is the main object's colour;
    - `present`: the main object's colour covers at least 30 pixels of the sample.
    `chance` and `present_chance` score the same samples against other scenes' main colours: what
    matching would give if the samples ignored their captions. A tqdm `bar` moves on by one per denoising step.
    """
    from difffeat.zoo.sampling import sample

    images = sample(pipe, [s.fine_caption for s in scenes], steps=steps, guidance=guidance, seed=seed, bar=bar)
    arrays = [np.asarray(im) for im in images]
    predicted = [dominant_colour(a) for a in arrays]
    target = [s.things[0].colour for s in scenes]
    others = [np.roll(target, k) for k in range(1, len(scenes))]
    return {
        "accuracy": float(np.mean([p == t for p, t in zip(predicted, target)])),
        "chance": float(np.mean([np.mean([p == t for p, t in zip(predicted, o)]) for o in others])),
        "present": float(np.mean([colour_present(a, t) for a, t in zip(arrays, target)])),
        "present_chance": float(np.mean([np.mean([colour_present(a, t) for a, t in zip(arrays, o)]) for o in others])),
        "n": len(scenes),
        "images": images,
    }



def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB: 10·log10(255² / MSE)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


@torch.no_grad()
def img2img_psnr(pipe, scenes: list[Scene], strength: float = 0.5, seed: int = 0, steps: int = 50,
                 guidance: float = 4.0, bar=None) -> float:
    """Mean PSNR of img2img reconstructions (fine captions, DDIM) to their inputs. A tqdm `bar` moves on by one
    per denoising step (`img2img_steps` of them)."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    from difffeat.utils.progress import step_callback

    components = {**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}
    i2i = StableDiffusionImg2ImgPipeline(**components)
    i2i.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(scenes))]
    hooks = {} if bar is None or bar.disable else {"callback_on_step_end": step_callback(bar)}
    out = i2i([s.fine_caption for s in scenes], image=[Image.fromarray(s.image) for s in scenes],
              strength=strength, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **hooks).images
    return float(np.mean([psnr(np.asarray(o), s.image) for o, s in zip(out, scenes)]))


@torch.no_grad()
def vae_psnr(pipe, scenes: list[Scene]) -> float:
    """Mean PSNR of VAE encode (mean) → decode: the ceiling for any reconstruction through latents."""
    x = to_tensor([s.image for s in scenes])
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([psnr(r, s.image) for r, s in zip(rec, scenes)]))


def evaluate_quality(model: str = "mini", n: int = 64, seed: int = 0, progress: bool = False) -> dict:
    """All quality numbers for `model`, with the random-weight mini pipeline as the img2img baseline.

    `progress` shows one bar over the model evaluations of every check (rate and ETA): a step is a (t, draw) of
    the conditioning check, a denoising step of the samples or of an img2img run, or the VAE round trip."""
    from tqdm.auto import tqdm

    from difffeat.zoo import load_pipeline

    pipe = load_pipeline(model)
    scenes = heldout_scenes(n, seed)
    few = scenes[:32]
    # The functions' own defaults, spelled out so the bar can count their steps before they run.
    timesteps, draws, steps, strength = (500, 750), 2, 50, 0.5
    total = len(timesteps) * draws + math.ceil(len(few) / 32) * steps + 2 * img2img_steps(steps, strength) + 1
    with tqdm(total=total, desc="eval-mini", unit="step", disable=not progress) as bar:
        colour = colour_accuracy(pipe, few, seed=seed, steps=steps, bar=bar)
        report = {
            "model": str(model),
            "n_heldout": n,
            "seed": seed,
            "conditioning_mse": conditioning_mse(pipe, scenes, timesteps, seed=seed, draws=draws, bar=bar),
            "colour_accuracy": colour["accuracy"],
            "colour_chance": colour["chance"],
            "colour_present": colour["present"],
            "colour_present_chance": colour["present_chance"],
            "colour_n": colour["n"],
            "img2img_psnr_strength_0.5": img2img_psnr(pipe, few, strength, seed=seed, steps=steps, bar=bar),
            "img2img_psnr_random_weights": img2img_psnr(load_pipeline("mini-random"), few, strength, seed=seed,
                                                        steps=steps, bar=bar),
            "vae_psnr": vae_psnr(pipe, scenes),
        }
        bar.update(1)
    return report
