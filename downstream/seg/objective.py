"""The training objective of a segmentation head: a loss chosen by name, class weights from the training
pixel counts, AUCSeg's tail memory bank on the batch, one loss per ensemble member, and the amalgamation's Eq. 5
regulariser weighted as the run asks (`downstream.seg.amalgamate.penalty_weighting`).

`LOSSES` maps a name to a factory ``(config, class_weights, ignore_index) → module``; the module returns
``(total, {"ce": …, "auc": …})`` on logits ``[B, K, H, W]`` at the mask resolution. A new loss is one
decorated factory (`register_loss`); the config's choices come from this table.

torch is imported where it is used, not at load: the CLI reads `LOSSES` and `CLASS_WEIGHTS` at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from downstream.seg.classes import SegClasses
    from downstream.seg.config import SegTrainConfig
    from downstream.seg.memory_bank import FeatureMemoryBank

LOSSES: dict[str, Callable[..., Any]] = {}

# CE class weights w_c ∝ (N_c / ΣN)^(−power) (`downstream.losses.aucseg.class_weights_from_counts`): name → power.
CLASS_WEIGHTS: dict[str, float | None] = {"none": None, "inverse": 1.0, "sqrt-inverse": 0.5}


def register_loss(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add a loss factory ``(config, class_weights, ignore_index) → module`` under `name`."""
    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        LOSSES[name] = factory
        return factory
    return add


@register_loss("ce")
def cross_entropy(config: SegTrainConfig, class_weights, ignore_index: int):
    """Pixel cross-entropy, ``mean_p −w_{y_p} log softmax(z_p)[y_p] / mean_p w_{y_p}`` over non-ignored pixels;
    the pixel AUC is logged (without a graph) but not trained."""
    from downstream.losses.aucseg import SegLoss

    return SegLoss("ce", config.auc_weight, config.margin, class_weights, ignore_index, config.ce_average)


@register_loss("aucseg")
def aucseg(config: SegTrainConfig, class_weights, ignore_index: int):
    """AUCSeg: ``CE + λ · L_auc``, L_auc the mean over class pairs of the square pixel AUC surrogate
    (`downstream.losses.pixel_auc_loss`), λ = `auc_weight`, γ = `margin`."""
    from downstream.losses.aucseg import SegLoss

    return SegLoss("aucseg", config.auc_weight, config.margin, class_weights, ignore_index, config.ce_average)


class SegObjective:
    """What the trainer minimises: `augment` a batch (memory bank), then ``total, logged = objective(outputs,
    mask, terms)`` with ``total`` = L + penalty, L = Σ over ensemble members of each member's loss (members train
    independently), the penalty = `weighting` of the amalgamation's Eq. 5 `terms` (what ``SegModel(…,
    with_penalty=True)`` returns; `downstream.seg.amalgamate`) and L, when there are both; ``logged`` = [mean
    loss, mean CE, mean AUC] over members (detached), then the penalty if one was added. Each call is one
    training iteration: an adaptive weighting takes a step after it."""

    def __init__(self, loss, bank: FeatureMemoryBank | None = None, weighting=None):
        self.loss, self.bank, self.weighting = loss, bank, weighting

    def augment(self, features: Sequence[torch.Tensor], mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.bank is None:
            return list(features), mask
        return self.bank.apply_batch(features, mask)

    def __call__(self, outputs: Sequence[torch.Tensor], mask: torch.Tensor,
                 terms: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        losses, ces, aucs = [], [], []
        for z in outputs:  # heads predict on the feature grid; the loss is taken at the mask's resolution
            z = F.interpolate(z.float(), size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
            loss, parts = self.loss(z, mask)
            losses.append(loss)
            ces.append(parts["ce"])
            aucs.append(parts["auc"])
        total = torch.stack(losses).sum()
        logged = torch.stack([total.detach() / len(losses), torch.stack(ces).mean(), torch.stack(aucs).mean()])
        if terms is not None and self.weighting is not None:
            penalty = self.weighting.penalty(terms, total)
            self.weighting.update(total.detach())
            total = total + penalty
            logged = torch.cat([logged, penalty.detach().reshape(1).to(logged)])
        return total, logged

    # -- checkpoint state: the memory bank's objects and random state (a resumed run pastes the same objects), the
    # weighting's walk (a resumed run weights the penalty as an uninterrupted one)
    def state(self) -> dict[str, Any]:
        # A bank with no object yet has no tensors: its (empty, meta) pair is then stored as JSON.
        state: dict[str, Any] = {} if self.bank is None else {"bank": self.bank.state_dict()}
        if self.weighting is not None and self.weighting.state():
            state["amalgamation_weighting"] = self.weighting.state()
        return state

    def load_state(self, checkpoint) -> None:
        if self.bank is not None and "bank" in checkpoint:
            tensors, meta = checkpoint.load("bank")
            self.bank.load_state_dict(tensors, meta)
        if self.weighting is not None and "amalgamation_weighting" in checkpoint:
            self.weighting.load_state(checkpoint.load("amalgamation_weighting"))


def build_objective(config: SegTrainConfig, classes: SegClasses, pixel_counts, rank: int = 0) -> SegObjective:
    """The objective `config` asks for; each process of a launch keeps its own memory bank (as AUCSeg keeps
    one per data-loader worker) and its own adaptive amalgamation weighting (which steps on its own loss), seeded
    by its rank."""
    from difffeat.spine.run import ConfigError
    from downstream.losses.aucseg import class_weights_from_counts

    power = CLASS_WEIGHTS[config.class_weights]
    weights = None if power is None else class_weights_from_counts(pixel_counts, power)
    loss = LOSSES[config.loss](config, weights, classes.ignore_index)
    bank = None
    if config.memory_bank:
        from downstream.seg.classes import check_tail_classes
        from downstream.seg.memory_bank import FeatureMemoryBank

        tail = check_tail_classes(config.tail_classes, classes.num_classes) or classes.tail_ids()
        if not tail:
            raise ConfigError("memory_bank", "needs tail classes (groups in classes.json, or pixel counts)")
        bank = FeatureMemoryBank(tail, config.bank_capacity, config.bank_sample_ratio,
                                 config.bank_min_cell_fraction, seed=config.seed * 1000 + rank)
    weighting = None
    head = config.head
    if head.variants == "amalgamate":
        from downstream.seg.amalgamate import penalty_weighting

        weighting = penalty_weighting(head.amalgamation_weighting, head.gamma_sparsity, head.gamma_diversity,
                                      seed=config.seed * 1000 + rank)
    return SegObjective(loss, bank, weighting)
