"""What defines a classification run: `ClsTrainConfig` (train-cls), `EvalClsConfig` (eval-cls), and the
hyper-parameters of DirMixE, its test-time aggregation and ReconBoost.

Plain data, importable without torch (the CLI builds its flags from these fields at start-up). Every
default is written once, here: the CLI flags come from the fields (`difffeat.spine.config_cli`), and DirMixE's /
ReconBoost's defaults are the fields of their own configs, which the train config's fields point to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from difffeat.spine.run import Config, ConfigError, nested, option

METHODS = ("ce", "la", "vs", "ldam", "tla-adrw", "dirmixe", "drauc", "tkpr")
OPTIMIZERS = ("none", "sam", "imbsam", "ssesam")
HEADS = ("linear", "cosine", "etf", "grassmannian")
FUSIONS = ("concat", "weighted", "reconboost")
SOURCE_MODES = ("store", "layer")
NORMALISED_HEAD_METHODS = ("ldam", "dirmixe")  # default head: cosine for these, linear otherwise
TTA_ADAPT = ("independent", "scored")
DRAUC_SCHEDULES = ("step", "cosine")
# warmup-cosine: difffeat's linear warm-up then cosine per iteration; epoch-cosine: the ImbSAM / SSE-SAM scripts'
# CosineAnnealingLR(T_max = E) stepped before each epoch (no warm-up; epoch e trains at ½(1 + cos(π(e + 1)/E))·lr)
LR_SCHEDULES = ("warmup-cosine", "epoch-cosine")
DRAUC_ALPHA_STEPS = ("released", "autograd")  # downstream.losses.drauc.ALPHA_STEPS (a test keeps the two equal)
TKPR_SURROGATES = ("logistic", "hinge", "squared_hinge", "exp")  # downstream.losses.tkpr.SURROGATES
TKPR_FORMS = ("pairwise", "pointwise")
# The SADE protocol's test distributions (CIFAR's also hold 100; the profiles set each data set's).
FORWARD_RATIOS = (50, 25, 10, 5, 2)
BACKWARD_RATIOS = (2, 5, 10, 25, 50)
# = downstream.optim.RELEASED_TAIL_WEIGHT (a test keeps the two equal; this module imports no torch).
IMBSAM_RELEASED_TAIL_WEIGHT = 2.0


# ------------------------------------------------------------------------------ sub-algorithm configs
@dataclass
class DirMixEConfig(Config):
    """DirMixE's training hyper-parameters (defaults: the CIFAR-100-LT configuration of the code)."""

    tau: float = option(1.3, help="power τ of the prior shift (`power`)")
    lambda_var: float = option(5.0, min=0, help="λ of the semi-variance (CIFAR-10 15, ImageNet-LT and iNat 1)")
    trials: int = option(60, min=1, help="T draws per iteration")
    concentration: float = option(1e4, above=0, help="α0 (1e5 in the iNat config)")
    switch_fraction: float = option(0.8, min=0, max=1,
                                    help="the variance term is on after epoch int(0.8·(E + 1)) (1-based)")
    scale: float = option(30.0, above=0, cli=False, help="cosine classifier scale s (train-cls: its --scale)")


@dataclass
class AggregationConfig(Config):
    """SADE's test-time self-supervised aggregation (B.5); the augmentations are ours (feature space)."""

    lr: float = option(0.1, above=0)
    momentum: float = option(0.9, min=0)
    weight_decay: float = option(5e-4, min=0)
    batch_size: int = option(128, min=1)
    epochs: int = option(5, min=0, help="passes at most")
    steps_per_pass: int = option(0, min=0, help="0: a pass is one sweep of the set, as SADE; N > 0: at least N "
                                                "batches per pass, cycling a small set (difffeat's former 79)")
    min_weight: float = option(0.05, min=0, help="stop after a pass once some ω_k, rounded to 2 decimals, falls "
                                                 "below this")
    dropout: float = option(0.3, min=0, max=1, help="each standardised feature is zeroed (set to the training "
                                                    "mean) with this probability")
    noise: float = option(0.3, min=0, help="then Gaussian noise of this std is added (in units of the training "
                                           "std)")


@dataclass
class ReconBoostConfig(Config):
    """ReconBoost's schedule and weights (defaults: the CREMA-D setting of the code, rectification shorter)."""

    stages: int = option(16, min=1, help="modality-update + rectification rounds (sources visited in turn)")
    stage_epochs: int = option(4, min=1, help="epochs of each modality update (`epochs_per_stage`)")
    correct_epochs: int = option(2, min=1, help="epochs of each global rectification (`correct_epoch`)")
    weight1: float = option(5.0, help="λ₁")
    weight2: float = option(1.0, help="λ₂, the reconcilement weight")
    lr: float | None = option(None, above=0, help="modality-update SGD learning rate (`m_lr`; default: train-cls's "
                                                  "--lr; the code's is 0.01)")
    correct_lr: float | None = option(None, above=0, help="rectification SGD learning rate (`e_lr`; default: the "
                                                          "update's)")
    momentum: float | None = option(None, min=0, help="SGD momentum of both phases (default: train-cls's)")
    weight_decay: float | None = option(None, min=0, help="SGD weight decay of both phases (default: train-cls's)")
    head_hidden: int = option(128, min=1, help="width of the shared head's hidden layer")

    @property
    def epochs(self) -> int:
        return self.stages * (self.stage_epochs + self.correct_epochs)

    def filled(self, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> ReconBoostConfig:
        """A copy with the unset optimiser settings given values: `lr` for the update (and the rectification
        when its own is unset), `momentum`, `weight_decay` (defaults: the code's CREMA-D values; train-cls passes
        its own, `ClsTrainConfig.reconboost_config`)."""
        update = self.lr if self.lr is not None else lr
        return dataclasses.replace(
            self, lr=update, correct_lr=self.correct_lr if self.correct_lr is not None else update,
            momentum=self.momentum if self.momentum is not None else momentum,
            weight_decay=self.weight_decay if self.weight_decay is not None else weight_decay)


# ---------------------------------------------------------------------------------------- train-cls
@dataclass
class ClsTrainConfig(Config):
    """Everything that defines a train-cls run; written to RUN/config.json, from which a run can be repeated.

    `resolve()` fills the values that depend on others (the head; the epochs of a ReconBoost run).
    """

    features: list[str] = option(help="feature store; repeat for several sources")
    labels: str = option(help="CSV with key,label columns (label: class name or integer id)")
    out: str = option(help="run folder")
    test_labels: str | None = option(None, help="a separate key,label CSV of test keys (then --labels lists the "
                                                "training keys exactly)")
    split: str | None = option(None, help="train on the store keys under this prefix (e.g. train/); each needs "
                                          "a label")
    test_split: str | None = option(None, help="evaluate at the end on the keys under this prefix (e.g. test/)")
    classes: str | list[str] | None = option(None, help="class names: names file, JSON list / classes.json, or "
                                                        "a,b,c (default: from the labels)")
    layers: list[str] | None = option(None, flag="--layer", help="use only these layers (e.g. up_blocks.1@50); "
                                                                 "repeat")
    sources: str = option("store", choices=SOURCE_MODES, help="one source per store, or per layer of each store "
                                                              "(layers / timesteps as modalities)")
    pool_grid: int = option(1, min=1, help="average-pool onto G×G cells (1: global)")
    fusion: str = option("concat", choices=FUSIONS, help="several sources: concatenate, learned softmax-weighted "
                                                         "sum, or ReconBoost")
    method: str = option("ce", choices=METHODS, help="the training loss (drauc: one-vs-rest DRAUC with its own "
                                                     "optimizer and schedule; tkpr: a TKPR surrogate, reconstructed)")
    optim: str = option("none", choices=OPTIMIZERS, help="sharpness-aware wrapper of SGD (imbsam / ssesam use "
                                                         "the head / tail split)")
    head: str | None = option(None, choices=HEADS, help="default: cosine for ldam and dirmixe, else linear")
    hidden: int = option(256, min=0, help="trunk width (0: no trunk)")
    frame_dim: int | None = option(None, min=1, help="dimension of an etf / grassmannian frame (default: the "
                                                     "trunk output)")
    assignment: str = option("identity", choices=("identity", "random"), help="label → frame vertex assignment")
    scale: float = option(30.0, above=0, help="logit scale of cosine and frame heads (LDAM applies its own)")
    epochs: int = option(100, min=1)
    batch_size: int = option(128, min=1)
    lr: float = option(0.05, above=0)
    momentum: float = option(0.9, min=0, help="SGD momentum")
    nesterov: bool = option(True, help="Nesterov momentum (the ImbSAM / SSE-SAM scripts use plain momentum: "
                                       "--no-nesterov, set by their profile sections)")
    weight_decay: float = option(5e-4, min=0)
    warmup_epochs: int = option(5, min=0, help="warm-up of the warmup-cosine schedule")
    lr_schedule: str = option("warmup-cosine", choices=LR_SCHEDULES,
                              help="warmup-cosine: linear warm-up, then cosine per iteration; epoch-cosine: the "
                                   "ImbSAM / SSE-SAM scripts' per-epoch cosine, no warm-up")
    tau: float = option(1.0, help="LA: τ of z + τ·log π")
    vs_gamma: float = option(0.05, help="VS and TLA stage 1: γ")
    vs_tau: float = option(1.0, help="VS and TLA stage 1: τ")
    tla_tau: float = option(0.75, help="TLA + ADRW stage 2: τ")
    adrw_nu: float = option(0.25, help="TLA + ADRW: ν")
    ldam_margin: float = option(0.5, min=0, help="LDAM: largest margin")
    ldam_scale: float = option(30.0, above=0, help="LDAM: logit scale")
    drw: bool = option(True, help="LDAM-DRW: class-balanced weights from 0.8·epochs on")
    rho: float = option(0.05, min=0, help="SAM / ImbSAM radius; SSE-SAM head radius")
    rho_tail: float = option(0.1, min=0, help="SSE-SAM tail radius")
    imbsam_tail_weight: float = option(IMBSAM_RELEASED_TAIL_WEIGHT, min=0,
                                       help="ImbSAM: weight of the tail loss (2 as released; 1, difffeat's former, "
                                            "makes the loss the batch mean)")
    sse_gamma: float = option(0.7, min=0, max=1, help="SSE-SAM: head radius 0 after γ·epochs")
    tail_eta: float | None = option(None, help="tail classes: fewer training samples than this (default: 20 with "
                                               "imbsam, as released; else 0.2 × the largest class)")
    dirmixe: DirMixEConfig = nested(DirMixEConfig, prefix="dm", help="DirMixE:",
                                    flags={"lambda_var": "--lambda-var", "trials": "--trials",
                                           "concentration": "--concentration"},
                                    legacy={"dm_tau": "tau", "lambda_var": "lambda_var", "trials": "trials",
                                            "concentration": "concentration"})
    aggregation: AggregationConfig = nested(AggregationConfig, prefix="tta", help="DirMixE test-time aggregation:",
                                            flags={"steps_per_pass": "--tta-steps"},
                                            legacy={"tta_lr": "lr", "tta_epochs": "epochs",
                                                    "tta_steps": "steps_per_pass", "tta_weight_decay": "weight_decay",
                                                    "tta_batch_size": "batch_size", "tta_dropout": "dropout",
                                                    "tta_noise": "noise"})
    tta_adapt: str = option("independent", choices=TTA_ADAPT,
                            help="DirMixE on the Dirichlet test sets: adapt on an independent draw of the same kind "
                                 "and ratio (as released) or on the scored set itself (optimistic)")
    reconboost: ReconBoostConfig = nested(ReconBoostConfig, prefix="rb", help="ReconBoost:",
                                          legacy={"rb_stages": "stages", "rb_stage_epochs": "stage_epochs",
                                                  "rb_correct_epochs": "correct_epochs", "rb_weight1": "weight1",
                                                  "rb_weight2": "weight2", "rb_lr": "lr"})
    drauc_epsilon: float = option(0.01, above=0, help="DRAUC: transport budget ε (squared distance, in units of "
                                                      "the median feature norm)")
    drauc_step_size: float = option(0.02, above=0, help="DRAUC: step of the inner ascent (relative units)")
    drauc_steps: int = option(10, min=0, help="DRAUC: inner ascent steps (the code's 10)")
    drauc_lambda_lr: float = option(0.02, min=0, help="DRAUC: step of the dual variable λ (the code's 0.02)")
    drauc_epoch_decay: float = option(2e-3, min=0, help="DRAUC optimizer: pull towards the reference point "
                                                        "(the code's 2e-3)")
    drauc_alpha_step: str = option("released", choices=DRAUC_ALPHA_STEPS, help="DRAUC: α step, released closed "
                                                                              "form or the batch gradient")
    drauc_schedule: str = option("step", choices=DRAUC_SCHEDULES,
                                 help="DRAUC: lr ×0.1 at ½ and ¾ of the epochs or cosine, per epoch and without "
                                      "warm-up, with the reference update at ½ and ¾ under both, as released")
    tkpr_k: int = option(5, min=1, help="TKPR: K of the top-K pairwise ranking surrogate")
    tkpr_surrogate: str = option("logistic", choices=TKPR_SURROGATES, help="TKPR: φ of the surrogate")
    tkpr_form: str = option("pairwise", choices=TKPR_FORMS, help="TKPR: pairwise or pointwise surrogate")
    forward_ratios: list[float] = option(default_factory=lambda: list(FORWARD_RATIOS), nargs="*", min=1,
                                         metavar="RATIO", help="forward-LT test sets (imbalance ratios)")
    backward_ratios: list[float] = option(default_factory=lambda: list(BACKWARD_RATIOS), nargs="*", min=1,
                                          metavar="RATIO", help="backward-LT test sets (imbalance ratios)")
    dirichlet_draws: int = option(3, min=0, help="Dirichlet test sets per component")
    dirichlet_ratio: float = option(100.0, min=1, help="imbalance ratio ρ of the Dirichlet test sets' forward and "
                                                       "backward components (ImageNet-LT 50, iNat 3)")
    dirichlet_concentration: float | None = option(None, above=0,
                                                   help="α0 of the Dirichlet test sets (default: the per-class count "
                                                        "of the balanced test set; ImageNet-LT 1e4, iNat 1e5)")
    many_above: float = option(100, min=0, help="many-shot classes: more than this many training samples")
    few_below: float = option(20, min=0, help="few-shot classes: fewer than this many training samples")
    eval_seed: int = option(0, min=0, help="seed of the resampled test sets and of test-time aggregation")
    drop_unseen: bool = option(False, help="evaluate without test samples of untrained classes")
    seed: int = option(0, min=0)
    checkpoint_every: int = option(10, min=1, help="epochs")
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    extra: dict = option(default_factory=dict, cli=False, help="free-form notes kept with the run")

    def check(self) -> None:
        if not self.features:
            raise ConfigError("features", "give at least one feature store")
        if not self.labels:
            raise ConfigError("labels", "give a key,label CSV")
        head = self.default_head()
        if self.method == "ldam" and head == "linear":
            raise ConfigError("head", "method ldam needs a normalised head: cosine, etf or grassmannian")
        if self.method == "dirmixe" and head != "cosine":
            raise ConfigError("head", "method dirmixe has its own heads (three cosine experts); leave the head unset")
        if self.fusion == "reconboost" and (self.method not in ("ce", "la") or self.optim != "none"
                                            or head != "linear"):
            raise ConfigError("fusion", "reconboost trains with method ce or la, plain SGD (optim none) and its "
                                        "own head")
        if self.method == "drauc" and self.optim != "none":
            raise ConfigError("optim", "method drauc trains with its own optimizer (DRAUC's PESG); leave optim none")
        if self.lr_schedule != "warmup-cosine" and (self.method == "drauc" or self.fusion == "reconboost"):
            raise ConfigError("lr_schedule", "cannot act: method drauc and fusion reconboost have their own schedules "
                                             "(drauc: --drauc-schedule)")
        if self.few_below > self.many_above:
            raise ConfigError("few_below", f"must not exceed many_above ({self.many_above:g})")

    def default_head(self) -> str:
        """The head in force: the given one, else cosine for the methods that need a normalised head."""
        if self.head is not None:
            return self.head
        return "cosine" if self.method in NORMALISED_HEAD_METHODS else "linear"

    def resolve(self) -> ClsTrainConfig:
        """A checked copy with the values that depend on others filled: the head, and the epochs of a
        ReconBoost run (its stages fix them)."""
        self.validate()
        resolved = dataclasses.replace(self, head=self.default_head())
        if resolved.fusion == "reconboost":
            resolved.epochs = resolved.reconboost_config().epochs
        return resolved.validate()

    def dirmixe_config(self) -> DirMixEConfig:
        """DirMixE's settings with the cosine experts' scale of this run (--scale)."""
        return dataclasses.replace(self.dirmixe, scale=self.scale)

    def reconboost_config(self) -> ReconBoostConfig:
        """ReconBoost's settings with what it leaves to train-cls filled in: learning rates, momentum, weight
        decay (one learning rate given serves both phases, as --rb-lr always did)."""
        return self.reconboost.filled(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


# ----------------------------------------------------------------------------------------- eval-cls
@dataclass
class EvalClsConfig(Config):
    """An evaluation of a trained run on (other) features and labels; written to its output folder."""

    run: str = option(help="train-cls run folder")
    features: list[str] = option(help="feature store(s), as in training")
    labels: str = option(help="key,label CSV of the test images")
    split: str | None = option(None, help="the store keys under this prefix (default: the CSV's keys)")
    out: str | None = option(None, help="where to write metrics.json and accuracy.png (default RUN/eval-SPLIT)")
    tta: bool = option(True, help="DirMixE: test-time aggregation (--no-tta skips it)")
    dirichlet_draws: int | None = option(None, min=0, help="Dirichlet test sets per component (default: as "
                                                           "trained)")
    seed: int | None = option(None, min=0, help="seed of the resampled test sets (default: as trained)")
    drop_unseen: bool = option(False, help="evaluate without test samples of untrained classes")

    def check(self) -> None:
        if not self.features:
            raise ConfigError("features", "give at least one feature store")
