"""Long-tail losses for heads on stored features: small pure functions, the formula in each docstring.

One module per loss family; everything public is re-exported here (`downstream.losses.<name>`).
"""

from downstream.losses.logit_adjusted import logit_adjusted_loss
from downstream.losses.pixel_auc import pixel_auc_loss, pixel_auc_loss_pairwise

__all__ = ["logit_adjusted_loss", "pixel_auc_loss", "pixel_auc_loss_pairwise"]
