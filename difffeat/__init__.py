"""difffeat: features from diffusion models, with content-shift suppression, GATE and long-tail heads."""

__version__ = "0.1.0"

from difffeat.errors import UserError
from difffeat.zoo import load_pipeline

__all__ = ["UserError", "__version__", "load_pipeline"]
