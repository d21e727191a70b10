"""Long-tail losses for heads on stored features: small pure functions, the formula in each docstring.

One module per loss family; everything public is re-exported here (`downstream.losses.<name>`).
"""

from downstream.losses.logit_adjusted import logit_adjusted_loss
from downstream.losses.pixel_auc import pixel_auc_loss, pixel_auc_loss_pairwise

__all__ = ["logit_adjusted_loss", "pixel_auc_loss", "pixel_auc_loss_pairwise"]

from downstream.losses.aucseg import (  # noqa: E402
    CE_AVERAGES,
    SegLoss,
    aucseg_loss,
    class_weights_from_counts,
    seg_cross_entropy,
)

__all__ += ["CE_AVERAGES", "SegLoss", "aucseg_loss", "class_weights_from_counts", "seg_cross_entropy"]

from downstream.losses.class_balanced import class_balanced_weights, deferred_switch_epoch, drw_weights  # noqa: E402
from downstream.losses.distributed import all_reduce_sum, distributed_pixel_auc_loss  # noqa: E402
from downstream.losses.drauc import (  # noqa: E402
    ALPHA_STEPS,
    DRAUCLoss,
    distribution_aware_budgets,
    drauc_instance_loss,
)
from downstream.losses.ldam import CosineClassifier, LDAMLoss, ldam_loss, ldam_margins  # noqa: E402
from downstream.losses.pixel_auc import auc_from_moments, pixel_class_counts, pixel_class_moments  # noqa: E402
from downstream.losses.prior import PRIOR_FLOOR, class_prior, warn_zero_counts, zero_count_classes  # noqa: E402

# The measure `tkpr` itself stays in its module: re-exported, it would shadow the submodule's name.
from downstream.losses.tkpr import ranking_loss, tkpr_loss, tkpr_surrogate_loss  # noqa: E402
from downstream.losses.tla_adrw import TLAADRWLoss, adrw_weights, tla_adrw_loss  # noqa: E402
from downstream.losses.vs import VSLoss, vs_loss  # noqa: E402

__all__ += ["class_balanced_weights", "deferred_switch_epoch", "drw_weights", "all_reduce_sum",
            "distributed_pixel_auc_loss", "auc_from_moments", "pixel_class_counts", "pixel_class_moments",
            "ALPHA_STEPS", "DRAUCLoss",
            "distribution_aware_budgets", "drauc_instance_loss", "CosineClassifier", "LDAMLoss", "ldam_loss",
            "ldam_margins", "PRIOR_FLOOR", "class_prior", "warn_zero_counts", "zero_count_classes",
            "ranking_loss", "tkpr_loss", "tkpr_surrogate_loss", "TLAADRWLoss", "adrw_weights",
            "tla_adrw_loss", "VSLoss", "vs_loss"]
