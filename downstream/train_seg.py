"""Training and evaluation of segmentation heads on stored features (`difffeat train-seg` / `eval-seg`).

A run folder holds everything needed to judge and repeat it::

    RUN/config.json        the resolved config, classes (with groups), feature specs, stores, versions
    RUN/report.json        the data report: keys used, keys skipped (no mask / not in every store), resized masks
    RUN/checkpoints/       the latest checkpoint (model, optimizer, memory bank, RNG states; safetensors)
    RUN/model.safetensors  the final weights
    RUN/history.json       logged losses, learning rate, validation scores;  RUN/curves.png  their plot
    RUN/metrics.json       validation scores (with --val-split); RUN/confusion.png  its confusion matrix

AdamW with a poly schedule (optional linear warm-up), as AUCSeg trains; iteration-based. The same code runs
on a CPU or under `accelerate launch` on GPUs: the `Accelerator` is passed down, each process takes every
n-th batch of one seeded batch stream (so a resumed run continues the same stream) and keeps its own memory
bank, as the original keeps one per data-loader worker. An interrupted run continues from its latest
checkpoint with `resume=True` and, on one process, ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.atomic import atomic_path, write_json_atomic
from difffeat.errors import UserError
from difffeat.store import library_versions
from downstream.heads import HeadConfig, SegModel
from downstream.losses.aucseg import DEFAULT_AUC_WEIGHT, DEFAULT_MARGIN, SegLoss, class_weights_from_counts
from downstream.memory_bank import FeatureMemoryBank
from downstream.plots import save_confusion_png, save_curves_png
from downstream.seg_data import FeatureSpec, SegClasses, SegDataset, load_classes
from downstream.seg_metrics import SegMetrics

CLASS_WEIGHTS = {"none": None, "inverse": 1.0, "sqrt-inverse": 0.5}
RUN_FILES = ("config.json", "report.json", "model.safetensors", "history.json", "curves.png", "metrics.json",
             "confusion.png")
CHECKPOINTS = "checkpoints"


@dataclass
class SegTrainConfig:
    """Everything that defines a training run; written to RUN/config.json, from which a run can be repeated."""

    features: list[str]  # feature store folders: one per variant
    masks: str  # mask root: Shapes-LT / imagefolder root, or a folder of masks
    out: str
    classes: str | list[str] | None = None  # classes.json, names file, "a,b,c" or a list; default MASKS/classes.json
    split: str | None = None  # train on keys under this folder ("train")
    val_split: str | None = None  # evaluate on keys under this folder ("val") every eval_every and at the end
    layers: list[str] | None = None  # layers to use (default: all of every store)
    mask_size: str = "resize"  # resize | refuse a mask whose size differs from the features' source images
    head: str = "conv"  # mlp | conv
    variants: str = "concat"  # concat | weighted (learned softmax-weighted sum over stores)
    ensemble: int = 10
    hidden: int = 128
    dropout: float = 0.1
    normalize: bool = True
    loss: str = "ce"  # ce | aucseg
    auc_weight: float = DEFAULT_AUC_WEIGHT
    margin: float = DEFAULT_MARGIN
    class_weights: str = "none"  # none | inverse | sqrt-inverse (from the training pixel counts)
    memory_bank: bool = False  # feature-space T-Memory Bank on tail classes
    bank_capacity: int = 5
    bank_sample_ratio: float = 1.0
    bank_min_cell_fraction: float = 0.5
    iterations: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    poly_power: float = 1.0
    warmup_iterations: int = 0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 16
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    cache_bytes: int = 1 << 30  # hold features and masks in RAM up to this size
    num_workers: int = 0  # data-loader worker processes (for stores too large for the cache)
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run

    def head_config(self) -> HeadConfig:
        return HeadConfig(kind=self.head, variants=self.variants, ensemble=self.ensemble, hidden=self.hidden,
                          dropout=self.dropout, normalize=self.normalize)

    def check(self) -> None:
        """UserError for values no run can use."""
        if not self.features:
            raise UserError("give at least one --features store")
        choices = {"head": ("mlp", "conv"), "variants": ("concat", "weighted"), "loss": ("ce", "aucseg"),
                   "class_weights": tuple(CLASS_WEIGHTS), "mask_size": ("resize", "refuse"),
                   "mixed_precision": ("no", "fp16", "bf16")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(valid)}, "
                                f"got {getattr(self, name)!r}")
        for name in ("iterations", "batch_size", "ensemble", "hidden", "bank_capacity", "log_every",
                     "checkpoint_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.bank_sample_ratio <= 1 or self.auc_weight < 0:
            raise UserError("need --lr > 0, --auc-weight ≥ 0 and --bank-sample-ratio in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict, **override) -> SegTrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, **override})


# ----------------------------------------------------------------------------------------------- helpers
def poly_factor(iteration: int, total: int, power: float = 1.0, warmup: int = 0, warmup_ratio: float = 1e-6) -> float:
    """mmseg's poly schedule with linear warm-up: lr(it) = lr · (1 − it/total)^power · warm-up factor."""
    factor = (1.0 - iteration / total) ** power
    if warmup and iteration < warmup:
        factor *= 1.0 - (1.0 - iteration / warmup) * (1.0 - warmup_ratio)
    return factor


def batch_indices(n: int, batch_size: int, seed: int, iteration: int) -> list[int]:
    """The sample indices of global batch `iteration`: epochs of seeded permutations, last partial batch dropped.

    A pure function of its arguments, so a resumed run and every process see the same stream.
    """
    size = min(batch_size, n)
    per_epoch = n // size
    epoch, pos = divmod(iteration, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * size:(pos + 1) * size].tolist()


class _Batches(torch.utils.data.Sampler):
    """Batches `start`…`stop`−1 of the stream for process `rank` of `world` (it takes every world-th batch)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.args = (n, batch_size, seed)
        self.start, self.stop, self.rank, self.world = start, stop, rank, world

    def __iter__(self):
        for it in range(self.start, self.stop):
            yield batch_indices(*self.args, it * self.world + self.rank)

    def __len__(self) -> int:
        return self.stop - self.start


def _collate(items: list[dict]) -> dict:
    return {"features": [torch.stack([it["features"][i] for it in items]) for i in range(len(items[0]["features"]))],
            "mask": torch.stack([it["mask"] for it in items]), "index": torch.tensor([it["index"] for it in items])}


def _write_json(path: Path, data) -> None:
    write_json_atomic(path, data, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # a damaged file: name it, whatever safetensors raised
        raise UserError(f"{path}: unreadable ({e})") from None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        pid, _, k = name.partition(".")
        state.setdefault(int(pid), {})[k] = v
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def resolve_classes(config: SegTrainConfig) -> SegClasses:
    if config.classes is None:
        default = Path(config.masks) / "classes.json"
        if not default.is_file():
            raise UserError(f"{config.masks}: no classes.json there; give --classes (a classes.json, a names "
                            "file or a,b,c)")
        return load_classes(default)
    return load_classes(config.classes)


def _check_run_dir(out: Path, config: SegTrainConfig, *, resume: bool, overwrite: bool) -> bool:
    """Check the run folder, changing nothing (every process runs it, so all fail alike); True when an
    existing run of this config is to be continued."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    saved = out / "config.json"
    if saved.is_file():
        if overwrite:
            return False
        if not resume:
            raise UserError(f"{out}: holds a training run; pass --resume to continue it or --overwrite to replace it")
        try:
            old = json.loads(saved.read_text())["config"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise UserError(f"{saved}: unreadable run config ({e})") from None
        new = json.loads(json.dumps(asdict(config)))
        differ = sorted(k for k in set(old) | set(new) if k != "out" and old.get(k) != new.get(k))
        if differ:
            raise UserError(f"{out}: holds a run of another config (differs in: {', '.join(differ)}); "
                            "choose another --out or pass --overwrite")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out}: folder is not empty and holds no training run; choose a new or empty folder")
    return False


def _make_run_dir(out: Path, continuing: bool, run_files: tuple[str, ...] = RUN_FILES) -> None:
    """Create the run folder, or empty it of an old run's files (only `run_files`, checkpoints and evaluations)
    unless continuing it. Shared by the segmentation and classification trainers."""
    if not continuing and (out / "config.json").is_file():
        for name in run_files:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        for p in out.glob("eval-*"):
            shutil.rmtree(p, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the run folder ({e.strerror or e})") from None


def _accelerator(**kwargs):
    """An `Accelerator` for this launch; checks that it sees every launched process."""
    from accelerate import Accelerator

    # Without CUDA, accelerate starts the gloo (CPU) group only when asked for the CPU explicitly.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # never let several processes write as if each were alone
        raise UserError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}; "
                        "check the launcher's flags")
    return accelerator


# ------------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(out: Path, iteration: int, model: SegModel, optimizer, bank: FeatureMemoryBank | None,
                     history: list[dict]) -> None:
    root = out / CHECKPOINTS
    name = f"iter-{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(model.state_dict(), tmp / "model.safetensors")
    tensors, meta = _optimizer_tensors(optimizer)
    _save_tensors(tensors, tmp / "optimizer.safetensors", {"optimizer": meta})
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_tensors(rng, tmp / "rng.safetensors")
    if bank is not None:
        tensors, meta = bank.state_dict()
        _save_tensors(tensors, tmp / "bank.safetensors", {"bank": meta})
    _write_json(tmp / "state.json", {"iteration": iteration, "history": history})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(root / "latest.json", {"iteration": iteration, "dir": name})
    for old in root.glob("iter-*"):  # only the latest is kept: it is all a resumed run needs
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> Path | None:
    pointer = out / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return None
    try:
        return out / CHECKPOINTS / json.loads(pointer.read_text())["dir"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{pointer}: unreadable ({e})") from None


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: SegModel, dataset: SegDataset, accelerator=None, batch_size: int = 16,
             progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Scores of `model` on `dataset` (see `seg_metrics`) and the confusion matrix, over all processes."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(range(rank, len(dataset), world))  # each image once: no padding to equal shards
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         collate_fn=_collate)
    metrics = SegMetrics(dataset.classes, device=device)
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress or rank != 0, leave=False):
        feats = [f.to(device) for f in batch["features"]]
        preds = model.predict(feats, dataset.mask_size)
        metrics.update(preds, batch["mask"].to(device))
    model.train(was_training)
    matrix = metrics.matrix
    if world > 1:
        matrix = accelerator.reduce(matrix, reduction="sum")
        metrics.matrix = matrix
    return metrics.compute(), matrix.cpu()


def _eval_files(out: Path, scores: dict, matrix: torch.Tensor, classes: SegClasses, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", {**scores, "confusion_matrix": matrix.tolist(), **info})
    save_confusion_png(matrix, classes.names, out / "confusion.png")


# ---------------------------------------------------------------------------------------------- training
def train_seg(config: SegTrainConfig, *, accelerator=None, resume: bool = False, overwrite: bool = False,
              progress: bool = True, stop_after: int | None = None) -> Path:
    """Train a head on stored features; returns the run folder (see the module doc for what it holds).

    `stop_after` ends this call after that many iterations (a checkpoint is written), for time-sliced
    jobs: call again with `resume=True` to go on.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    config.check()
    accelerator = accelerator or _accelerator(mixed_precision=config.mixed_precision)
    main = accelerator.is_main_process
    out = Path(config.out)
    continuing = _check_run_dir(out, config, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main one changes anything
    if main:
        _make_run_dir(out, continuing)
    accelerator.wait_for_everyone()

    classes = resolve_classes(config)
    train_ds = SegDataset(config.features, config.masks, classes, split=config.split, layers=config.layers,
                          mask_size=config.mask_size, cache_bytes=config.cache_bytes)
    classes = classes.with_counts(classes.pixel_counts or train_ds.pixel_counts.tolist())
    train_ds.classes = classes
    splits = {k.split("/", 1)[0] for k in train_ds.keys} & {"train", "val", "validation", "test"}
    if config.split is None and len(splits) > 1:
        warnings.warn(f"training on the keys of several splits ({', '.join(sorted(splits))}); pass --split train "
                      "to hold the others out", stacklevel=2)
    val_ds = None
    if config.val_split:
        val_ds = SegDataset(config.features, config.masks, classes, split=config.val_split, layers=config.layers,
                            mask_size=config.mask_size, cache_bytes=config.cache_bytes)
    if main and not continuing:
        stores = [{"path": str(s.path), **{k: s.manifest.get(k) for k in ("model", "layers", "timesteps",
                                                                           "resolution", "techniques")}}
                  for s in train_ds.stores]
        _write_json(out / "config.json", {
            "config": asdict(config), "classes": classes.to_dict(),
            "specs": [s.to_dict() for s in train_ds.specs], "mask_size": list(train_ds.mask_size),
            "stores": stores, "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        _write_json(out / "report.json", {"train": train_ds.report, "val": val_ds.report if val_ds else None})

    set_seed(config.seed + accelerator.process_index)
    model = SegModel(train_ds.specs, classes.num_classes, config.head_config())
    if model.norm is not None:
        picks = np.linspace(0, len(train_ds) - 1, min(64, len(train_ds))).round().astype(int)
        model.norm.fit([train_ds.features(int(i)) for i in picks])
    weights = None
    if CLASS_WEIGHTS[config.class_weights] is not None:
        weights = class_weights_from_counts(train_ds.pixel_counts, CLASS_WEIGHTS[config.class_weights])
    loss_fn = SegLoss(config.loss, config.auc_weight, config.margin, weights, classes.ignore_index)
    bank = None
    if config.memory_bank:
        tail = classes.tail_ids()
        if not tail:
            raise UserError("the memory bank needs tail classes (groups in classes.json, or pixel counts)")
        bank = FeatureMemoryBank(tail, config.bank_capacity, config.bank_sample_ratio,
                                 config.bank_min_cell_fraction, seed=config.seed * 1000 + accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    start, history = 0, []
    checkpoint = _latest_checkpoint(out) if continuing else None
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        start, history = int(state["iteration"]), list(state["history"])
        tensors, _ = _load_tensors(checkpoint / "model.safetensors")
        model.load_state_dict(tensors)
    model, optimizer = accelerator.prepare(model, optimizer)
    if checkpoint is not None:
        tensors, meta = _load_tensors(checkpoint / "optimizer.safetensors")
        optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
        rng, _ = _load_tensors(checkpoint / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        if bank is not None and (checkpoint / "bank.safetensors").is_file():
            tensors, meta = _load_tensors(checkpoint / "bank.safetensors")
            bank.load_state_dict(tensors, meta["bank"])

    stop = config.iterations if stop_after is None else min(config.iterations, start + stop_after)
    sampler = _Batches(len(train_ds), config.batch_size, config.seed, start, stop, accelerator.process_index,
                       accelerator.num_processes)
    # A private generator: the loader draws a seed from it, which must not shift the global (dropout) stream.
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(config.seed),
                                         num_workers=config.num_workers, pin_memory=accelerator.device.type == "cuda")
    device, size = accelerator.device, train_ds.mask_size
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    bar = tqdm(total=config.iterations, initial=start, desc="train-seg", unit="it", disable=not progress or not main)
    window, count, t0 = torch.zeros(3, device=device), 0, time.perf_counter()  # loss, ce, auc since last log
    for it, batch in zip(range(start, stop), loader):
        feats = [f.to(device, non_blocking=True) for f in batch["features"]]
        mask = batch["mask"].to(device, non_blocking=True)
        if bank is not None:
            feats, mask = bank.apply_batch(feats, mask)
        lr = config.lr * poly_factor(it, config.iterations, config.poly_power, config.warmup_iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with accelerator.autocast():
            outputs = model(feats)
        losses, ces, aucs = [], [], []
        for z in outputs:  # each ensemble member has its own loss: members train independently
            z = F.interpolate(z.float(), size=size, mode="bilinear", align_corners=False)
            loss, parts = loss_fn(z, mask)
            losses.append(loss)
            ces.append(parts["ce"])
            aucs.append(parts["auc"])
        total = torch.stack(losses).sum()
        accelerator.backward(total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Logged values are means over ensemble members and over the iterations since the last log.
        window += torch.stack([total.detach() / len(losses), torch.stack(ces).mean(), torch.stack(aucs).mean()])
        count += 1
        if (it + 1) % config.log_every == 0 or it + 1 == stop:
            loss_v, ce_v, auc_v = (window / count).tolist()
            history.append({"iteration": it + 1, "loss": loss_v, "ce": ce_v, "auc": auc_v, "lr": lr,
                            "seconds": round(time.perf_counter() - t0, 3)})
            bar.set_postfix(loss=f"{loss_v:.4f}")
            window.zero_()
            count = 0
        bar.update()
        done = it + 1
        if val_ds is not None and config.eval_every and done % config.eval_every == 0 and done < config.iterations:
            scores, _ = evaluate(unwrapped, val_ds, accelerator, config.eval_batch_size)
            history.append({"iteration": done, **{f"val_{k}": v for k, v in scores.items()
                                                   if k.startswith("miou")}})
        if done % config.checkpoint_every == 0 or done == stop:
            if main:
                _save_checkpoint(out, done, unwrapped, optimizer, bank, history)
            accelerator.wait_for_everyone()
    bar.close()

    if stop < config.iterations:
        return out
    scores = None
    if val_ds is not None:
        scores, matrix = evaluate(unwrapped, val_ds, accelerator, config.eval_batch_size)
        if not history or history[-1].get("iteration") != config.iterations or "val_miou" not in history[-1]:
            history.append({"iteration": config.iterations,
                            **{f"val_{k}": v for k, v in scores.items() if k.startswith("miou")}})
    if main:
        _save_tensors(unwrapped.state_dict(), out / "model.safetensors")
        _write_json(out / "history.json", history)
        save_curves_png(history, out / "curves.png")
        if scores is not None:
            _eval_files(out, scores, matrix, classes, {"split": config.val_split, "features": config.features,
                                                       "masks": config.masks, "images": len(val_ds)})
    accelerator.wait_for_everyone()
    return out


# ------------------------------------------------------------------------------------------- eval-seg
def load_run(run: str | os.PathLike) -> tuple[dict, SegModel, SegClasses]:
    """(saved config.json, the trained model on the CPU in eval mode, classes) of a run folder."""
    run = Path(run)
    file = run / "config.json"
    if not file.is_file():
        raise UserError(f"{run}: not a train-seg run (no config.json)")
    try:
        saved = json.loads(file.read_text())
        cfg = SegTrainConfig.from_dict(saved["config"])
        classes = SegClasses.from_dict(saved["classes"])
        specs = [FeatureSpec.from_dict(s) for s in saved["specs"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: unreadable run config ({e})") from None
    weights = run / "model.safetensors"
    if not weights.is_file():
        checkpoint = _latest_checkpoint(run)
        if checkpoint is None:
            raise UserError(f"{run}: no trained weights yet (no model.safetensors or checkpoint)")
        weights = checkpoint / "model.safetensors"
    model = SegModel(specs, classes.num_classes, cfg.head_config())
    tensors, _ = _load_tensors(weights)
    model.load_state_dict(tensors)
    return saved, model.eval(), classes


def eval_seg(run: str | os.PathLike, features: list[str], masks: str, *, split: str | None = None,
             out: str | os.PathLike | None = None, mask_size: str | None = None, batch_size: int = 16,
             accelerator=None, progress: bool = True) -> dict:
    """Scores of a trained run on features and masks (mIoU overall / head / middle / tail, per-class IoU,
    pixel accuracy); writes metrics.json and confusion.png to `out` (default RUN/eval-<split or all>)."""
    saved, model, classes = load_run(run)
    cfg = saved["config"]
    dataset = SegDataset(features, masks, classes, split=split, layers=cfg.get("layers"),
                         mask_size=mask_size or cfg.get("mask_size", "resize"))
    want = [FeatureSpec.from_dict(s) for s in saved["specs"]]
    if dataset.specs != want:
        got = [(s.variant, s.layer, s.shape) for s in dataset.specs]
        raise UserError(f"{', '.join(map(str, features))}: features differ from the run's (run: "
                        f"{[(s.variant, s.layer, s.shape) for s in want]}, given: {got})")
    accelerator = accelerator or _accelerator()
    model = model.to(accelerator.device)
    scores, matrix = evaluate(model, dataset, accelerator, batch_size, progress)
    out = Path(out) if out else Path(run) / f"eval-{(split or 'all').strip('/').replace('/', '-')}"
    info = {"run": str(run), "split": split, "features": list(features), "masks": str(masks),
            "images": len(dataset), "skipped": {k: len(v) for k, v in dataset.report.items() if isinstance(v, list)}}
    if accelerator.is_main_process:
        _eval_files(out, scores, matrix, classes, info)
    return {**scores, "out": str(out), **info}


def group_summary(scores: dict) -> str:
    """One line: overall / head / middle / tail mIoU and pixel accuracy."""
    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    return (f"mIoU {pct(scores.get('miou'))}  head {pct(scores.get('miou_head'))}  middle "
            f"{pct(scores.get('miou_middle'))}  tail {pct(scores.get('miou_tail'))}  pixel acc "
            f"{pct(scores.get('pixel_accuracy'))}")
