"""Generation techniques as plugins (prompts, ControlNet, LoRA, denoise-from, CFG): one module per technique.

    from pipelines import parse_technique, TechniqueStack, img2img
    stack = TechniqueStack(pipe, ["controlnet:canny", "prompt:fine"])

`difffeat.FeatureExtractor(pipe, layers, techniques=[...])` takes the same spec strings.
"""

# Names load on first use: difffeat's CLI imports `pipelines.cli`, which must not pull in torch at start-up.
_LAZY = {
    "TECHNIQUES": "pipelines.base",
    "KIND_ORDER": "pipelines.base",
    "Technique": "pipelines.base",
    "parse_technique": "pipelines.base",
    "register_technique": "pipelines.base",
    "technique_names": "pipelines.base",
    "TechniqueStack": "pipelines.stack",
    "Conditioning": "pipelines.stack",
    "img2img": "pipelines.generate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


__all__ = list(_LAZY)
