"""Generation techniques as plugins (prompts, ControlNet, LoRA, denoise-from, CFG): one module per technique.

    from pipelines import parse_technique, TechniqueStack, img2img
    stack = TechniqueStack(pipe, ["controlnet:canny", "prompt:fine"])

`difffeat.FeatureExtractor(pipe, layers, techniques=[...])` takes the same spec strings.
"""

from pipelines.base import KIND_ORDER, TECHNIQUES, Technique, parse_technique, register_technique, technique_names
from pipelines.img2img import img2img
from pipelines.stack import Conditioning, TechniqueStack

__all__ = ["TECHNIQUES", "KIND_ORDER", "Technique", "parse_technique", "register_technique", "technique_names",
           "TechniqueStack", "Conditioning", "img2img"]
