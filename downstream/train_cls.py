"""Training and test-agnostic evaluation of classification heads on pooled features (`difffeat train-cls` /
`eval-cls`).

A run folder holds everything needed to judge and repeat it::

    RUN/config.json        the resolved config, classes with training counts, sources, stores, versions
    RUN/report.json        keys used per split, zero-count classes, the head / tail split of the SAM family
    RUN/checkpoints/       the latest checkpoint (model, optimizer, RNG state; safetensors)
    RUN/model.safetensors  the final weights;  RUN/nc.json  NC1–NC4 of the trained head on the training features
    RUN/history.json       loss and learning rate per epoch;  RUN/curves.png  their plot
    RUN/metrics.json       test-agnostic accuracies (with test labels);  RUN/accuracy.png  their plot

The model: per-source standardisation (training statistics), fusion of the sources (concatenation, a learned
softmax-weighted sum, or ReconBoost's per-source learners), a trunk (Linear → ReLU, `hidden` wide; none at
0), and a head: linear, cosine (s·cos), a fixed simplex-ETF or Grassmannian frame (`neural_collapse`), or
DirMixE's three experts. Losses: CE, LA, VS, LDAM (cosine head, DRW), VS → TLA + ADRW, DirMixE. Optimizer:
SGD (Nesterov momentum) with linear warm-up and cosine decay, optionally wrapped in SAM, ImbSAM or SSE-SAM
with the tail T = {c : n_c < η}. Batches are a pure function of (seed, iteration) and nothing else draws
random numbers during training, so a resumed run ends with the weights of an uninterrupted one. Runs on one
process (CPU, or CUDA when present): a head on pooled features trains in seconds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difffeat.errors import UserError
from difffeat.store import FeatureStore, library_versions
from downstream.cls_data import (
    ClsData,
    SourceSpec,
    check_test_classes,
    load_class_names,
    load_split,
)
from downstream.dirmixe import (
    AggregationConfig,
    DirMixEConfig,
    DirMixEHead,
    DirMixELoss,
    DrawPool,
    aggregate,
    is_final_phase,
    test_time_aggregation,
)
from downstream.groups import head_middle_tail
from downstream.losses import (
    CosineClassifier,
    LDAMLoss,
    TLAADRWLoss,
    VSLoss,
    deferred_switch_epoch,
    drw_weights,
    logit_adjusted_loss,
)
from downstream.losses.prior import class_prior
from downstream.neural_collapse import FixedFrameClassifier, neural_collapse_metrics
from downstream.optim import SAM, SSESAM, GroupLosses, ImbSAM, tail_classes
from downstream.plots import save_curves_png, save_figure
from downstream.reconboost import ReconBoostConfig, ReconBoostModel, phase_loss, phase_optimizer, schedule
from downstream.test_agnostic import shifted_test_sets
from downstream.train_seg import (
    _check_run_dir,
    _latest_checkpoint,
    _load_tensors,
    _make_run_dir,
    _optimizer_state,
    _optimizer_tensors,
    _save_tensors,
    _write_json,
    batch_indices,
)

METHODS = ("ce", "la", "vs", "ldam", "tla-adrw", "dirmixe")
OPTIMS = ("none", "sam", "imbsam", "ssesam")
HEADS = ("linear", "cosine", "etf", "grassmannian")
FUSIONS = ("concat", "weighted", "reconboost")
RUN_FILES = ("config.json", "report.json", "model.safetensors", "nc.json", "history.json", "curves.png",
             "metrics.json", "accuracy.png")
CHECKPOINTS = "checkpoints"
EXPERT_NAMES = ("expert_forward", "expert_uniform", "expert_backward")


@dataclass
class ClsTrainConfig:
    """Everything that defines a train-cls run; written to RUN/config.json, from which a run can be repeated."""

    features: list[str]  # feature stores (sources)
    labels: str  # key,label CSV (training labels; with --split, also the test labels)
    out: str
    test_labels: str | None = None  # a separate key,label CSV for the test split
    split: str | None = None  # training keys: those under this prefix ("train/"); all store keys if None
    test_split: str | None = None  # test keys under this prefix ("test/")
    classes: str | list[str] | None = None  # class names (file, JSON, "a,b,c"); default: from the labels
    layers: list[str] | None = None  # layers to use (default: all of every store)
    sources: str = "store"  # store | layer: what one source (modality) is
    pool_grid: int = 1  # average-pool each map onto G×G cells (1: global average pooling)
    fusion: str = "concat"  # concat | weighted | reconboost
    method: str = "ce"  # ce | la | vs | ldam | tla-adrw | dirmixe
    optim: str = "none"  # none | sam | imbsam | ssesam
    head: str | None = None  # linear | cosine | etf | grassmannian (default: cosine for ldam / dirmixe, else linear)
    hidden: int = 256  # trunk width (0: no trunk)
    frame_dim: int | None = None  # dimension of the etf / grassmannian frame (default: trunk output)
    assignment: str = "identity"  # label → frame vertex: identity | random
    scale: float = 30.0  # logit scale of cosine and frame heads (LDAM applies its own)
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 5
    tau: float = 1.0  # LA
    vs_gamma: float = 0.05  # VS and TLA stage 1
    vs_tau: float = 1.0
    tla_tau: float = 0.75  # TLA + ADRW stage 2
    adrw_nu: float = 0.25
    ldam_margin: float = 0.5
    ldam_scale: float = 30.0
    drw: bool = True  # LDAM-DRW: class-balanced weights from 0.8·E on
    rho: float = 0.05  # SAM / ImbSAM radius, SSE-SAM head radius ρ_H
    rho_tail: float = 0.1  # SSE-SAM tail radius ρ_T
    sse_gamma: float = 0.7  # SSE-SAM: ρ_H = 0 after γ·E epochs
    tail_eta: float | None = None  # tail = classes with fewer training samples than η (default 0.2·n_max)
    dm_tau: float = DirMixEConfig.tau
    lambda_var: float = DirMixEConfig.lambda_var
    trials: int = DirMixEConfig.trials
    concentration: float = DirMixEConfig.concentration
    tta_lr: float = AggregationConfig.lr
    tta_epochs: int = AggregationConfig.epochs
    tta_steps: int = AggregationConfig.steps_per_pass
    tta_batch_size: int = AggregationConfig.batch_size
    tta_dropout: float = AggregationConfig.dropout
    tta_noise: float = AggregationConfig.noise
    rb_stages: int = ReconBoostConfig.stages
    rb_stage_epochs: int = ReconBoostConfig.stage_epochs
    rb_correct_epochs: int = ReconBoostConfig.correct_epochs
    rb_weight1: float = ReconBoostConfig.weight1
    rb_weight2: float = ReconBoostConfig.weight2
    rb_lr: float | None = None  # ReconBoost's SGD learning rate (default: --lr; the code's is 0.01)
    dirichlet_draws: int = 3  # Dirichlet test sets per component in the evaluation
    eval_seed: int = 0
    drop_unseen: bool = False  # evaluate without test samples of classes absent from training
    seed: int = 0
    checkpoint_every: int = 10  # epochs
    device: str = "auto"  # auto | cpu | cuda
    extra: dict = field(default_factory=dict)

    def resolve(self) -> ClsTrainConfig:
        """Check every value and fill method-dependent defaults (the head; epochs under ReconBoost)."""
        choices = {"method": METHODS, "optim": OPTIMS, "fusion": FUSIONS, "sources": ("store", "layer"),
                   "assignment": ("identity", "random"), "device": ("auto", "cpu", "cuda")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(valid)}, "
                                f"got {getattr(self, name)!r}")
        if not self.features:
            raise UserError("give at least one --features store")
        if self.head is None:
            self.head = "cosine" if self.method in ("ldam", "dirmixe") else "linear"
        if self.head not in HEADS:
            raise UserError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.method == "ldam" and self.head == "linear":
            raise UserError("--method ldam needs a normalised head: --head cosine, etf or grassmannian")
        if self.method == "dirmixe" and self.head != "cosine":
            raise UserError("--method dirmixe has its own heads (three cosine experts); leave --head out")
        if self.fusion == "reconboost":
            if self.method not in ("ce", "la") or self.optim != "none" or self.head != "linear":
                raise UserError("--fusion reconboost trains with --method ce or la, plain SGD and its own head")
            self.epochs = self.reconboost_config().epochs
        for name in ("epochs", "batch_size", "checkpoint_every", "trials", "tta_batch_size", "rb_stages",
                     "rb_stage_epochs", "rb_correct_epochs", "pool_grid"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.hidden < 0 or self.rho < 0 or self.rho_tail < 0 or not 0 <= self.sse_gamma <= 1:
            raise UserError("need --lr > 0, --hidden ≥ 0, --rho ≥ 0, --rho-tail ≥ 0 and --sse-gamma in [0, 1]")
        return self

    def dirmixe_config(self) -> DirMixEConfig:
        return DirMixEConfig(tau=self.dm_tau, lambda_var=self.lambda_var, trials=self.trials,
                             concentration=self.concentration, scale=self.scale)

    def aggregation_config(self) -> AggregationConfig:
        return AggregationConfig(lr=self.tta_lr, epochs=self.tta_epochs, steps_per_pass=self.tta_steps,
                                 batch_size=self.tta_batch_size, dropout=self.tta_dropout, noise=self.tta_noise)

    def reconboost_config(self) -> ReconBoostConfig:
        return ReconBoostConfig(stages=self.rb_stages, stage_epochs=self.rb_stage_epochs,
                                correct_epochs=self.rb_correct_epochs, weight1=self.rb_weight1,
                                weight2=self.rb_weight2, lr=self.rb_lr or self.lr, correct_lr=self.rb_lr or self.lr)

    @classmethod
    def from_dict(cls, d: dict, **override) -> ClsTrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, **override})


# ------------------------------------------------------------------------------------------------ model
class SourceNorm(nn.Module):
    """Per-feature standardisation of every source by training statistics (buffers, saved with the model)."""

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = [int(d) for d in dims]
        self.register_buffer("mean", torch.zeros(sum(self.dims)))
        self.register_buffer("std", torch.ones(sum(self.dims)))

    @torch.no_grad()
    def fit(self, blocks: Sequence[torch.Tensor]) -> None:
        x = torch.cat(list(blocks), 1).double()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).nan_to_num(1.0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(self.std))

    def forward(self, blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = (torch.cat(list(blocks), 1) - self.mean) / self.std
        return list(x.split(self.dims, 1))


class WeightedSources(nn.Module):
    """A learned softmax-weighted sum of sources: r = Σ_s softmax_s(a)[s] ⊙ x_s, per feature (the content-shift
    paper's amalgamation); sources of different widths are first projected linearly to `width`."""

    def __init__(self, dims: Sequence[int], width: int):
        super().__init__()
        self.project = len(set(dims)) > 1
        out = width if self.project else int(dims[0])
        self.projections = nn.ModuleList(nn.Linear(d, out) for d in dims) if self.project else None
        self.logits = nn.Parameter(torch.zeros(len(dims), out))
        self.out_features = out

    def forward(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = [p(x) for p, x in zip(self.projections, blocks)] if self.project else list(blocks)
        w = torch.softmax(self.logits, 0)
        return sum(w[s] * x for s, x in enumerate(xs))

    def source_weights(self) -> list[float]:
        """Mean softmax weight of each source (for the report)."""
        return torch.softmax(self.logits.detach(), 0).mean(1).tolist()


class ClsModel(nn.Module):
    """norm → fusion → trunk → head; forward(blocks) → logits [B, C] ([3, B, C] for DirMixE)."""

    def __init__(self, dims: Sequence[int], num_classes: int, config: ClsTrainConfig):
        super().__init__()
        self.norm = SourceNorm(dims)
        self.kind, self.method = config.head, config.method
        if config.fusion == "reconboost":
            self.body = ReconBoostModel(dims, num_classes, config.hidden or 256, ReconBoostConfig.head_hidden)
            self.fuse = self.trunk = self.head = None
            return
        self.body = None
        self.fuse = WeightedSources(dims, config.hidden or max(dims)) if config.fusion == "weighted" else None
        width = self.fuse.out_features if self.fuse is not None else sum(dims)
        if config.hidden:
            self.trunk = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU())
            width = config.hidden
        else:
            self.trunk = nn.Identity()
        scale = 1.0 if config.method == "ldam" else config.scale  # LDAM scales cosine logits in its loss
        if config.method == "dirmixe":
            self.head = DirMixEHead(width, num_classes, config.hidden or width, config.scale)
        elif config.head == "linear":
            self.head = nn.Linear(width, num_classes)
        elif config.head == "cosine":
            self.head = CosineClassifier(width, num_classes, scale)
        else:
            self.head = FixedFrameClassifier(width, num_classes, dim=config.frame_dim or width, frame=config.head,
                                             assignment=config.assignment, scale=scale, seed=config.seed)

    def embed(self, normed: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.fuse(normed) if self.fuse is not None else torch.cat(list(normed), 1)
        return self.trunk(x)

    def forward_normed(self, normed: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.body is not None:
            return self.body(normed)
        return self.head(self.embed(normed))

    def forward(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_normed(self.norm(blocks))

    @torch.no_grad()
    def penultimate(self, blocks: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None]]:
        """(name, features h, weight W, bias b) with logits = h Wᵀ + b: what the NC metrics look at."""
        if self.body is not None:
            return []
        h = self.embed(self.norm(blocks))
        if isinstance(self.head, DirMixEHead):
            return [(name, f, w, None) for name, (f, w) in zip(EXPERT_NAMES, self.head.penultimate(h))]
        if isinstance(self.head, nn.Linear):
            return [("head", h, self.head.weight, self.head.bias)]
        if isinstance(self.head, CosineClassifier):
            return [("head", F.normalize(h, dim=-1), self.head.scale * F.normalize(self.head.weight, dim=-1), None)]
        return [("head", F.normalize(self.head.projection(h), dim=-1), self.head.scale * self.head.weight, None)]


# -------------------------------------------------------------------------------------------- objective
class Objective:
    """The method's loss of a batch, aware of the epoch (deferred stages, DirMixE's phases) and iteration."""

    def __init__(self, config: ClsTrainConfig, counts: np.ndarray, iterations: int, device: torch.device):
        self.config, self.method = config, config.method
        self.counts = torch.as_tensor(counts, dtype=torch.float64)
        self.epoch, self.draws = 0, None
        m = config.method
        if m == "vs":
            self.loss = VSLoss(self.counts, config.vs_gamma, config.vs_tau).to(device)
        elif m == "ldam":
            self.loss = LDAMLoss(self.counts, config.ldam_margin, config.ldam_scale).to(device)
        elif m == "tla-adrw":
            self.loss = TLAADRWLoss(self.counts, total_epochs=config.epochs, gamma=config.vs_gamma, tau=config.vs_tau,
                                    stage2_tau=config.tla_tau, nu=config.adrw_nu).to(device)
        elif m == "dirmixe":
            dm = config.dirmixe_config()
            self.loss = DirMixELoss(self.counts, dm.tau, dm.lambda_var).to(device)
            self.pool = DrawPool(self.counts, dm.trials, iterations, dm.concentration, seed=config.seed)
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.method == "tla-adrw":
            self.loss.set_epoch(epoch)
        if self.method == "ldam" and self.config.drw:
            weights = drw_weights(self.counts, epoch, deferred_switch_epoch(self.config.epochs))
            self.loss.weight = weights.to(self.device)

    def set_iteration(self, iteration: int) -> None:
        if self.method == "dirmixe":
            self.draws = self.pool.draws(self.epoch, iteration)

    @property
    def final_phase(self) -> bool:
        return self.method == "dirmixe" and is_final_phase(self.epoch, self.config.epochs)

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.method
        if m == "ce":
            return F.cross_entropy(out, y)
        if m == "la":
            return logit_adjusted_loss(out, y, self.counts.to(out.device), self.config.tau)
        if m == "dirmixe":
            return self.loss(out, y, *self.draws, final_phase=self.final_phase)
        return self.loss(out, y)

    def grouped(self, out: torch.Tensor, y: torch.Tensor, tail: torch.Tensor) -> GroupLosses:
        """Head and tail losses for ImbSAM / SSE-SAM: (|G|/|B|)·loss(group G's samples), so that for a mean
        loss L_H + L_T is the batch loss (SSE-SAM's normalisation); an empty group gives 0 with a graph."""
        is_tail = torch.isin(y, tail.to(y.device))
        parts, sizes = [], []
        for mask in (~is_tail, is_tail):
            k = int(mask.sum())
            sizes.append(k)
            parts.append(self(out[..., mask, :], y[mask]) * (k / len(y)) if k else out.sum() * 0.0)
        return GroupLosses(parts[0], parts[1], sizes[0], sizes[1])


def build_optimizer(params, config: ClsTrainConfig, tail: Sequence[int]) -> torch.optim.Optimizer:
    kwargs = {"lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay,
              "nesterov": config.momentum > 0}
    sgd = torch.optim.SGD
    if config.optim == "sam":
        return SAM(params, sgd, rho=config.rho, **kwargs)
    if config.optim == "imbsam":
        return ImbSAM(params, sgd, tail_classes=list(tail), rho=config.rho, **kwargs)
    if config.optim == "ssesam":
        return SSESAM(params, sgd, tail_classes=list(tail), rho_head=config.rho, rho_tail=config.rho_tail,
                      gamma=config.sse_gamma, total_epochs=config.epochs, **kwargs)
    return sgd(params, **kwargs)


def lr_factor(iteration: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` iterations, then cosine decay to 0 at `total`."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    progress = (iteration - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def default_tail_eta(counts: np.ndarray) -> float:
    """η = 0.2·n_max: the SSE-SAM README's ratio (η = 100 on CIFAR-100-LT, whose head class has 500)."""
    return 0.2 * float(np.max(counts))


# ------------------------------------------------------------------------------------------ run folder
def _base(optimizer):
    return getattr(optimizer, "base_optimizer", optimizer)


def _save_checkpoint(out: Path, epoch: int, model: nn.Module, optimizer, opt_key: str | None,
                     history: list[dict]) -> None:
    root = out / CHECKPOINTS
    name = f"epoch-{epoch:05d}"
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(model.state_dict(), tmp / "model.safetensors")
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(_base(optimizer))
        _save_tensors(tensors, tmp / "optimizer.safetensors", {"optimizer": meta})
    _save_tensors({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    _write_json(tmp / "state.json", {"epoch": epoch, "optimizer_key": opt_key, "history": history})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(root / "latest.json", {"iteration": epoch, "dir": name})
    for old in root.glob("epoch-*"):  # only the latest is kept: it is all a resumed run needs
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_optimizer(optimizer, checkpoint: Path) -> None:
    tensors, meta = _load_tensors(checkpoint / "optimizer.safetensors")
    base = _base(optimizer)
    base.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    if base is not optimizer:  # the SAM family shares the base optimizer's parameter groups
        optimizer.param_groups = base.param_groups


def _device(config: ClsTrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here")
        return torch.device("cuda")
    return torch.device("cpu")


def _tensors(data: ClsData, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.as_tensor(b, device=device) for b in data.blocks], torch.as_tensor(data.labels, device=device)


def load_train_data(config: ClsTrainConfig) -> ClsData:
    names = load_class_names(config.classes) if config.classes is not None else None
    explicit = config.test_labels is not None
    return load_split(config.features, config.labels, split=config.split, explicit=explicit, names=names,
                      layers=config.layers, sources=config.sources, pool_grid=config.pool_grid)


def load_test_data(config: ClsTrainConfig, train: ClsData) -> ClsData | None:
    """The test split of a training run (None without --test-split / --test-labels), checked against training."""
    if config.test_labels is None and config.test_split is None:
        return None
    file = config.test_labels or config.labels
    test = load_split(config.features, file, split=config.test_split, explicit=config.test_labels is not None,
                      names=train.names, layers=config.layers, sources=config.sources, pool_grid=config.pool_grid,
                      specs=train.specs)
    overlap = sorted(set(test.keys) & set(train.keys))
    if overlap:
        raise UserError(f"{file}: {len(overlap)} test keys are also training keys (e.g. {overlap[0]!r})")
    return check_test_classes(test, train.counts(), file, config.drop_unseen)


# ---------------------------------------------------------------------------------------------- training
def train_cls(config: ClsTrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
              stop_after: int | None = None) -> Path:
    """Train a head on pooled features; returns the run folder (see the module doc for what it holds).

    `stop_after` ends this call after that many epochs (a checkpoint is written): call again with
    `resume=True` to go on.
    """
    from tqdm.auto import tqdm

    config.resolve()
    out = Path(config.out)
    continuing = _check_run_dir(out, config, resume=resume, overwrite=overwrite)
    train = load_train_data(config)
    counts = train.counts()
    zero = [train.names[c] for c in np.flatnonzero(counts == 0)]
    if zero:
        warnings.warn(f"{config.labels}: classes {zero} have no training samples; their prior is floored",
                      stacklevel=2)
    test = load_test_data(config, train)
    eta = config.tail_eta if config.tail_eta is not None else default_tail_eta(counts)
    tail = tail_classes(counts, eta)
    _make_run_dir(out, continuing, RUN_FILES)
    groups = head_middle_tail(train.names, counts.tolist())
    if not continuing:
        stores = [{"path": str(p), **{k: FeatureStore(p).manifest.get(k) for k in ("model", "layers", "timesteps",
                                                                                    "resolution", "techniques")}}
                  for p in config.features]
        _write_json(out / "config.json", {
            "config": asdict(config),
            "classes": {"names": train.names, "train_counts": counts.tolist(), "groups": groups,
                        "prior": class_prior(counts).tolist()},
            "sources": [s.to_dict() for s in train.specs], "stores": stores, "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        _write_json(out / "report.json", {
            "train": {**train.report, "images": len(train)}, "test": test.report if test is not None else None,
            "zero_count_classes": zero, "tail_eta": eta, "tail_classes": [train.names[c] for c in tail]})

    device = _device(config)
    torch.manual_seed(config.seed)
    model = ClsModel([s.dim for s in train.specs], train.num_classes, config).to(device)
    blocks, labels = _tensors(train, device)
    model.norm.fit(blocks)
    n = len(train)
    size = min(config.batch_size, n)
    per_epoch = n // size
    objective = Objective(config, counts, per_epoch, device)
    rb = config.reconboost_config() if config.fusion == "reconboost" else None
    optimizer = None if rb else build_optimizer(model.parameters(), config, tail)
    opt_key = None

    start, history = 0, []
    checkpoint = _latest_checkpoint(out) if continuing else None
    saved_key = None
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        start, history, saved_key = int(state["epoch"]), list(state["history"]), state.get("optimizer_key")
        tensors, _ = _load_tensors(checkpoint / "model.safetensors")
        model.load_state_dict(tensors)
        if optimizer is not None:
            _load_optimizer(optimizer, checkpoint)
        torch.set_rng_state(_load_tensors(checkpoint / "rng.safetensors")[0]["torch"])

    stop = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
    total, warmup = config.epochs * per_epoch, config.warmup_epochs * per_epoch
    tail_t = torch.as_tensor(tail, dtype=torch.long)
    adjust = config.tau * torch.log(class_prior(counts)).float().to(device) if config.method == "la" else None
    model.train()
    bar = tqdm(total=config.epochs, initial=start, desc="train-cls", unit="epoch", disable=not progress)
    for epoch in range(start, stop):
        objective.set_epoch(epoch)
        if rb is not None:
            stage, phase, source = schedule(epoch, rb, len(blocks))
            key = f"{stage}:{phase}"
            if key != opt_key:
                optimizer, opt_key = phase_optimizer(model.body, phase, source, rb, config.momentum,
                                                     config.weight_decay), key
                if key == saved_key and checkpoint is not None:
                    _load_optimizer(optimizer, checkpoint)
        losses = []
        for i in range(per_epoch):
            it = epoch * per_epoch + i
            idx = torch.as_tensor(batch_indices(n, size, config.seed, it), device=device)
            xb, yb = [b[idx] for b in blocks], labels[idx]
            factor = lr_factor(it, total, warmup)
            if rb is not None:
                for group in optimizer.param_groups:
                    group["lr"] = (rb.lr if phase == "update" else rb.correct_lr) * factor
                loss = phase_loss(model.body, model.norm(xb), yb, phase, source, rb, adjust)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                continue
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor
            objective.set_iteration(i)
            if config.optim == "none":
                loss = objective(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            elif config.optim == "sam":
                loss = optimizer.step(lambda xb=xb, yb=yb: objective(model(xb), yb))
            else:
                loss = optimizer.step(lambda xb=xb, yb=yb: objective.grouped(model(xb), yb, tail_t))
            losses.append(float(loss.detach()))
        if config.optim == "ssesam":
            optimizer.epoch_end()
        row = {"epoch": epoch + 1, "iteration": (epoch + 1) * per_epoch, "loss": float(np.mean(losses)),
               "lr": float(optimizer.param_groups[0]["lr"])}
        if not np.isfinite(row["loss"]):
            raise UserError(f"{out}: the training loss became {row['loss']} at epoch {epoch + 1}; lower --lr")
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update()
        done = epoch + 1
        if done % config.checkpoint_every == 0 or done == stop:
            _save_checkpoint(out, done, model, optimizer, opt_key, history)
    bar.close()
    if stop < config.epochs:
        return out

    model.eval()
    _save_tensors(model.state_dict(), out / "model.safetensors")
    _write_json(out / "history.json", history)
    save_curves_png(history, out / "curves.png")
    nc = nc_metrics(model, blocks, labels, groups, train.names)
    if isinstance(model.fuse, WeightedSources):
        nc["source_weights"] = dict(zip([s.name for s in train.specs], model.fuse.source_weights()))
    _write_json(out / "nc.json", nc)
    if test is not None:
        metrics = evaluate(model, test, counts, config, device)
        metrics.update({"split": config.test_split, "labels": config.test_labels or config.labels,
                        "features": config.features, "nc": nc})
        _write_json(out / "metrics.json", metrics)
        save_accuracy_png(metrics, out / "accuracy.png", title=f"{config.method} ({out.name})")
    return out


@torch.no_grad()
def nc_metrics(model: ClsModel, blocks: Sequence[torch.Tensor], labels: torch.Tensor, groups: dict[str, list[str]],
               names: Sequence[str]) -> dict:
    """NC1–NC4 (and margins) of the trained head on the training features, per head (per DirMixE expert),
    with NC1/NC2 on the head and tail groups alone; NaN-free (a failing metric is reported as null)."""
    index = {n: i for i, n in enumerate(names)}
    ids = {g: [index[n] for n in members] for g, members in groups.items() if g in ("head", "tail")}
    out = {}
    for name, h, w, b in model.penultimate(blocks):
        if torch.unique(labels).numel() < 2:
            break
        values = neural_collapse_metrics(h.cpu(), labels.cpu(), w.cpu(), None if b is None else b.cpu(), ids)
        out[name] = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
    return out


# -------------------------------------------------------------------------------------------- evaluation
def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean()) if len(labels) else float("nan")


@torch.no_grad()
def evaluate(model: ClsModel, test: ClsData, train_counts: np.ndarray, config: ClsTrainConfig,
             device: torch.device | None = None, tta: bool = True) -> dict:
    """Accuracy on every test-agnostic distribution (forward-LT, uniform, backward-LT, Dirichlet draws), their
    means, and accuracy on the whole test set; for DirMixE per expert, of the equal-weight mean ("default")
    and after test-time aggregation on each distribution ("tta")."""
    device = device or next(model.parameters()).device
    model.eval()
    blocks, labels = _tensors(test, device)
    normed = model.norm(blocks)
    logits = model.forward_normed(normed)
    experts = logits.ndim == 3
    variants: dict[str, Callable[[np.ndarray], torch.Tensor]] = {}
    if experts:
        variants["default"] = lambda idx: aggregate(logits[:, idx]).argmax(-1)
        for k, name in enumerate(EXPERT_NAMES):
            variants[name] = lambda idx, k=k: logits[k, idx].argmax(-1)
        if tta:
            flat = torch.cat(normed, 1)
            dims = [b.shape[1] for b in normed]
            agg = config.aggregation_config()

            def tta_predict(idx):
                weights, _ = test_time_aggregation(lambda x: model.forward_normed(list(x.split(dims, 1))),
                                                   flat[idx], agg, seed=config.eval_seed)
                tta_weights.append(weights.tolist())
                return aggregate(logits[:, idx], weights).argmax(-1)

            variants["tta"] = tta_predict
    else:
        variants["default"] = lambda idx: logits[idx].argmax(-1)
    sets = shifted_test_sets(test.labels, train_counts, num_classes=test.num_classes,
                             dirichlet_draws=config.dirichlet_draws, seed=config.eval_seed)
    rows = []
    for s in sets:
        idx = torch.as_tensor(s.indices, device=device, dtype=torch.long)
        tta_weights: list = []
        acc = {name: _accuracy(fn(idx), labels[idx]) for name, fn in variants.items()}
        row = {"name": s.name, "kind": s.kind, "ratio": s.ratio, "images": int(len(s.indices)),
               "counts": s.counts.tolist(), "accuracy": acc}
        if tta_weights:
            row["tta_weights"] = tta_weights[0]
        rows.append(row)

    def mean(names: list[str], rows_=rows) -> dict[str, float]:
        chosen = [r for r in rows_ if r["name"] in names]
        return {v: float(np.mean([r["accuracy"][v] for r in chosen])) for v in variants} if chosen else {}

    sade = [r["name"] for r in rows if not r["kind"].startswith("dirichlet")]
    dirichlet = [r["name"] for r in rows if r["kind"].startswith("dirichlet")]
    full_idx = torch.arange(len(labels), device=device)
    pred_full = variants["default"](full_idx)
    per_class = [float((pred_full[labels == c] == c).double().mean()) if (labels == c).any() else None
                 for c in range(test.num_classes)]
    present = [a for a in per_class if a is not None]
    return {"images": len(test), "classes": test.names, "distributions": rows,
            "mean_accuracy": mean(sade + dirichlet), "mean_accuracy_sade": mean(sade),
            "mean_accuracy_dirichlet": mean(dirichlet),
            "full_test": {"accuracy": _accuracy(pred_full, labels), "class_mean_accuracy": float(np.mean(present)),
                          "per_class_accuracy": dict(zip(test.names, per_class))},
            "report": test.report}


def save_accuracy_png(metrics: dict, path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against test distribution: forward-LT → uniform → backward-LT as lines, Dirichlet draws as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt



    rows = metrics["distributions"]
    sade = [r for r in rows if not r["kind"].startswith("dirichlet")]
    dirichlet = [r for r in rows if r["kind"].startswith("dirichlet")]
    variants = list(rows[0]["accuracy"]) if rows else []
    fig, axes = plt.subplots(1, 2 if dirichlet else 1, figsize=(11 if dirichlet else 7, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [11, 9] if dirichlet else [1]})
    for v in variants:
        style = {"lw": 2.2} if v in ("default", "tta") else {"lw": 1, "ls": "--"}
        axes[0, 0].plot(range(len(sade)), [100 * r["accuracy"][v] for r in sade], marker="o", label=v, **style)
        if dirichlet:
            axes[0, 1].plot(range(len(dirichlet)), [100 * r["accuracy"][v] for r in dirichlet], marker="o",
                            ls="none" if v not in ("default", "tta") else "-", label=v)
    axes[0, 0].set_xticks(range(len(sade)), [r["name"].replace("forward-", "F").replace("backward-", "B")
                                             for r in sade], rotation=45)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, 0].set_title(f"{title}  mean {100 * metrics['mean_accuracy'].get('default', float('nan')):.1f}%")
    axes[0, 0].legend(fontsize=7)
    if dirichlet:
        axes[0, 1].set_xticks(range(len(dirichlet)), [r["name"].replace("dirichlet-", "D").replace("forward", "F")
                                                      .replace("backward", "B").replace("uniform", "U")
                                                      for r in dirichlet], rotation=45)
        axes[0, 1].set_title("Dirichlet test priors")
    fig.tight_layout()
    save_figure(fig, path)


def load_run(run: str | os.PathLike) -> tuple[dict, ClsTrainConfig, ClsModel]:
    """(saved config.json, its config, the trained model on the CPU in eval mode) of a train-cls run."""
    run = Path(run)
    file = run / "config.json"
    if not file.is_file():
        raise UserError(f"{run}: not a train-cls run (no config.json)")
    try:
        saved = json.loads(file.read_text())
        config = ClsTrainConfig.from_dict(saved["config"])
        specs = [SourceSpec.from_dict(s) for s in saved["sources"]]
        names = saved["classes"]["names"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: unreadable run config ({e})") from None
    if "method" not in saved["config"] or "fusion" not in saved["config"]:
        raise UserError(f"{file}: not a train-cls run config")
    weights = run / "model.safetensors"
    if not weights.is_file():
        checkpoint = _latest_checkpoint(run)
        if checkpoint is None:
            raise UserError(f"{run}: no trained weights yet (no model.safetensors or checkpoint)")
        weights = checkpoint / "model.safetensors"
    model = ClsModel([s.dim for s in specs], len(names), config)
    model.load_state_dict(_load_tensors(weights)[0])
    return saved, config, model.eval()


def eval_cls(run: str | os.PathLike, features: Sequence[str], labels: str, *, split: str | None = None,
             out: str | os.PathLike | None = None, tta: bool = True, dirichlet_draws: int | None = None,
             seed: int | None = None, drop_unseen: bool = False) -> dict:
    """Test-agnostic scores of a trained run on features and labels; writes metrics.json and accuracy.png to
    `out` (default RUN/eval-<split or labels file stem>). Without `split` the labels CSV's keys are the test set;
    with it, every store key under that prefix (each must be labelled)."""
    saved, config, model = load_run(run)
    if dirichlet_draws is not None:
        config.dirichlet_draws = dirichlet_draws
    if seed is not None:
        config.eval_seed = seed
    specs = [SourceSpec.from_dict(s) for s in saved["sources"]]
    counts = np.asarray(saved["classes"]["train_counts"])
    test = load_split(features, labels, split=split, explicit=split is None, names=saved["classes"]["names"],
                      layers=config.layers, sources=config.sources, pool_grid=config.pool_grid, specs=specs)
    test = check_test_classes(test, counts, labels, drop_unseen)
    device = _device(config)
    model = model.to(device)
    metrics = evaluate(model, test, counts, config, device, tta=tta)
    nc_file = Path(run) / "nc.json"
    nc = json.loads(nc_file.read_text()) if nc_file.is_file() else None
    metrics.update({"run": str(run), "split": split, "labels": str(labels), "features": list(features), "nc": nc})
    name = (split or Path(labels).stem).strip("/").replace("/", "-")
    out = Path(out) if out else Path(run) / f"eval-{name}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    _write_json(out / "metrics.json", metrics)
    save_accuracy_png(metrics, out / "accuracy.png", title=f"{config.method} ({Path(run).name})")
    return {**metrics, "out": str(out)}


def summary_line(metrics: dict) -> str:
    """One line: mean accuracy over the test-agnostic distributions (per variant) and on the whole test set."""
    means = "  ".join(f"{k} {100 * v:.1f}" for k, v in metrics["mean_accuracy"].items()
                      if k in ("default", "tta"))
    return (f"mean accuracy over {len(metrics['distributions'])} test distributions: {means}; "
            f"full test set {100 * metrics['full_test']['accuracy']:.1f} "
            f"(class mean {100 * metrics['full_test']['class_mean_accuracy']:.1f})")


__all__ = ["ClsTrainConfig", "ClsModel", "train_cls", "eval_cls", "evaluate", "load_run", "summary_line"]
