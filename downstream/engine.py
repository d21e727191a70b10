"""The training engine both head trainers share: launch, batch stream, learning-rate schedule, finite
checks and checkpoint / resume of model, optimizer and RNG.

Batches are a pure function of (seed, iteration), so a resumed run and every process of a launch see the
same stream; with the RNG state restored from the checkpoint, an interrupted run ends with the weights of
an uninterrupted one. Checkpoints go through the run spine (`difffeat.spine.run.Checkpoints`): safetensors and
JSON, never pickle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from difffeat.errors import UserError
from difffeat.spine.run import CHECKPOINTS, Checkpoint, Checkpoints, load_tensors, rng_state, set_rng_state


# ------------------------------------------------------------------------------------------------ launch
def make_accelerator(**kwargs):
    """An `accelerate.Accelerator` for this launch (gloo on CPU); checks that it sees every launched process."""
    from accelerate import Accelerator

    # Without CUDA, accelerate starts the gloo (CPU) group only when asked for the CPU explicitly.
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # never let several processes write as if each were alone
        raise UserError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}; "
                        "check the launcher's flags")
    return accelerator


# ---------------------------------------------------------------------------------------- batch stream
def batch_indices(n: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """The sample indices of global batch `iteration`: epochs of seeded permutations, last partial batch dropped.

    A pure function of its arguments, so a resumed run and every process see the same stream.
    """
    size = min(batch_size, n)
    per_epoch = n // size
    epoch, pos = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * size:(pos + 1) * size].tolist()


class BatchStream(torch.utils.data.Sampler):
    """Batches `start`…`stop`−1 of the stream for process `rank` of `world` (it takes every world-th batch).

    `indices` replaces `batch_indices` when a task draws its batches otherwise (a class-aware sampler); it
    must be a pure function of the global batch number too.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1,
                 indices: Callable[[int], list[int]] | None = None):
        self.indices = indices or (lambda it: batch_indices(n, batch_size, seed, it))
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def __iter__(self):
        for it in range(self.start, self.stop):
            yield self.indices(it * self.world + self.rank)

    def __len__(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------------------------ LR schedules
def poly_factor(iteration: int, total: int, power: float = 1.0, warmup: int = 0, warmup_ratio: float = 1e-6) -> float:
    """mmseg's poly schedule with linear warm-up: lr(it) = lr · (1 − it/total)^power · warm-up factor."""
    factor = (1.0 - iteration / total) ** power
    if warmup and iteration < warmup:
        factor *= 1.0 - (1.0 - iteration / warmup) * (1.0 - warmup_ratio)
    return factor


def cosine_factor(iteration: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up over `warmup` iterations, then cosine decay to 0 at `total`."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    progress = (iteration - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------ safety
def check_finite(value: float | torch.Tensor, step: int, *, what: str = "training loss", unit: str = "iteration",
                 hint: str = "lower the learning rate or check the features for NaN/Inf") -> None:
    """Stop a run whose loss (or weights) stopped being finite, instead of training on garbage."""
    v = float(value.detach()) if torch.is_tensor(value) else float(value)
    if not math.isfinite(v):
        raise UserError(f"the {what} became {v} at {unit} {step}; {hint}")


def check_finite_parameters(model: torch.nn.Module, step: int, unit: str = "iteration") -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"parameter {name} became non-finite at {unit} {step}; lower the learning rate")


# ------------------------------------------------------------------------------------------ checkpoints
def base_optimizer(optimizer):
    """The optimizer whose state is saved: the SAM family wraps a base optimizer."""
    return getattr(optimizer, "base_optimizer", optimizer)


def save_checkpoint(checkpoints: Checkpoints, step: int, model: torch.nn.Module, optimizer=None, **extra: Any):
    """Model weights, optimizer state, RNG states and `extra` (JSON values or tensor dicts) at `step`."""
    state: dict[str, Any] = {"model": model.state_dict(), "rng": rng_state(), **extra}
    if optimizer is not None:
        state["optimizer"] = base_optimizer(optimizer).state_dict()
    return checkpoints.save(step, **state)


def load_optimizer(optimizer, checkpoint: Checkpoint) -> None:
    base = base_optimizer(optimizer)
    base.load_state_dict(checkpoint.load("optimizer"))
    if base is not optimizer:  # the SAM family shares the base optimizer's parameter groups
        optimizer.param_groups = base.param_groups


def restore_checkpoint(checkpoint: Checkpoint, model: torch.nn.Module | None = None, optimizer=None,
                       rng: bool = True) -> Mapping[str, Any]:
    """Load what `save_checkpoint` wrote into `model` / `optimizer` and the RNG; returns the checkpoint."""
    if model is not None:
        model.load_state_dict(checkpoint.load("model"))
    if optimizer is not None:
        load_optimizer(optimizer, checkpoint)
    if rng and "rng" in checkpoint:
        set_rng_state(checkpoint.load("rng"))
    return checkpoint


def load_trained_weights(run: os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights of a head-training run folder: its final `model.safetensors`, or the latest
    checkpoint's while the run is unfinished (so a stopped run can still be evaluated)."""
    from pathlib import Path

    run = Path(run)
    if (run / "model.safetensors").is_file():
        weights, _ = load_tensors(run / "model.safetensors")
        return weights
    checkpoint = Checkpoints(run / CHECKPOINTS).latest()
    if checkpoint is None:
        raise UserError(f"{run}: no trained weights yet (no model.safetensors or checkpoint)")
    return checkpoint.load("model")
