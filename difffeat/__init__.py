"""difffeat: features from diffusion models, with content-shift suppression, GATE and long-tail heads."""

__version__ = "0.1.0"

from difffeat.errors import UserError
from difffeat.zoo import load_pipeline

# Heavy names (they import torch and diffusers) load on first use, so `difffeat data synth` starts fast.
_LAZY = {
    "list_layers": "difffeat.layers",
    "FeatureExtractor": "difffeat.extract",
    "FeatureStore": "difffeat.store",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'difffeat' has no attribute {name!r}")


__all__ = ["FeatureExtractor", "FeatureStore", "UserError", "__version__", "list_layers", "load_pipeline"]
