"""Generation techniques as plugins (prompts, ControlNet, LoRA, denoise-from, CFG): one module per technique in
`pipelines/techniques/`.

    from pipelines import parse_technique, TechniqueStack, img2img
    stack = TechniqueStack(pipe, ["controlnet:canny", "prompt:fine"])

`difffeat.FeatureExtractor(pipe, layers, techniques=[...])` takes the same spec strings: it finds this package
through the entry point ``difffeat.techniques: pipelines`` (`pipelines.provider`), never by importing it.
"""

# Names load on first use: difffeat's CLI imports `pipelines.cli`, which must not pull in torch at start-up.
from difffeat.lazy import lazy_getattr

_LAZY = {
    "TECHNIQUES": "pipelines.base",
    "HOOKS": "pipelines.base",
    "MissingInput": "pipelines.base",
    "Technique": "pipelines.base",
    "parse_technique": "pipelines.base",
    "register_technique": "pipelines.base",
    "technique_names": "pipelines.base",
    "TechniqueStack": "pipelines.stack",
    "Conditioning": "pipelines.stack",
    "img2img": "pipelines.generate",
}

__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
