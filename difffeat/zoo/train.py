"""The mini model's training recipe (`difffeat zoo train-mini`): reproduces the shipped weights from a seed.

Three stages, each resumable from the checkpoint in the run folder:

1. **VAE**: AutoencoderKL on Shapes-LT train images, L1 + MSE reconstruction plus a small KL term.
2. **Latents**: the train set encoded once (posterior mean and std), so UNet steps never run the VAE;
   the latent scaling factor is set to 1 / std of the sampled latents, as SD does.
3. **UNet + text encoder**: ε-prediction MSE under SD-1.5's scaled-linear schedule, captions 80% fine,
   10% coarse, 10% empty (so the unconditional branch of CFG works), AdamW with warm-up and cosine decay,
   EMA weights exported.

The run folder keeps `config.json`, a loss log `losses.csv` and checkpoints; `export` writes the
pipeline in diffusers format.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.atomic import atomic_path
from difffeat.data.shapes_lt import iter_scenes
from difffeat.runconfig import pin_run_config
from difffeat.zoo import mini


@dataclass
class MiniTrainConfig:
    seed: int = 0
    n_train: int = 8000  # Shapes-LT train scenes (made in memory from the seed)
    imbalance: float = 100.0
    vae_steps: int = 900
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4500
    unet_lr: float = 5e-4
    warmup: int = 200
    batch_size: int = 32
    ema_decay: float = 0.999
    p_empty: float = 0.1
    p_coarse: float = 0.1
    checkpoint_every: int = 250
    threads: int = 0  # torch threads; 0 keeps torch's default


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _log(run: Path, stage: str, step: int, loss: float, lr: float, secs: float) -> None:
    path = run / "losses.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["stage", "step", "loss", "lr", "seconds"])
        w.writerow([stage, step, f"{loss:.6f}", f"{lr:.3e}", f"{secs:.1f}"])


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:  # an interrupted save never leaves a broken checkpoint
        torch.save(obj, tmp)


def _load(path: Path):
    return torch.load(path, weights_only=False) if path.exists() else None


def _training_data(cfg: MiniTrainConfig):
    images, fine, coarse = [], [], []
    for scene in iter_scenes("train", cfg.n_train, seed=cfg.seed, imbalance=cfg.imbalance):
        images.append(scene.image)
        fine.append(scene.fine_caption)
        coarse.append(scene.coarse_caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, fine, coarse


def train_vae(cfg: MiniTrainConfig, run: Path, vae, x: torch.Tensor, log_every: int = 25) -> None:
    ckpt_path = run / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if (ck := _load(ckpt_path)) is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    vae.train()
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # batches depend only on (seed, step): resumable
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        batch = x[idx]
        lr = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps, 50)
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == cfg.vae_steps - 1:
            _log(run, "vae", step, loss.item(), lr, time.time() - t0)
            print(f"vae step {step} loss {loss.item():.4f}", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.vae_steps - 1:
            _save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt_path)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(cfg: MiniTrainConfig, run: Path, unet, text_encoder, tokenizer, scheduler,
               mean: torch.Tensor, std: torch.Tensor, scale: float, fine: list[str], coarse: list[str],
               log_every: int = 25) -> None:
    from diffusers.training_utils import EMAModel

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=cfg.ema_decay)
    ckpt_path = run / "unet.pt"
    start = 0
    if (ck := _load(ckpt_path)) is not None:
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text_encoder"])
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])
        start = ck["step"]
    ids = {
        "fine": tokenizer(fine, padding="max_length", max_length=mini.MAX_TOKENS, truncation=True,
                          return_tensors="pt").input_ids,
        "coarse": tokenizer(coarse, padding="max_length", max_length=mini.MAX_TOKENS, truncation=True,
                            return_tensors="pt").input_ids,
        "empty": tokenizer([""], padding="max_length", max_length=mini.MAX_TOKENS, return_tensors="pt").input_ids,
    }
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    gen = torch.Generator()
    t0 = time.time()
    for step in range(start, cfg.unet_steps):
        gen.manual_seed(cfg.seed * 1_000_003 + 500_000 + step)
        idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        u = torch.rand(cfg.batch_size, generator=gen)
        caption = torch.where((u < cfg.p_empty + cfg.p_coarse)[:, None], ids["coarse"][idx], ids["fine"][idx])
        tokens = torch.where((u < cfg.p_empty)[:, None], ids["empty"], caption)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        lr = cfg.unet_lr * _cosine_lr(step, cfg.unet_steps, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        cond = text_encoder(tokens).last_hidden_state
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        if step % log_every == 0 or step == cfg.unet_steps - 1:
            _log(run, "unet", step, loss.item(), lr, time.time() - t0)
            print(f"unet step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.unet_steps - 1:
            _save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                   "ema": ema.state_dict(), "step": step + 1}, ckpt_path)
    ema.copy_to(params)  # export the EMA weights
    unet.eval()
    text_encoder.eval()


def train_mini(run: str | Path, out: str | Path | None = None, cfg: MiniTrainConfig | None = None) -> Path:
    """Train the mini pipeline into `run` (resumable) and export it to `out` (default `run/pipeline`)."""
    cfg = cfg or MiniTrainConfig()
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    pin_run_config(run, asdict(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vae, text_encoder, tokenizer, unet, scheduler = mini.build_models(cfg.seed)
    x, fine, coarse = _training_data(cfg)
    print(f"{len(x)} training scenes", flush=True)
    train_vae(cfg, run, vae, x)
    mean, std = encode_latents(vae, x)
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scale)
    print(f"latent scaling factor {scale:.4f}", flush=True)
    train_unet(cfg, run, unet, text_encoder, tokenizer, scheduler, mean, std, scale, fine, coarse)
    out = Path(out) if out else run / "pipeline"
    pipe = mini.assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"exported mini pipeline to {out}", flush=True)
    return out
