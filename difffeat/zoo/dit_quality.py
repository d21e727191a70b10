"""Quality checks of a flow-matching SD3-architecture model on held-out Shapes-LT scenes (the mini-dit's bar).

- `conditioning_velocity_mse`: does the transformer use the caption? Velocity MSE
  ``mean ‖v̂(z_σ, σ, c) − (ε − z0)‖²`` with the image's own fine caption, the empty caption and another
  image's caption, at fixed noise levels σ and the same seeded noise for all three.
- `bar_sigma`: the noise level of the bar, "mid noise" as mini's: the σ whose signal-to-noise ratio equals that
  of mini's DDPM schedule at t = 500 (both models share one VAE and latent scale, so equal SNR is equally hard).
- `sample_images` / `img2img_images`: what the model draws from a caption, and how it reconstructs an
  image noised to a given strength (flow-matching Euler, the pipeline's own scheduler).
"""

from __future__ import annotations

import numpy as np
import torch

from difffeat.zoo.quality import heldout_scenes, img2img_steps, psnr, to_tensor


@torch.no_grad()
def clean_latents(pipe, images: list[np.ndarray]) -> torch.Tensor:
    """VAE posterior mean, shifted and scaled as SD3 does: the clean latent the transformer is trained on."""
    x = to_tensor(images).to(pipe.device, pipe.vae.dtype)
    cfg = pipe.vae.config
    return (pipe.vae.encode(x).latent_dist.mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def sigma_at_snr(snr: float) -> float:
    """The flow-matching σ at which ``z_σ = (1 − σ)·z0 + σ·ε`` has signal-to-noise ratio `snr`:
    SNR = ((1 − σ)/σ)², so σ = 1 / (1 + √SNR)."""
    return 1.0 / (1.0 + snr ** 0.5)


def bar_sigma(t: int = 500) -> float:
    """σ of the same SNR as mini's noise at DDPM step `t` (ᾱ_t / (1 − ᾱ_t), from mini's shipped scheduler): 0.616 for
    t = 500, where mini's own bar is measured (`difffeat.zoo.quality`)."""
    from diffusers import DDPMScheduler

    from difffeat.zoo.mini import weights_dir

    alpha_bar = float(DDPMScheduler.from_pretrained(weights_dir() / "scheduler").alphas_cumprod[t])
    return round(sigma_at_snr(alpha_bar / (1 - alpha_bar)), 4)


@torch.no_grad()
def conditioning_velocity_mse(pipe, scenes, sigmas=(0.5, 0.75), seed: int = 0, draws: int = 2,
                              batch_size: int = 32, bar=None) -> dict:
    """{σ: {"own", "empty", "other"}}: mean velocity MSE under each caption, the same noise for all three.
    A tqdm `bar` moves on by one per (σ, draw)."""
    from difffeat.zoo.mmdit import encode_text

    z0 = clean_latents(pipe, [s.image for s in scenes])
    captions = [s.fine_caption for s in scenes]
    texts = {"own": captions, "empty": [""] * len(scenes), "other": captions[1:] + captions[:1]}
    embeds = {k: encode_text(pipe, v) for k, v in texts.items()}
    gen = torch.Generator().manual_seed(seed)
    report = {}
    for sigma in sigmas:
        sums = dict.fromkeys(texts, 0.0)
        for _ in range(draws):
            noise = torch.randn(z0.shape, generator=gen).to(z0)
            zt = (1 - sigma) * z0 + sigma * noise
            for kind, (emb, pooled) in embeds.items():
                for s in range(0, len(z0), batch_size):
                    sl = slice(s, s + batch_size)
                    v = pipe.transformer(hidden_states=zt[sl], timestep=torch.full((len(zt[sl]),), 1000.0 * sigma),
                                         encoder_hidden_states=emb[sl], pooled_projections=pooled[sl]).sample
                    sums[kind] += ((v - (noise[sl] - z0[sl])) ** 2).sum().item() / (z0.numel() * draws)
            if bar is not None:
                bar.update(1)
        report[str(sigma)] = sums
    return report


def sample_images(pipe, prompts: list[str], seed: int = 0, steps: int = 28, guidance: float = 4.0):
    """PIL samples from `prompts`, one seeded generator per prompt (flow-matching Euler, the pipeline's own)."""
    from difffeat.zoo.mmdit import T5_TOKENS

    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                max_sequence_length=T5_TOKENS).images


def img2img_images(pipe, scenes, strength: float = 0.5, seed: int = 0, steps: int = 28, guidance: float = 4.0,
                   bar=None):
    """img2img reconstructions of held-out scenes from their fine captions (StableDiffusion3Img2ImgPipeline).
    A tqdm `bar` moves on by one per denoising step (`img2img_steps` of them)."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    from difffeat.utils.progress import step_callback
    from difffeat.zoo.mmdit import T5_TOKENS

    i2i = StableDiffusion3Img2ImgPipeline(**{k: v for k, v in pipe.components.items()
                                             if k not in ("image_encoder", "feature_extractor")})
    i2i.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(scenes))]
    hooks = {} if bar is None or bar.disable else {"callback_on_step_end": step_callback(bar)}
    return i2i([s.fine_caption for s in scenes], image=[Image.fromarray(s.image) for s in scenes], strength=strength,
               num_inference_steps=steps, guidance_scale=guidance, generator=gens, max_sequence_length=T5_TOKENS,
               **hooks).images


def evaluate_dit_quality(model: str = "mini-dit", n: int = 64, seed: int = 0, n_img2img: int = 16,
                         progress: bool = False) -> dict:
    """The conditioning check on `n` held-out scenes, and img2img PSNR at strength 0.5 (trained vs a random
    transformer). `progress` shows one bar (rate and ETA) over the (σ, draw)s of the conditioning check and the
    denoising steps of the img2img runs."""
    from tqdm.auto import tqdm

    from difffeat.zoo import load_pipeline

    pipe = load_pipeline(model)
    scenes = heldout_scenes(n, seed)
    # σ = 0.5 (t = 500 by difffeat's --t), the bar's σ (mini's SNR at t = 500) and 0.75; the functions' own
    # defaults spelled out so the progress bar can count their steps before they run.
    mid = bar_sigma()
    sigmas, draws, steps, strength = (0.5, mid, 0.75), 2, 28, 0.5
    with tqdm(total=len(sigmas) * draws + 2 * img2img_steps(steps, strength), desc="eval-mini-dit", unit="step",
              disable=not progress) as bar:
        cond = conditioning_velocity_mse(pipe, scenes, sigmas, seed=seed, draws=draws, bar=bar)
        few = scenes[:n_img2img]
        recon = [psnr(np.asarray(o), s.image)
                 for o, s in zip(img2img_images(pipe, few, strength, seed=seed, steps=steps, bar=bar), few)]
        baseline = load_pipeline("mini-dit-random")
        base = [psnr(np.asarray(o), s.image)
                for o, s in zip(img2img_images(baseline, few, strength, seed=seed, steps=steps, bar=bar), few)]
    return {
        "model": str(model),
        "n_heldout": n,
        "seed": seed,
        "conditioning_velocity_mse": cond,
        "own_below_empty": {s: 1 - v["own"] / v["empty"] for s, v in cond.items()},
        "own_below_other": {s: 1 - v["own"] / v["other"] for s, v in cond.items()},
        "bar_sigma": mid,
        "bar_met": bool(cond[str(mid)]["own"] <= 0.95 * min(cond[str(mid)]["empty"], cond[str(mid)]["other"])),
        "img2img_psnr_strength_0.5": float(np.mean(recon)),
        "img2img_psnr_random_transformer": float(np.mean(base)),
        "n_img2img": len(few),
    }


def write_mini_dit_report(run, model: str, out_dir, seed: int = 0, n: int = 8) -> dict:
    """docs/ pictures and numbers of a mini-dit run: ``mini_dit_loss.png`` (the loss curve of `run`'s
    losses.csv), ``mini_dit_samples.png`` (rows: held-out scenes, samples from their fine captions, img2img
    reconstructions at strength 0.5), ``mini_dit_samples.txt`` (the captions) and ``mini_dit_quality.json``.
    Each file is written atomically; nothing else in `out_dir` is touched."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from difffeat.spine.run import mkdir
    from difffeat.utils.atomic import atomic_path, write_atomic
    from difffeat.zoo import load_pipeline
    from difffeat.zoo.sampling import grid
    from difffeat.zoo.train_dit import read_losses

    out_dir = mkdir(out_dir)
    rows = read_losses(Path(run) / "losses.csv")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(title="mini-dit training loss (velocity MSE)", xlabel="step", ylabel="loss", yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_dir / "mini_dit_loss.png", what="loss curve") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    pipe = load_pipeline(model)
    scenes = heldout_scenes(n, seed)
    captions = [s.fine_caption for s in scenes]
    tiles = [Image.fromarray(s.image) for s in scenes] + sample_images(pipe, captions, seed=seed) + \
        img2img_images(pipe, scenes, seed=seed)
    g = grid(tiles, cols=n)
    with atomic_path(out_dir / "mini_dit_samples.png", what="sample grid") as tmp:
        g.resize((g.width * 2, g.height * 2), Image.NEAREST).save(tmp, format="PNG")
    write_atomic(out_dir / "mini_dit_samples.txt", "\n".join(captions) + "\n")
    report = evaluate_dit_quality(model, seed=seed)
    write_atomic(out_dir / "mini_dit_quality.json", json.dumps(report, indent=1) + "\n")
    return report
