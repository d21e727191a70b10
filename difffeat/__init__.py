"""difffeat: features from diffusion models, with content-shift suppression, GATE and long-tail heads."""

__version__ = "0.1.0"

from difffeat.errors import UserError
from difffeat.lazy import lazy_getattr
from difffeat.zoo import load_pipeline

# Heavy names (they import torch and diffusers) load on first use, so `difffeat data synth` starts fast.
_LAZY = {
    "list_layers": "difffeat.models.layers",
    "FeatureExtractor": "difffeat.extraction.extract",
    "FeatureStore": "difffeat.store.feature_store",
}

# Functions other packages provide to the core's namespace (`difffeat.sweep` from gate), through the
# `difffeat.api` entry points: the core never imports those packages itself.
__getattr__ = lazy_getattr(__name__, _LAZY, plugin_group="difffeat.api")


__all__ = ["FeatureExtractor", "FeatureStore", "UserError", "__version__", "list_layers", "load_pipeline"]
