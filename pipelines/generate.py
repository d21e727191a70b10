"""img2img under a technique stack (`pipelines.img2img`): the reconstruction GATE compares against the input.

diffusers' img2img semantics (StableDiffusionImg2ImgPipeline): with `steps` DDIM steps and strength s,
the clean latent is noised at the step int(steps·s) from the end and denoised over the remaining steps;
s = 1 starts from pure noise. The noise is seeded per image key, so every candidate of a GATE run starts
from the same noised latents. The UNet calls go through the stack (`Conditioning.eps`): prompt techniques,
LoRA, CFG and ControlNet act as in extraction; a schedule technique (denoise-from) has no meaning here
and is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difffeat.errors import UserError


@torch.no_grad()
def img2img(pipe, images: torch.Tensor, techniques=(), prompts: Sequence[str] | None = None,
            keys: Sequence[str] | None = None, strength: float = 0.7, steps: int = 50, seed: int = 0,
            fields: Sequence[dict] | None = None, latents: torch.Tensor | None = None, stack=None,
            prompt_encoder=None, batch_size: int = 8) -> torch.Tensor:
    """Reconstructions [B, 3, H, W] in [0, 1] of images [B, 3, H, W] in [0, 1].

    `latents`: the images' clean latents (VAE posterior mean × scaling factor) when already computed;
    `stack` / `prompt_encoder`: reuse a bound `TechniqueStack` / `PromptEncoder` across calls.
    """
    from diffusers import DDIMScheduler

    from difffeat.extract import encode_latents, item_seed, seeded_normal
    from difffeat.prompts import PromptEncoder
    from pipelines.stack import TechniqueStack

    if not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    n = len(images)
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    stack = stack if stack is not None else TechniqueStack(pipe, techniques)
    encoder = prompt_encoder if prompt_encoder is not None else PromptEncoder(pipe)
    prompts = [""] * n if prompts is None else list(prompts)
    fields = [{}] * n if fields is None else list(fields)
    texts = [stack.prompt(p, f, k) for p, f, k in zip(prompts, fields, keys)]
    z0 = encode_latents(pipe, images, keys, batch_size=batch_size) if latents is None else latents
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start:]
    controls = stack.control_images(images, keys)
    vae, unet = pipe.vae, pipe.unet
    out = []
    with stack.active():
        for s in range(0, n, batch_size):
            rows = list(range(s, min(n, s + batch_size)))
            cond = stack.conditioning(encoder, texts, controls, rows, tuple(images.shape[-2:]))
            noise = torch.stack([seeded_normal(z0.shape[1:], item_seed(seed, keys[i], "img2img")) for i in rows])
            z = scheduler.add_noise(z0[rows], noise.to(z0), timesteps[:1].repeat(len(rows)))
            for t in timesteps:
                z = scheduler.step(cond.eps(z.to(unet.dtype), t), t, z).prev_sample
            x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)
