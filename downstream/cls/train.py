"""train-cls: a classification head trained on pooled stored features, then judged under label shift.

A run folder holds everything needed to judge and repeat it::

    RUN/config.json        the resolved config, classes with training counts, sources, stores, versions
    RUN/report.json        keys used per split, zero-count classes, the head / tail split of the SAM family
    RUN/checkpoints/       the latest checkpoint (model, optimizer, RNG state, history; safetensors + JSON)
    RUN/model.safetensors  the final weights;  RUN/nc.json  NC1–NC4 of the trained head on the training features
    RUN/history.json       loss and learning rate per epoch;  RUN/curves.png  their plot
    RUN/metrics.json       label-shift accuracies (with test labels);  RUN/accuracy.png  their plot

Training: SGD (or the SAM family, `objective.OPTIMIZERS`) on the method's loss (`objective.METHODS`), linear
warm-up then cosine decay per iteration; ReconBoost alternates its own phases (`reconboost.ReconBoostUpdater`);
DRAUC has its own adversary, optimizer and schedule (`drauc.DRAUCUpdater`).
Batches are a pure function of (seed, epoch, position) and nothing else draws random numbers during training,
so a resumed run ends with the weights of an uninterrupted one. Under ``accelerate launch`` (or torchrun)
process r of W takes batches r, r + W, … of each epoch's stream and the gradients are averaged
(`parallel.GradientAverager`); one process computes exactly what a plain run does.
A run is pinned to its stores (`difffeat.store.identity`: a resumed run whose store changed is refused, eval-cls
refuses features extracted otherwise), and the main process holds the run folder's lock while it trains.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from difffeat.errors import UserError
from difffeat.spine.run import ConfigError, RunFolder
from difffeat.store.identity import check_unchanged, store_record
from downstream.cls.config import ClsTrainConfig
from downstream.cls.data import ClsData, load_test_data, load_train_data
from downstream.cls.drauc import DRAUCUpdater
from downstream.cls.evaluation import TRAIN_KIND, as_tensors, evaluate, nc_metrics, save_accuracy_png
from downstream.cls.labels import some
from downstream.cls.model import ClsModel, WeightedSources
from downstream.cls.objective import HeadUpdater, Objective, tail_split
from downstream.cls.parallel import averaged_gradients
from downstream.cls.reconboost import ReconBoostUpdater
from downstream.engine import (
    batch_indices,
    check_finite,
    make_accelerator,
    restore_checkpoint,
    save_checkpoint,
    set_lr,
)
from downstream.groups import head_middle_tail
from downstream.losses import class_prior
from downstream.plots import save_curves_png

RUN_FILES = ("report.json", "model.safetensors", "nc.json", "history.json", "curves.png", "metrics.json",
             "accuracy.png")
STORE_FIELDS = ("model", "layers", "timesteps", "resolution", "techniques")


def cls_accelerator(device: str):
    """The launch's accelerator on the config's device ("auto": CUDA when present)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: no CUDA device here")
    return make_accelerator(cpu=device == "cpu" or not torch.cuda.is_available())


class EpochStream:
    """This process's batches: epoch e of the stream holds `per_epoch` seeded batches (`engine.batch_indices`),
    and process `rank` of `world` takes batches rank, rank + world, … of it (`steps` per epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.size, self.seed, self.rank, self.world = n, min(batch_size, n), seed, rank, world
        self.per_epoch = n // self.size
        self.steps = self.per_epoch // world
        if self.steps == 0:
            raise UserError(f"{n} training samples make {self.per_epoch} batches of {self.size}, fewer than the "
                            f"{world} processes; lower the batch size (batch_size, --batch-size)")

    def position(self, step: int) -> int:
        """Where this process's batch of `step` is in the epoch's stream."""
        return step * self.world + self.rank

    def batch(self, epoch: int, step: int) -> list[int]:
        return batch_indices(self.n, self.size, self.seed, epoch * self.per_epoch + self.position(step))


def train_cls(config: ClsTrainConfig, *, accelerator=None, resume: bool = False, overwrite: bool = False,
              progress: bool = True, stop_after: int | None = None) -> Path:
    """Train a head on pooled features; returns the run folder (see the module doc for what it holds).

    `stop_after` ends this call after that many epochs (a checkpoint is written): call again with
    `resume=True` to go on.
    """
    config = config.resolve()
    accelerator = accelerator or cls_accelerator(config.device)
    if config.method == "drauc" and accelerator.num_processes > 1:
        raise UserError("method drauc trains in one process (its batch means and dual variables are per process); "
                        "launch it without torchrun / accelerate")
    run = RunFolder(config.out, TRAIN_KIND, config, resume=resume, overwrite=overwrite, owned=(*RUN_FILES, "eval-*"))
    train, test, counts, tail, report = _load_data(config)
    if run.continuing:  # a resumed run trains on the very stores it began on (same features, same shards)
        check_unchanged((run.saved() or {}).get("stores"), config.features, run.path)
    accelerator.wait_for_everyone()  # every process has looked before the main one changes anything
    lock = run.lock() if accelerator.is_main_process else None  # one process trains this run at a time
    try:
        if accelerator.is_main_process:
            _create_run(run, config, train, counts, report)
        accelerator.wait_for_everyone()
        return _train(run, config, train, test, counts, tail, accelerator, progress, stop_after)
    finally:
        if lock is not None:
            lock.release()


def _train(run: RunFolder, config: ClsTrainConfig, train: ClsData, test: ClsData | None, counts: np.ndarray,
           tail: list[int], accelerator, progress: bool, stop_after: int | None) -> Path:
    """The training loop of `train_cls`, in its created (or continued) run folder."""
    device, world = accelerator.device, accelerator.num_processes
    torch.manual_seed(config.seed)
    model = ClsModel([s.dim for s in train.specs], train.num_classes, config).to(device)
    blocks, labels = as_tensors(train, device)
    model.norm.fit(blocks)
    stream = EpochStream(len(train), config.batch_size, config.seed, accelerator.process_index, world)
    sum_across = (lambda t: accelerator.reduce(t, "sum")) if world > 1 else None
    objective = Objective(config, counts, stream.per_epoch, device, sum_across)
    updater = _updater(model, config, objective, tail, counts, len(blocks), device, world)
    start, history = 0, []
    checkpoint = run.checkpoints.latest() if run.continuing else None
    if checkpoint is not None:
        start, history = checkpoint.step, list(checkpoint.load("history"))
        restore_checkpoint(checkpoint, model)
        updater.restore(checkpoint)
    stop = config.epochs if stop_after is None else min(config.epochs, start + stop_after)

    total, warmup = config.epochs * stream.steps, config.warmup_epochs * stream.steps
    model.train()
    bar = tqdm(total=config.epochs, initial=start, desc="train-cls", unit="epoch",
               disable=not progress or not accelerator.is_main_process)
    with averaged_gradients(model, world):
        for epoch in range(start, stop):
            objective.set_epoch(epoch)
            updater.start_epoch(epoch)
            losses = []
            for i in range(stream.steps):
                idx = torch.as_tensor(stream.batch(epoch, i), device=device)
                set_lr(updater.optimizer, updater.learning_rate(epoch, epoch * stream.steps + i, total, warmup))
                objective.set_iteration(stream.position(i))
                losses.append(float(updater.step([b[idx] for b in blocks], labels[idx]).detach()))
            updater.end_epoch()
            loss = _mean_over_processes(losses, accelerator)
            check_finite(loss, epoch + 1, unit="epoch", hint="lower the learning rate (lr, --lr)")
            history.append({"epoch": epoch + 1, "iteration": (epoch + 1) * stream.steps, "loss": loss,
                            "lr": float(updater.optimizer.param_groups[0]["lr"])})
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == stop:
                if accelerator.is_main_process:
                    save_checkpoint(run.checkpoints, epoch + 1, model, updater.optimizer, optimizer_key=updater.key,
                                    history=history, **updater.state())
                accelerator.wait_for_everyone()
    bar.close()
    if stop == config.epochs and accelerator.is_main_process:
        _finish(run, config, model, train, test, counts, blocks, labels, history, device)
    accelerator.wait_for_everyone()
    return run.path


def _mean_over_processes(losses: list[float], accelerator) -> float:
    """The epoch's mean batch loss (over every process's batches)."""
    if accelerator.num_processes == 1:
        return float(np.mean(losses))
    return float(accelerator.reduce(torch.tensor(np.mean(losses), device=accelerator.device), "mean"))


def _load_data(config: ClsTrainConfig) -> tuple[ClsData, ClsData | None, np.ndarray, list[int], dict]:
    """Training and test splits, training class counts, the tail classes of the SAM family, and the report."""
    train = load_train_data(config)
    counts = train.counts()
    zero = [train.names[c] for c in np.flatnonzero(counts == 0)]
    if zero:
        warnings.warn(f"{config.labels}: classes {some(zero)} have no training samples; their prior is floored",
                      stacklevel=3)
    _warn_spelled_alike(config, train.names, counts)
    if config.method == "tkpr" and config.tkpr_k > train.num_classes - 1:
        raise ConfigError("tkpr_k", f"must be ≤ {train.num_classes - 1} (the other classes of the "
                                    f"{train.num_classes} there are: each sample ranks its class above the top K of "
                                    f"them), got {config.tkpr_k}")
    test = load_test_data(config, train)
    eta, tail = tail_split(config, counts)
    report = {"train": {**train.report, "images": len(train)}, "test": test.report if test is not None else None,
              "zero_count_classes": zero, "tail_eta": eta, "tail_classes": [train.names[c] for c in tail]}
    return train, test, counts, tail, report


def _warn_spelled_alike(config: ClsTrainConfig, names: list[str], counts: np.ndarray) -> None:
    """Classes come from the labels as written: a class of one sample spelled like another (``cirlce`` beside
    ``circle``) is most likely a typo, said once, since it becomes a class of its own."""
    import difflib

    if config.classes is not None:  # the classes were listed: a label outside them is refused anyway
        return
    for c in np.flatnonzero(counts == 1):
        name = str(names[c])
        alike = difflib.get_close_matches(name, [str(n) for n in names if n != names[c]], n=1, cutoff=0.8)
        if alike and not name.isdigit():
            warnings.warn(f"{config.labels}: class {name!r} has one training sample and is spelled like "
                          f"{alike[0]!r}; a typo in the labels? (each label as written is a class)", stacklevel=4)


def _create_run(run: RunFolder, config: ClsTrainConfig, train: ClsData, counts: np.ndarray, report: dict) -> None:
    """Make the run folder; a new run also records its classes, sources and stores, and the data report."""
    groups = head_middle_tail(train.names, counts.tolist())
    stores = [store_record(p, STORE_FIELDS) for p in config.features]  # with their identity: resume / eval check it
    run.extra = {"classes": {"names": train.names, "train_counts": counts.tolist(), "groups": groups,
                             "prior": class_prior(counts).tolist()},
                 "sources": [s.to_dict() for s in train.specs], "stores": stores}
    run.create()
    if not run.continuing:
        run.write_json("report.json", report)


def _updater(model: ClsModel, config: ClsTrainConfig, objective: Objective, tail: list[int], counts: np.ndarray,
             num_sources: int, device: torch.device, world: int = 1):
    """ReconBoost's phased optimizers, DRAUC's step, or one optimizer for the run."""
    if config.method == "drauc":
        return DRAUCUpdater(model, config, objective, world)
    if config.fusion != "reconboost":
        return HeadUpdater(model, config, objective, tail)
    adjust = config.tau * torch.log(class_prior(counts)).float().to(device) if config.method == "la" else None
    return ReconBoostUpdater(model, config.reconboost_config(), num_sources, adjust)


def _finish(run: RunFolder, config: ClsTrainConfig, model: ClsModel, train: ClsData, test: ClsData | None,
            counts: np.ndarray, blocks, labels, history: list[dict], device: torch.device) -> None:
    """The final weights, history, NC metrics and (with a test split) the label-shift evaluation."""
    model.eval()
    run.save_tensors("model.safetensors", model.state_dict())
    run.write_json("history.json", history)
    save_curves_png(history, run.file("curves.png"))
    nc = nc_metrics(model, blocks, labels, head_middle_tail(train.names, counts.tolist()), train.names)
    if isinstance(model.fuse, WeightedSources):
        nc["source_weights"] = dict(zip([s.name for s in train.specs], model.fuse.source_weights()))
    run.write_json("nc.json", nc)
    if test is not None:
        metrics = evaluate(model, test, counts, config, device)
        metrics.update({"split": config.test_split, "labels": config.test_labels or config.labels,
                        "features": config.features, "nc": nc})
        run.write_json("metrics.json", metrics)
        save_accuracy_png(metrics, run.file("accuracy.png"), title=f"{config.method} ({run.path.name})")
