"""img2img under a technique stack (`pipelines.img2img`): the reconstruction GATE compares against the input.

diffusers' img2img semantics (StableDiffusionImg2ImgPipeline): with `steps` DDIM steps and strength s,
the clean latent is noised at the step int(steps·s) from the end and denoised over the remaining steps;
s = 1 starts from pure noise. The noise is seeded per image key, so every candidate of a GATE run starts
from the same noised latents. The UNet calls go through the stack (`Conditioning.eps`): prompt techniques,
LoRA, CFG and ControlNet act as in extraction; a schedule technique (denoise-from) has no meaning here
and is ignored.

A flow-matching transformer (SD3, FLUX) samples as diffusers' SD3 img2img pipeline does, with its own scheduler
(FlowMatchEulerDiscreteScheduler: the clean latent noised to the σ of step int(steps·s) from the end,
`scale_noise`, then Euler steps on the predicted velocity); DDPM-family transformers (PixArt) take the DDIM loop.
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
    from difffeat.extraction.extract import encode_latents, item_seed, seeded_normal
    from difffeat.models import dit
    from difffeat.models.prompts import PromptEncoder
    from pipelines.stack import TechniqueStack

    if not 0 < strength <= 1:
        raise UserError(f"strength must be in (0, 1], got {strength}")
    if int(steps * strength) < 1:
        raise UserError(f"{steps} steps at strength {strength} run no denoising step; raise steps or strength")
    n = len(images)
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    stack = stack if stack is not None else TechniqueStack(pipe, techniques)
    encoder = prompt_encoder if prompt_encoder is not None else PromptEncoder(pipe)
    prompts = [""] * n if prompts is None else list(prompts)
    fields = [{}] * n if fields is None else list(fields)
    texts = stack.prompts(prompts, fields, keys, images)  # with fields from the images (prompt:auto)
    z0 = encode_latents(pipe, images, keys, batch_size=batch_size) if latents is None else latents
    start = steps - min(int(steps * strength), steps)
    flow = dit.is_flow_matching(pipe.scheduler)
    controls = stack.control_images(images, keys)
    vae, model = pipe.vae, dit.denoiser(pipe)
    shift = vae.config.get("shift_factor")  # SD3 / FLUX latents were shifted before scaling
    out = []
    with stack.active():
        for s in range(0, n, batch_size):
            rows = list(range(s, min(n, s + batch_size)))
            cond = stack.conditioning(encoder, texts, controls, rows, tuple(images.shape[-2:]))
            noise = torch.stack([seeded_normal(z0.shape[1:], item_seed(seed, keys[i], "img2img")) for i in rows])
            # One scheduler per batch: a flow-matching scheduler counts the steps it has taken.
            scheduler = sampler(pipe, steps, start, tuple(z0.shape[-2:]))
            timesteps = scheduler.timesteps[start:]
            if flow:
                z = scheduler.scale_noise(z0[rows], timesteps[:1].repeat(len(rows)), noise.to(z0))
                for t, sigma in zip(timesteps, scheduler.sigmas[start:]):
                    z = scheduler.step(cond.eps(z.to(model.dtype), t, sigma=sigma), t, z).prev_sample
            else:
                z = scheduler.add_noise(z0[rows], noise.to(z0), timesteps[:1].repeat(len(rows)))
                for t in timesteps:
                    z = scheduler.step(cond.eps(z.to(model.dtype), t), t, z).prev_sample
            z = z.to(vae.dtype) / vae.config.scaling_factor
            x = vae.decode(z + shift if shift else z).sample
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def sampler(pipe, steps: int, start: int, latent_hw: tuple[int, int]):
    """img2img's scheduler with `steps` timesteps, starting at step `start`: DDIM, or for a flow-matching model its
    own FlowMatchEulerDiscreteScheduler (FLUX's resolution-dependent shift for latents of size `latent_hw`)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from difffeat.models import dit

    if not dit.is_flow_matching(pipe.scheduler):
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    dynamic = scheduler.config.get("use_dynamic_shifting")
    scheduler.set_timesteps(steps, **({"mu": dit.shift_mu(scheduler.config, latent_hw)} if dynamic else {}))
    scheduler.set_begin_index(start)
    return scheduler
