"""The mini model's training recipe (`difffeat zoo train-mini`): reproduces the shipped weights from a seed.

Three stages, each resumable from the checkpoint in the run folder:

1. **VAE**: AutoencoderKL on Shapes-LT train images, L1 + MSE reconstruction plus a small KL term.
2. **Latents**: the train set encoded once (posterior mean and std), so UNet steps never run the VAE;
   the latent scaling factor is set to 1 / std of the sampled latents, as SD does.
3. **UNet + text encoder**: ε-prediction MSE under SD-1.5's scaled-linear schedule, captions 80% fine,
   10% coarse, 10% empty (so the unconditional branch of CFG works), AdamW with warm-up and cosine decay,
   EMA weights exported.

The run folder is a run folder of the spine (`difffeat.spine.run.RunFolder`, kind "mini"): `config.json` (the
config, its hash, library versions), a loss log `losses.csv`, and checkpoints per stage under
`checkpoints/vae` and `checkpoints/unet` (`difffeat.spine.run.Checkpoints`: safetensors and JSON, never a pickle).
Training the same run folder again resumes it. The pipeline is exported in diffusers format.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.data.shapes_lt import iter_scenes
from difffeat.errors import UserError
from difffeat.spine.run import Checkpoints, start_model_training
from difffeat.utils.progress import Stopwatch, log_line
from difffeat.zoo import mini
from difffeat.zoo.recipe_config import MiniTrainConfig

KIND = "mini"
LEGACY_CHECKPOINTS = ("vae.pt", "unet.pt")  # pickles of older versions: refused, never loaded


class _Stop(Exception):
    """`stop_after` reached: the run ends as an interrupted one would, after a checkpoint."""


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


class _Budget:
    """Optimizer steps this call may still take (`stop_after`; None: no limit), and those it took (`spent`)."""

    def __init__(self, steps: int | None):
        self.left = steps
        self.spent = 0

    def spend(self) -> bool:
        """Count one step; True when it was the last one allowed."""
        self.spent += 1
        if self.left is None:
            return False
        self.left -= 1
        return self.left <= 0


def _check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise UserError(f"the {stage} training loss became {loss.item()} at step {step}; lower the learning rate")


def training_data(cfg) -> tuple[torch.Tensor, list[str], list[str]]:
    """The recipe's training scenes (a config with `n_train`, `seed`, `imbalance`): images in [-1, 1]
    [N, 3, 64, 64], their fine and their coarse captions; shared by mini and mini-dit."""
    images, fine, coarse = [], [], []
    for scene in iter_scenes("train", cfg.n_train, seed=cfg.seed, imbalance=cfg.imbalance):
        images.append(scene.image)
        fine.append(scene.fine_caption)
        coarse.append(scene.coarse_caption)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, fine, coarse


def train_vae(cfg: MiniTrainConfig, run: Path, vae, x: torch.Tensor, log_every: int = 25,
              budget: _Budget | None = None, progress: bool = False) -> None:
    from tqdm.auto import tqdm

    checkpoints = Checkpoints(run / "checkpoints" / "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if (ck := checkpoints.latest()) is not None:
        vae.load_state_dict(ck.load("model"))
        opt.load_state_dict(ck.load("optimizer"))
        start = ck.step
    budget = budget or _Budget(None)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    vae.train()
    t0 = time.time()
    # The bar only watches (rate and ETA on stderr); `with` closes it when `_Stop` ends the stage early.
    with tqdm(total=cfg.vae_steps, initial=start, desc="train-mini vae", unit="it", disable=not progress) as bar:
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
            _check_finite(loss, "VAE", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == cfg.vae_steps - 1:
                _log(run, "vae", step, loss.item(), lr, time.time() - t0)
                log_line(f"vae step {step} loss {loss.item():.4f}")
            bar.update(1)
            last = budget.spend()
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.vae_steps - 1 or last:
                checkpoints.save(step + 1, model=vae.state_dict(), optimizer=opt.state_dict())
            if last:
                raise _Stop
    vae.eval()


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _ema_state(ema) -> tuple[dict[str, torch.Tensor], dict]:
    """An `EMAModel` state as (tensors, JSON values): its shadow weights by position, the rest as numbers."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    state.pop("collected_params", None)  # only set between store() and restore(), never at a checkpoint
    return {str(i): t for i, t in enumerate(shadow)}, state


def train_unet(cfg: MiniTrainConfig, run: Path, unet, text_encoder, tokenizer, scheduler,
               mean: torch.Tensor, std: torch.Tensor, scale: float, fine: list[str], coarse: list[str],
               log_every: int = 25, budget: _Budget | None = None, progress: bool = False) -> None:
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=cfg.ema_decay)
    checkpoints = Checkpoints(run / "checkpoints" / "unet")
    start = 0
    if (ck := checkpoints.latest()) is not None:
        unet.load_state_dict(ck.load("unet"))
        text_encoder.load_state_dict(ck.load("text_encoder"))
        opt.load_state_dict(ck.load("optimizer"))
        shadow, state = ck.load("ema")
        ema.load_state_dict({**state, "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        start = ck.step
    budget = budget or _Budget(None)
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
    with tqdm(total=cfg.unet_steps, initial=start, desc="train-mini unet", unit="it", disable=not progress) as bar:
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
            _check_finite(loss, "UNet", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.step(params)
            if step % log_every == 0 or step == cfg.unet_steps - 1:
                _log(run, "unet", step, loss.item(), lr, time.time() - t0)
                log_line(f"unet step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
            bar.update(1)
            last = budget.spend()
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.unet_steps - 1 or last:
                checkpoints.save(step + 1, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(),
                                 optimizer=opt.state_dict(), ema=_ema_state(ema))
            if last:
                raise _Stop
    ema.copy_to(params)  # export the EMA weights
    unet.eval()
    text_encoder.eval()


def train_mini(run: str | Path, out: str | Path | None = None, cfg: MiniTrainConfig | None = None,
               stop_after: int | None = None, progress: bool = False) -> Path | None:
    """Train the mini pipeline into `run` (resumable) and export it to `out` (default `run/pipeline`).

    `stop_after` ends this call after that many optimizer steps (both stages counted), with a checkpoint, as
    an interruption would; training the run again goes on from there. Returns the export folder (None when
    stopped). `progress` shows a bar per stage (rate and ETA); the last line printed sums the call up."""
    watch = Stopwatch()  # model building included: the summary says how long the call took
    cfg = (cfg or MiniTrainConfig()).validate()
    folder = start_model_training(run, out, KIND, cfg, ("losses.csv", "pipeline"), LEGACY_CHECKPOINTS)
    run = folder.path
    vae, text_encoder, tokenizer, unet, scheduler = mini.build_models(cfg.seed)
    x, fine, coarse = training_data(cfg)
    print(f"{len(x)} training scenes", flush=True)
    budget = _Budget(stop_after)

    def stopped() -> None:
        print(watch.finish_line(f"train-mini: stopped after {budget.spent} steps to {run} (train again to go on)",
                                count=budget.spent, unit="it"), flush=True)

    try:
        train_vae(cfg, run, vae, x, budget=budget, progress=progress)
    except _Stop:
        stopped()
        return None
    mean, std = encode_latents(vae, x)
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scale)
    print(f"latent scaling factor {scale:.4f}", flush=True)
    try:
        train_unet(cfg, run, unet, text_encoder, tokenizer, scheduler, mean, std, scale, fine, coarse, budget=budget,
                   progress=progress)
    except _Stop:
        stopped()
        return None
    out = Path(out) if out else run / "pipeline"
    pipe = mini.assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"exported mini pipeline to {out}", flush=True)
    print(watch.finish_line(f"train-mini: {budget.spent} steps to {run} (losses.csv, checkpoints/, pipeline {out})",
                            count=budget.spent, unit="it"), flush=True)
    return out
