"""Models difffeat can run: the registry and `load_pipeline`, the built-in mini model, real-size presets."""

from difffeat.zoo.registry import MODELS, load_pipeline, register_model

__all__ = ["MODELS", "load_pipeline", "register_model"]
