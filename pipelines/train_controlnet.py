"""Recipe for the mini model's canny ControlNet (`difffeat zoo train-controlnet RUN`).

`ControlNetModel.from_unet` copies the frozen mini UNet's encoder; only the copy and its zero
convolutions train, on Shapes-LT train scenes with their canny maps (OpenCV, 100 / 200) as control
images. Loss: ε-prediction MSE of the frozen UNet with the ControlNet residuals added, t uniform over
the 1000 training steps. Half of the captions are dropped to the empty prompt so the ControlNet learns
to read the control image rather than lean on the text (the ControlNet paper drops 50%).

RUN is a run folder of the spine (`difffeat.spine.run.RunFolder`, kind "controlnet"): `config.json`, `losses.csv`
and checkpoints (`difffeat.spine.run.Checkpoints`: safetensors and JSON, never a pickle). Training it again resumes
from the last checkpoint; batches depend only on (seed, step), so a resumed run ends with the same weights as
an uninterrupted one. `export` writes a diffusers ControlNetModel folder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from difffeat.spine.run import start_model_training
from pipelines.recipe_config import ControlNetTrainConfig

KIND = "controlnet"
LEGACY_CHECKPOINTS = ("controlnet.pt",)  # the pickle of older versions: refused, never loaded


def conditioning_channels_for(vae_scale_factor: int, widths=(16, 32, 96, 256)) -> tuple[int, ...]:
    """Conditioning-embedding widths whose stride equals the VAE's (each entry after the first halves H, W)."""
    n = int(round(math.log2(vae_scale_factor))) + 1
    if 2 ** (n - 1) != vae_scale_factor or n > len(widths):
        raise UserError(f"no ControlNet conditioning embedding for a VAE scale factor of {vae_scale_factor}")
    return tuple(widths[:n])


def _lr(step: int, cfg: ControlNetTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def _training_data(pipe, cfg: ControlNetTrainConfig):
    from difffeat.data.shapes_lt import iter_scenes
    from pipelines.canny import canny_map

    images, controls, captions = [], [], []
    for scene in iter_scenes("train", cfg.n_train, seed=cfg.seed):
        images.append(scene.image)
        controls.append(canny_map(scene.image, cfg.low, cfg.high))
        captions.append(scene.fine_caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    control = torch.from_numpy(np.stack(controls)).permute(0, 3, 1, 2).float() / 255.0
    means, stds = [], []
    for i in range(0, len(x), 256):
        post = pipe.vae.encode(x[i : i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    tokens = pipe.tokenizer(captions + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    embeds = torch.cat([pipe.text_encoder(tokens[i : i + 512]).last_hidden_state for i in range(0, len(tokens), 512)])
    return torch.cat(means), torch.cat(stds), control, embeds[:-1], embeds[-1]


def train_controlnet(run: str | Path, out: str | Path | None = None, cfg: ControlNetTrainConfig | None = None,
                     log_every: int = 25, progress: bool = False) -> Path:
    """Train the canny ControlNet into `run` (resumable) and export it to `out` (default `run/controlnet`).
    `progress` shows a bar (rate and ETA); the last line printed sums the call up."""
    from diffusers import ControlNetModel
    from tqdm.auto import tqdm

    from difffeat import load_pipeline
    from difffeat.models.layers import vae_scale_factor
    from difffeat.utils.progress import Stopwatch, log_line

    watch = Stopwatch()  # model loading included: the summary says how long the call took
    cfg = (cfg or ControlNetTrainConfig()).validate()
    folder = start_model_training(run, out, KIND, cfg, ("losses.csv", "controlnet"), LEGACY_CHECKPOINTS)
    run = folder.path
    pipe = load_pipeline(cfg.model)
    unet = pipe.unet.requires_grad_(False).eval()
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_channels_for(vae_scale_factor(pipe)))
    mean, std, control, embeds, empty = _training_data(pipe, cfg)
    scale = pipe.vae.config.scaling_factor
    print(f"{len(mean)} training scenes; ControlNet {sum(p.numel() for p in controlnet.parameters()):,} params",
          flush=True)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    start = 0
    if (ck := folder.checkpoints.latest()) is not None:
        controlnet.load_state_dict(ck.load("model"))
        opt.load_state_dict(ck.load("optimizer"))
        start = ck.step
    alphas = pipe.scheduler.alphas_cumprod
    controlnet.train()
    gen = torch.Generator()
    t0 = time.time()
    log = run / "losses.csv"
    if not log.exists():
        log.write_text("step,loss,lr,seconds\n")
    with tqdm(total=cfg.steps, initial=start, desc="controlnet", unit="it", disable=not progress) as bar:
        for step in range(start, cfg.steps):
            gen.manual_seed(cfg.seed * 1_000_003 + 700_000 + step)  # batches depend only on (seed, step)
            idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.p_empty
            cond = torch.where(drop[:, None, None], empty, embeds[idx])
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            lr = _lr(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            down, mid = controlnet(zt, t, cond, controlnet_cond=control[idx], return_dict=False)
            pred = unet(zt, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            loss = F.mse_loss(pred, noise)
            if not torch.isfinite(loss):
                raise UserError(f"the ControlNet training loss became {loss.item()} at step {step}; "
                                "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
            opt.step()
            if step % log_every == 0 or step == cfg.steps - 1:
                with open(log, "a") as f:
                    f.write(f"{step},{loss.item():.6f},{lr:.3e},{time.time() - t0:.1f}\n")
                log_line(f"controlnet step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
                folder.checkpoints.save(step + 1, model=controlnet.state_dict(), optimizer=opt.state_dict())
    out = Path(out) if out else run / "controlnet"
    controlnet.eval()
    controlnet.save_pretrained(out, safe_serialization=True)
    print(f"exported ControlNet to {out} (use it as --technique controlnet:{out})", flush=True)
    done = max(0, cfg.steps - start)
    print(watch.finish_line(f"controlnet train: {done} steps to {run} (losses.csv, checkpoints/, ControlNet {out})",
                            count=done, unit="it"), flush=True)
    return out


if __name__ == "__main__":  # python -m pipelines.train_controlnet RUN [STEPS]
    import sys

    steps = int(sys.argv[2]) if len(sys.argv) > 2 else ControlNetTrainConfig.steps
    train_controlnet(sys.argv[1], cfg=ControlNetTrainConfig(steps=steps))
