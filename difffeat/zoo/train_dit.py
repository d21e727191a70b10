"""The mini-dit model's training recipe (`difffeat zoo train-mini-dit RUN`): reproduces the shipped weights from a seed.

The VAE and the CLIP text encoder are mini's, frozen (`difffeat.zoo.mmdit`); only the SD3 transformer learns:

1. **Latents**: the Shapes-LT train set encoded once by mini's VAE (posterior mean and std, kept in the run
   folder as ``latents.safetensors``), so steps never run the VAE; each step samples from the posterior.
2. **Transformer**: rectified flow as SD3 trains it: ``z_σ = (1 − σ)·z0 + σ·ε`` with σ drawn logit-normal
   (``σ = sigmoid(m + s·n)``, n ~ N(0, 1): mid noise levels most often), timestep ``1000·σ``, loss
   ``‖v̂ − (ε − z0)‖²`` (mean over elements). Captions 80 % fine, 10 % coarse, 10 % empty (for classifier-free
   guidance and unconditional extraction), embedded exactly as the pipeline embeds them when it generates.
   AdamW with warm-up and cosine decay, gradient clipping, EMA weights exported.

Batches depend only on (seed, step); checkpoints (`difffeat.spine.run.Checkpoints`: safetensors and JSON, never a
pickle) are written every `checkpoint_every` steps, so an interrupted run resumes to the same weights. The run
folder (`difffeat.spine.run.RunFolder`, kind "mini-dit") holds `config.json`, the loss log `losses.csv` (steps done,
mean loss since the previous row, learning rate, seconds) and the export `pipeline/` (diffusers format, safetensors).

This module imports torch only when training runs, so the command line builds its parser without it.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import Config, ConfigError, RunFolder, check_new_folder, is_inside, option
from difffeat.utils.atomic import write_atomic

KIND = "mini-dit"
LOSSES = "losses.csv"
LATENTS = "latents.safetensors"


@dataclass
class MiniDitTrainConfig(Config):
    """The mini-dit recipe; written to the run's `config.json`, and a run resumes only under the same one."""

    seed: int = option(0, min=0)
    n_train: int = option(4000, min=1, help="Shapes-LT train scenes (made in memory from the seed)")
    imbalance: float = option(100.0, min=1)
    steps: int = option(6000, min=1, help="optimizer steps")
    lr: float = option(7e-4, above=0)
    warmup: int = option(50, min=0)
    batch_size: int = option(16, min=1)
    weight_decay: float = option(0.01, min=0)
    ema_decay: float = option(0.995, min=0, max=1)
    p_empty: float = option(0.1, min=0, max=1)
    p_coarse: float = option(0.1, min=0, max=1)
    logit_mean: float = option(0.0, help="mean of the logit-normal noise-level distribution")
    logit_std: float = option(1.0, above=0, help="spread of the logit-normal noise-level distribution")
    checkpoint_every: int = option(50, min=1)
    log_every: int = option(10, min=1, help="steps per row of losses.csv (the row holds their mean loss)")
    threads: int = option(0, min=0, help="torch threads (0: torch's default); does not change the weights")

    def check(self) -> None:
        if self.p_empty + self.p_coarse > 1:
            raise ConfigError("p_coarse", f"p_empty + p_coarse must be ≤ 1, got {self.p_empty + self.p_coarse}")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0.1 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def read_losses(path: str | Path) -> list[dict]:
    """The rows of a run's `losses.csv` as dicts of numbers."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class LossLog:
    """`losses.csv` of a run: rows appended as training goes; on resume, rows past the checkpoint are dropped
    (they are computed again, identically)."""

    FIELDS = ("step", "loss", "lr", "seconds")

    def __init__(self, path: Path, start: int):
        self.path = path
        rows = [r for r in read_losses(path) if r["step"] <= start] if path.exists() else []
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.FIELDS)
        for r in rows:
            w.writerow(self._cells(r))
        write_atomic(path, buf.getvalue())

    @staticmethod
    def _cells(r: dict) -> list[str]:
        return [str(int(r["step"])), f"{r['loss']:.6f}", f"{r['lr']:.3e}", f"{r['seconds']:.1f}"]

    def add(self, step: int, loss: float, lr: float, seconds: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(self._cells(dict(step=step, loss=loss, lr=lr, seconds=seconds)))


def _ema_state(ema) -> tuple[dict, dict]:
    """An `EMAModel` state as (tensors, JSON values): shadow weights by position, the rest as numbers."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    state.pop("collected_params", None)  # only set between store() and restore(), never at a checkpoint
    return {str(i): t for i, t in enumerate(shadow)}, state


def _latents(folder: RunFolder, vae, x):
    """(posterior mean, std) of the train images under the frozen VAE; encoded once, then read from the run."""
    from difffeat.spine.run import load_tensors
    from difffeat.zoo.train import encode_latents

    path = folder.file(LATENTS)
    if path.exists():
        tensors, _ = load_tensors(path)
        if tensors["mean"].shape[0] == len(x):
            return tensors["mean"], tensors["std"]
    mean, std = encode_latents(vae, x)
    folder.save_tensors(LATENTS, {"mean": mean, "std": std})
    # Train on what was written, in a fresh run as in a resumed one: tensors read back from the file and those
    # just computed hold the same numbers, yet the kernels fed by them did not round identically (1e-8 apart).
    tensors, _ = load_tensors(path)
    return tensors["mean"], tensors["std"]


class _Stop(Exception):
    """`stop_after` reached: the call ends as an interruption would, after a checkpoint."""


def train_mini_dit(run: str | Path, out: str | Path | None = None, cfg: MiniDitTrainConfig | None = None,
                   stop_after: int | None = None, progress: bool = False) -> Path | None:
    """Train the mini-dit transformer into `run` (resumable) and export the pipeline to `out` (default
    `run/pipeline`). `stop_after` ends this call after that many steps, with a checkpoint, as an interruption
    would; training the run again goes on from there. Returns the export folder (None when stopped).
    `progress` shows a bar (rate and ETA); the last line printed sums the call up."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from difffeat.utils.progress import Stopwatch, log_line
    from difffeat.zoo import mmdit
    from difffeat.zoo.train import training_data

    watch = Stopwatch()  # model building included: the summary says how long the call took
    cfg = (cfg or MiniDitTrainConfig()).validate()
    if out is not None and not is_inside(out, run):
        check_new_folder(out, "export")
    folder = RunFolder(run, KIND, cfg, resume=True, owned=(LOSSES, LATENTS, "pipeline"), ignore=("threads",))
    folder.create()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vae, text_encoder, tokenizer = mmdit.mini_parts()
    transformer = mmdit.build_transformer(cfg.seed)
    pipe = mmdit.assemble_pipeline(vae, text_encoder, tokenizer, transformer, mmdit.build_scheduler())
    x, fine, coarse = training_data(cfg)
    mean, std = _latents(folder, vae, x)
    del x
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    print(f"{len(mean)} training scenes, latents {tuple(mean.shape[1:])}", flush=True)

    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay)
    checkpoints = folder.checkpoints
    start = 0
    if (ck := checkpoints.latest()) is not None:
        transformer.load_state_dict(ck.load("transformer"))
        opt.load_state_dict(ck.load("optimizer"))
        shadow, state = ck.load("ema")
        ema.load_state_dict({**state, "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        start = ck.step
        print(f"resuming at step {start}", flush=True)
    log = LossLog(folder.file(LOSSES), start)
    transformer.train()
    gen = torch.Generator()
    t0, window = time.time(), []
    left = stop_after
    with tqdm(total=cfg.steps, initial=start, desc="train-mini-dit", unit="it", disable=not progress) as bar:
        for step in range(start, cfg.steps):
            gen.manual_seed(cfg.seed * 1_000_003 + step)  # batches depend only on (seed, step): resumable
            idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scale
            u = torch.rand(cfg.batch_size, generator=gen).tolist()
            captions = ["" if v < cfg.p_empty else coarse[i] if v < cfg.p_empty + cfg.p_coarse else fine[i]
                        for v, i in zip(u, idx.tolist())]
            noise = torch.randn(z0.shape, generator=gen)
            sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(cfg.batch_size, generator=gen))
            s = sigma.view(-1, 1, 1, 1)
            zt = (1 - s) * z0 + s * noise
            embeds, pooled = mmdit.encode_text(pipe, captions)
            lr = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            pred = transformer(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled).sample
            loss = F.mse_loss(pred, noise - z0)
            if not torch.isfinite(loss):
                raise UserError(f"the mini-dit training loss became {loss.item()} at step {step}; "
                                "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.step(params)
            window.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
                log.add(step + 1, sum(window) / len(window), lr, time.time() - t0)
                log_line(f"step {step + 1}/{cfg.steps} loss {sum(window) / len(window):.4f} ({time.time() - t0:.0f}s)")
                window = []
            bar.update(1)
            left = None if left is None else left - 1
            if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1 or left == 0:
                checkpoints.save(step + 1, transformer=transformer.state_dict(), optimizer=opt.state_dict(),
                                 ema=_ema_state(ema))
            if left == 0 and step < cfg.steps - 1:
                bar.close()
                done = step + 1 - start
                print(watch.finish_line(f"train-mini-dit: stopped after {done} steps to {folder.path} (train again "
                                        "to go on)", count=done, unit="it"), flush=True)
                return None
    ema.copy_to(params)  # export the EMA weights
    transformer.eval()
    out = Path(out) if out else folder.path / "pipeline"
    mmdit.save_pipeline(pipe, out)
    print(f"exported mini-dit pipeline to {out}", flush=True)
    done = cfg.steps - start
    print(watch.finish_line(f"train-mini-dit: {done} steps to {folder.path} ({LOSSES}, checkpoints/, pipeline "
                            f"{out})", count=done, unit="it"), flush=True)
    return out
