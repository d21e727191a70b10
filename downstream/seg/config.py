"""What defines a segmentation run: `SegTrainConfig` (train-seg), `HeadConfig` (the model part of it) and
`SegEvalConfig` (eval-seg).

Each field's default, help, choices and bounds are written once, here, with `difffeat.spine.run.option`; the
configs validate themselves (`ConfigError` names the field) and the CLI flags are generated from them
(`downstream.seg.cli`). This module imports no torch: the CLI reads it at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from difffeat.spine.run import Config, ConfigError, nested, option
from downstream.seg.objective import CLASS_WEIGHTS, LOSSES
from downstream.seg.sampler import SAMPLERS

HEADS = ("mlp", "conv")
VARIANT_MODES = ("concat", "weighted", "amalgamate")
ASSIGNER_FORMS = ("pixel", "global")  # downstream.seg.amalgamate.ASSIGNER_FORMS (a test keeps the two equal)
AMALGAMATION_WEIGHTINGS = ("released", "paper")  # downstream.seg.amalgamate.WEIGHTINGS (a test keeps them equal)
# Maps concatenated after amalgamation, not amalgamated: the attention feature (cross-attention maps are
# stored as LAYER:probs), as the content-shift paper does.
CONCAT_AFTER = ("*:probs",)
MASK_SIZE_MODES = ("resize", "refuse")
MIXED_PRECISION = ("no", "fp16", "bf16")


def same_option(config_cls: type[Config], name: str, **change: Any) -> Any:
    """A field declared like `config_cls`'s field `name` (same default, help, bounds), with `change`s: so
    that a default shared by two configs is written once."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return option(**{**f.metadata, "default_factory": f.default_factory, **change})
    return option(f.default, **{**f.metadata, **change})


@dataclass
class HeadConfig(Config):
    """Which head and how the feature maps reach it."""

    kind: str = option("conv", choices=HEADS, flag="--head", help="pixel MLP ensemble or multi-scale conv head")
    variants: str = option("concat", choices=VARIANT_MODES,
                           help="several feature variants (stores, or NAME/LAYER variants of one store): "
                                "concatenate, a learned softmax-weighted sum, or the content-shift paper's "
                                "amalgamation (input-conditioned weight assigners)")
    assigners: int = option(1, min=1, help="amalgamate: weight assigners n (the paper uses 1–3); the "
                                           "amalgamated feature is their n weighted sums, concatenated")
    assigner: str = option("pixel", choices=ASSIGNER_FORMS,
                           help="amalgamate: per-pixel MLP assigner (weights per pixel) or CNN + global pooling "
                                "(one weight vector per image)")
    assigner_hidden: int = option(128, min=1, help="amalgamate: hidden width of each weight assigner (the "
                                                   "released code's 128)")
    amalgamation_weighting: str = option("released", choices=AMALGAMATION_WEIGHTINGS,
                                         help="amalgamate: how Eq. 5's regulariser is weighted: as the released "
                                              "code does (sparsity / n only, scaled to the task loss by a "
                                              "coefficient that starts at 0 and adapts) or as the paper writes it "
                                              "(fixed --gamma-sparsity, --gamma-diversity)")
    gamma_sparsity: float = option(0.01, min=0, help="amalgamate, paper weighting: γ1 of Eq. 5 (rewards weight on "
                                                     "few variants)")
    gamma_diversity: float = option(0.01, min=0, help="amalgamate, paper weighting: γ2 of Eq. 5 (rewards "
                                                      "assigners that differ)")
    concat_after: list[str] = option(default_factory=lambda: list(CONCAT_AFTER), metavar="PATTERN",
                                     help="weighted / amalgamate: layers (pattern on the name without its "
                                          "variant prefix) concatenated after the amalgamation instead of "
                                          "amalgamated; repeat (default: the attention feature, *:probs)")
    ensemble: int = option(10, min=1, help="members of the pixel MLP ensemble (ddpm-segmentation uses 10)")
    hidden: int = option(128, min=1, help="width of the conv head (each layer's projection and the fuse conv)")
    dropout: float = option(0.1, min=0, max=1, help="conv head: dropout before the classifier")
    normalize: bool = option(True, help="standardise each input channel by train-set statistics")

    def check(self) -> None:
        """γ1 and γ2 act only in the paper's weighting: set to other than their defaults with the released one,
        they are an error naming the field (a default γ is not told apart from an unset one)."""
        if self.amalgamation_weighting == "paper":
            return
        for name in ("gamma_sparsity", "gamma_diversity"):
            default = next(f.default for f in dataclasses.fields(HeadConfig) if f.name == name)
            if getattr(self, name) != default:
                raise ConfigError(name, f"acts only with the paper's weighting (--amalgamation-weighting paper); "
                                        f"the {self.amalgamation_weighting} weighting has no fixed γ")


@dataclass
class SegTrainConfig(Config):
    """Everything that defines a training run; written to RUN/config.json, from which a run can be repeated."""

    features: list[str] = option(help="feature store; repeat for several variants", metavar="DIR")
    out: str = option(help="run folder", metavar="RUN")
    data: str | None = option(None, metavar="LAYOUT:ROOT", help="the data set of the masks in its native layout "
                                                                "(ade20k, cityscapes, voc, coco-stuff, ddpm-seg, hf, "
                                                                "shapes-lt; docs/datasets.md); default: the one the "
                                                                "store was extracted from")
    masks: str | None = option(None, metavar="DIR", help="mask root (a Shapes-LT / imagefolder root, a data set's "
                                                          "root, or a folder of masks), instead of --data")
    classes: str | list[str] | None = option(None, help="classes.json, a names file or a,b,c "
                                                        "(default: the data set's, or MASKS/classes.json)")
    split: str | None = option(None, help="train on this split of the data set (a key folder, e.g. train, for a "
                                          "mask root)")
    val_split: str | None = option(None, help="evaluate on this split (e.g. val) every "
                                              "--eval-every iterations and at the end")
    layers: list[str] | None = option(None, flag="--layer", metavar="NAME", help="use only these layers; repeat")
    mask_size: str = option("resize", choices=MASK_SIZE_MODES,
                            help="a mask whose size differs from the features' source images: resize "
                                 "(nearest) or refuse")
    # The head's options, each with its own flag (--head, --hidden, --variants …); the flat names of older configs
    # load into it.
    head: HeadConfig = nested(HeadConfig, prefix=None, legacy={
        "head": "kind", **{f: f for f in ("variants", "assigners", "assigner", "assigner_hidden",
                                           "amalgamation_weighting", "gamma_sparsity", "gamma_diversity",
                                           "concat_after", "ensemble", "hidden", "dropout", "normalize")}})
    loss: str = option("ce", choices=tuple(LOSSES), help="training loss (AUCSeg = CE + λ·pixel AUC)")
    # 0.5 ≙ AUCSeg's w_auc = 1 (downstream.losses.aucseg.DEFAULT_AUC_WEIGHT; a test keeps the two equal)
    auc_weight: float = option(0.5, min=0, help="λ in CE + λ·AUC (0.5 = AUCSeg's w_auc 1)")
    margin: float = option(1.0, help="margin of the square AUC surrogate")
    class_weights: str = option("none", choices=tuple(CLASS_WEIGHTS),
                                help="CE class weights from the training pixel counts")
    memory_bank: bool = option(False, help="feature-space T-Memory Bank on tail classes")
    # ("valid", "all") = downstream.losses.aucseg.CE_AVERAGES (a test keeps the two equal; no torch here)
    ce_average: str = option("valid", choices=("valid", "all"),
                             help="CE over the valid pixels (torch) or over all pixels, ignored ones too (mmseg, as "
                                  "AUCSeg's configs)")
    sampler: str = option("random", choices=SAMPLERS,
                          help="batches: the seeded random stream, or class-aware (every class of the training "
                               "masks in each batch)")
    tail_classes: list[int] | None = option(None, flag="--tail-class", metavar="ID",
                                            help="tail class ids for the memory bank and a listed-tail mIoU (a "
                                                 "profile's released list; default: the tail group); repeat")
    bank_capacity: int = option(5, min=1, help="memory bank: objects kept per tail class")
    bank_sample_ratio: float = option(1.0, min=0, max=1,
                                      help="memory bank: share of the absent tail classes pasted per sample")
    bank_min_cell_fraction: float = option(0.5, above=0, max=1,
                                           help="memory bank: a feature cell is pasted where the object "
                                                "covers this share of it")
    iterations: int = option(2000, min=1)
    batch_size: int = option(8, min=1)
    lr: float = option(1e-3, above=0, help="AdamW learning rate (poly schedule)")
    weight_decay: float = option(0.01, min=0)
    poly_power: float = option(1.0, min=0, help="power of the poly learning-rate schedule")
    warmup_iterations: int = option(0, min=0, flag="--warmup", help="linear warm-up iterations")
    seed: int = option(0)
    log_every: int = option(10, min=1, help="log the mean loss every N iterations")
    checkpoint_every: int = option(500, min=1)
    eval_every: int = option(0, min=0, help="validate every N iterations (0: at the end)")
    eval_batch_size: int = option(16, min=1)
    mixed_precision: str = option("no", choices=MIXED_PRECISION, help="accelerate's mixed precision")
    cache_bytes: int = option(1 << 30, min=0, help="hold features and masks in RAM up to this many bytes")
    num_workers: int = option(0, min=0, help="data-loader worker processes")
    extra: dict = option(default_factory=dict, cli=False, help="free-form notes kept with the run")

    def check(self) -> None:
        if not self.features:
            raise ConfigError("features", "give at least one feature store")
        if self.data and self.masks:
            raise ConfigError("masks", "give --data or --masks, not both")


@dataclass
class SegEvalConfig(Config):
    """An evaluation of a trained run on features and masks (eval-seg); written next to its scores."""

    run: str = option(help="train-seg run folder", metavar="RUN")
    features: list[str] = option(help="feature store(s), as in training", metavar="DIR")
    data: str | None = same_option(SegTrainConfig, "data")
    masks: str | None = same_option(SegTrainConfig, "masks")
    split: str | None = option(None, help="evaluate this split of the data set (a key folder, e.g. test, for a "
                                          "mask root)")
    resolution: str = option("original", choices=("original", "frame"),
                             help="original: at each mask's own size, as mmsegmentation scores; frame: at the "
                                  "extraction size")
    out: str | None = option(None, help="where to write metrics.json and confusion.png (default RUN/eval-SPLIT)")
    mask_size: str | None = option(None, choices=MASK_SIZE_MODES, help="default: as in training")
    batch_size: int = same_option(SegTrainConfig, "eval_batch_size", flag=None)

    def check(self) -> None:
        if not self.features:
            raise ConfigError("features", "give at least one feature store")
