"""Training of a segmentation head on stored features (`difffeat train-seg`).

A run folder holds everything needed to judge and repeat it::

    RUN/config.json        the resolved config, classes (with groups), feature specs, stores, versions
    RUN/report.json        the data report: keys used, keys skipped (no mask, mask file missing, not in every
                           store), resized masks
    RUN/checkpoints/       the latest checkpoint (model, optimizer, memory bank, RNG states, history)
    RUN/model.safetensors  the final weights
    RUN/history.json       logged losses, learning rate, validation scores;  RUN/curves.png  their plot
    RUN/metrics.json       validation scores (with --val-split); RUN/confusion.png  its confusion matrix
    RUN/amalgamation.*     weighted / amalgamate: the learned variant weights (safetensors) and their picture
    RUN/status.json        why the last call stopped before the end (a diverged loss, non-finite features)

AdamW with a poly schedule (optional linear warm-up), as AUCSeg trains; iteration-based. The same code runs
on a CPU or under `accelerate launch` on GPUs (`downstream.engine`): each process takes every n-th batch of
one seeded batch stream (so a resumed run continues the same stream) and keeps its own memory bank. An
interrupted run continues from its latest checkpoint with `resume=True` and, on one process, ends with the
same weights as an uninterrupted one. A loss that stops being finite ends the run with one clear error.

A run is pinned to its stores: config.json records each store's identity (`difffeat.store.identity`), and a resumed
run whose store changed since (another config, other shards) is refused. One process trains a run at a time: the
main process holds the run folder's lock (`RunFolder.lock`) until it returns.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from difffeat.errors import UserError
from difffeat.spine.run import RunFolder, utc_now
from difffeat.store.feature_store import FeatureStore
from difffeat.store.identity import check_unchanged, store_record
from downstream.engine import (
    BatchStream,
    check_finite,
    check_finite_parameters,
    make_accelerator,
    poly_factor,
    restore_checkpoint,
    save_checkpoint,
    set_lr,
)
from downstream.plots import save_curves_png
from downstream.seg.amalgamate import variant_names
from downstream.seg.amalgamation_report import write_amalgamation_report
from downstream.seg.config import SegTrainConfig
from downstream.seg.data import SegDataset, collate
from downstream.seg.evaluate import evaluate, write_scores
from downstream.seg.model import SegModel
from downstream.seg.objective import build_objective
from downstream.seg.profile import check_profile_classes, check_tail_classes, listed_tail_scores
from downstream.seg.sampler import batch_indices_for
from downstream.seg.targets import resolve_seg_classes

KIND = "train-seg"
STATUS = "status.json"  # why the last call stopped before the end (a diverged loss, NaN features), for the report
RUN_FILES = ("report.json", "model.safetensors", "history.json", "curves.png", "metrics.json", "confusion.png",
             "eval-*", "amalgamation.safetensors", "amalgamation.png", STATUS)
STORE_FIELDS = ("model", "layers", "timesteps", "resolution", "techniques")
SPLIT_NAMES = {"train", "val", "validation", "test"}


def load_data(config: SegTrainConfig) -> tuple[SegDataset, SegDataset | None]:
    """The training set (its classes carry the training pixel counts and the grouping) and the validation set."""
    masks = config.data or config.masks  # None: the data set the store was extracted from
    stores = [FeatureStore(p) for p in config.features]
    for store in stores[1:]:  # variants are the same images seen otherwise: stores of other images share no key
        if not set(store.keys()) & set(stores[0].keys()):
            raise UserError(f"{store.path} and {stores[0].path} share no image key (first keys: "
                            f"{store.keys()[:1]} and {stores[0].keys()[:1]}); --features takes stores of the same "
                            "images (one per variant)")
    classes = resolve_seg_classes(config.classes, masks, stores[0], config.split)
    train = SegDataset(config.features, masks, classes, split=config.split, layers=config.layers,
                       mask_size=config.mask_size, cache_bytes=config.cache_bytes)
    train.classes = classes.with_counts(classes.pixel_counts or train.pixel_counts.tolist())
    splits = {k.split("/", 1)[0] for k in train.keys} & SPLIT_NAMES
    if config.split is None and len(splits) > 1:
        warnings.warn(f"training on the keys of several splits ({', '.join(sorted(splits))}); pass --split train "
                      "to hold the others out", stacklevel=3)
    val = None
    if config.val_split:
        val = SegDataset(config.features, masks, train.classes, split=config.val_split, layers=config.layers,
                         mask_size=config.mask_size, cache_bytes=config.cache_bytes)
    return train, val


def run_record(train: SegDataset) -> dict:
    """What config.json keeps beside the config: classes, feature specs, mask size and the stores used, each with its
    identity (`difffeat.store.identity`: which features, which shards), which --resume, eval-seg and report check."""
    stores = [store_record(s.path, STORE_FIELDS) for s in train.stores]
    return {"classes": train.classes.to_dict(), "specs": [s.to_dict() for s in train.specs],
            "variants": variant_names(train.specs), "mask_size": list(train.mask_size), "stores": stores}


def warn_same_stores(records: list[dict]) -> None:
    """Stores holding the very same features (one store given twice, or a copy) count as variants of their own:
    said, since it is rarely meant."""
    seen: dict[tuple, str] = {}
    for r in records:
        key = (r["features_hash"], r["shards_digest"])
        if key in seen:
            warnings.warn(f"--features: {r['path']} holds the same features as {seen[key]} (the same store given "
                          "twice?); each counts as a variant of its own", stacklevel=3)
        seen.setdefault(key, r["path"])


def build_model(config: SegTrainConfig, train: SegDataset) -> SegModel:
    model = SegModel(train.specs, train.classes.num_classes, config.head)
    if model.norm is not None:  # statistics of up to 64 images spread over the training set
        picks = np.linspace(0, len(train) - 1, min(64, len(train))).round().astype(int)
        model.norm.fit([train.features(int(i)) for i in picks])
    return model


class LossLog:
    """Logged losses: means over ensemble members and over the iterations since the last log line (loss, CE,
    AUC, and the amalgamation penalty when the objective adds one)."""

    NAMES = ("loss", "ce", "auc", "penalty")

    def __init__(self, device, history: list[dict]):
        self.window, self.count, self.t0, self.history = None, 0, time.perf_counter(), history
        self.device = device

    def add(self, logged: torch.Tensor) -> None:
        self.window = logged.clone() if self.window is None else self.window + logged
        self.count += 1

    def flush(self, iteration: int, lr: float) -> float:
        values = dict(zip(self.NAMES, (self.window / self.count).tolist()))
        check_finite(values["loss"], iteration)  # a diverging run stops here, before a checkpoint keeps its weights
        self.history.append({"iteration": iteration, **values, "lr": lr,
                             "seconds": round(time.perf_counter() - self.t0, 3)})
        self.window, self.count = None, 0
        return values["loss"]


def val_entry(iteration: int, scores: dict) -> dict:
    return {"iteration": iteration, **{f"val_{k}": v for k, v in scores.items() if k.startswith("miou")}}


def train_seg(config: SegTrainConfig, *, accelerator=None, resume: bool = False, overwrite: bool = False,
              progress: bool = True, stop_after: int | None = None) -> Path:
    """Train a head on stored features; returns the run folder (see the module doc for what it holds).

    `stop_after` ends this call after that many iterations (a checkpoint is written), for time-sliced
    jobs: call again with `resume=True` to go on.
    """
    from accelerate.utils import set_seed

    config.validate()
    accelerator = accelerator or make_accelerator(mixed_precision=config.mixed_precision)
    main, rank = accelerator.is_main_process, accelerator.process_index
    folder = RunFolder(config.out, KIND, config, resume=resume, overwrite=overwrite, owned=RUN_FILES)
    train, val = load_data(config)  # bad input fails here, before anything is written
    check_tail_classes(config.tail_classes, train.classes.num_classes)
    check_profile_classes(config.extra.get("profile"), config.tail_classes, train.classes.num_classes)
    record = run_record(train)
    warn_same_stores(record["stores"])
    if folder.continuing:  # a resumed run trains on the very stores it began on (same features, same shards)
        check_unchanged((folder.saved() or {}).get("stores"), config.features, folder.path)
    # A resumed run must see the variants and maps it began with (a store re-extracted with other variants).
    folder.check_saved(variants=record["variants"], specs=record["specs"])
    set_seed(config.seed + rank)
    model = build_model(config, train)  # a head that cannot act on these features fails here, too
    accelerator.wait_for_everyone()  # every process has looked before the main one changes anything
    lock = folder.lock() if main else None  # one process trains this run at a time, until it returns
    try:
        if main:
            folder.extra.update(record)
            folder.create()
            folder.file(STATUS).unlink(missing_ok=True)  # it said why an earlier call stopped
            if not folder.continuing:
                folder.write_json("report.json", {"train": train.report, "val": val.report if val else None})
        accelerator.wait_for_everyone()
        return _train(config, folder, train, val, model, accelerator, progress, stop_after)
    except UserError as e:  # a diverged loss, non-finite features …: kept beside the run, so `report` can say it
        if main:
            record_stop(folder, config.iterations, e)
        raise
    finally:
        if lock is not None:
            lock.release()


def record_stop(folder: RunFolder, iterations: int, error: UserError) -> None:
    """Why a call stopped before the end (`STATUS`), with the iteration of the latest checkpoint; a failure to
    write it never hides the error itself."""
    try:
        if folder.saved() is None:
            return
        latest = folder.checkpoints.latest()
        folder.write_json(STATUS, {"state": "stopped", "reason": str(error), "checkpoint": latest and latest.step,
                                   "iterations": iterations, "time": utc_now()})
    except (UserError, OSError):
        pass


def _train(config: SegTrainConfig, folder: RunFolder, train: SegDataset, val: SegDataset | None, model: SegModel,
           accelerator, progress: bool, stop_after: int | None) -> Path:
    """The training loop of `train_seg`, in its created (or continued) run folder."""
    from tqdm.auto import tqdm

    main, rank, device = accelerator.is_main_process, accelerator.process_index, accelerator.device
    objective = build_objective(config, train.classes, train.pixel_counts, rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    start, history = 0, []
    checkpoint = folder.checkpoints.latest() if folder.continuing else None
    if checkpoint is not None:
        restore_checkpoint(checkpoint, unwrapped, optimizer)
        objective.load_state(checkpoint)
        start, history = checkpoint.step, list(checkpoint.load("history"))

    stop = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    batches = BatchStream(len(train), config.batch_size, config.seed, start, stop, rank, accelerator.num_processes,
                          indices=batch_indices_for(config, train))
    # A private generator: the loader draws a seed from it, which must not shift the global (dropout) stream.
    loader = torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(config.seed),
                                         num_workers=config.num_workers, pin_memory=device.type == "cuda")
    log = LossLog(device, history)
    bar = tqdm(total=config.iterations, initial=start, desc=KIND, unit="it", disable=not progress or not main)
    model.train()
    for it, batch in zip(range(start, stop), loader):
        feats, mask = objective.augment([f.to(device, non_blocking=True) for f in batch["features"]],
                                        batch["mask"].to(device, non_blocking=True))
        lr = config.lr * poly_factor(it, config.iterations, config.poly_power, config.warmup_iterations)
        set_lr(optimizer, lr)
        with accelerator.autocast():
            outputs, penalty_terms = model(feats, with_penalty=True)
        total, logged = objective(outputs, mask, penalty_terms)
        accelerator.backward(total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.add(logged)
        done = it + 1
        if done % config.log_every == 0 or done == stop:
            bar.set_postfix(loss=f"{log.flush(done, lr):.4f}")
        bar.update()
        if val is not None and config.eval_every and done % config.eval_every == 0 and done < config.iterations:
            history.append(val_entry(done, evaluate(unwrapped, val, accelerator, config.eval_batch_size)[0]))
        if done % config.checkpoint_every == 0 or done == stop:
            check_finite_parameters(unwrapped, done)  # never checkpoint weights that stopped being numbers
            if main:
                save_checkpoint(folder.checkpoints, done, unwrapped, optimizer, history=history, **objective.state())
            accelerator.wait_for_everyone()
    bar.close()
    if stop < config.iterations:
        return folder.path
    finish(folder, config, unwrapped, val, history, accelerator, train)
    return folder.path


def finish(folder: RunFolder, config: SegTrainConfig, model: SegModel, val: SegDataset | None, history: list[dict],
           accelerator, train: SegDataset) -> None:
    """The final weights, history and its curves, the validation scores and (variant mixers) the learned
    weights of a finished run."""
    scores = None
    if val is not None:
        scores, matrix = evaluate(model, val, accelerator, config.eval_batch_size)
        scores.update(listed_tail_scores(scores, val.classes.names, config.tail_classes, config.extra.get("profile")))
        if not history or history[-1].get("iteration") != config.iterations or "val_miou" not in history[-1]:
            history.append(val_entry(config.iterations, scores))
    if accelerator.is_main_process:
        folder.save_tensors("model.safetensors", model.state_dict())
        folder.write_json("history.json", history)
        save_curves_png(history, folder.file("curves.png"))
        if model.amalgamate is not None:  # which variant the head learned to use, where
            write_amalgamation_report(folder, model, val if val is not None else train)
        if scores is not None:
            write_scores(folder, scores, matrix, val.classes, {"split": config.val_split, "features": config.features,
                                                               "masks": val.targets.describe, "images": len(val)})
    accelerator.wait_for_everyone()
