"""Classifier-free guidance as a technique (the content-shift paper's GATE rejects it; users try it anyway).

With guidance scale g, a UNet call runs an unconditional branch (the `negative` prompt) beside the
conditional one and returns ε_u + g·(ε_c − ε_u). In extraction the captured activations are combined the
same way, f_u + g·(f_c − f_u), so g = 1 gives the conditional features and g = 0 the unconditional ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.base import Technique, register_technique


@register_technique
@dataclass
class ClassifierFreeGuidance(Technique):
    """Classifier-free guidance: ε_u + scale·(ε_c − ε_u), features combined the same way."""

    name = "cfg"
    free_text = ("negative",)
    positional = "scale"

    scale: float = 7.5
    negative: str = ""

    def __post_init__(self):
        # NaN guides nowhere; a negative scale pushes towards the negative prompt: both are typing slips.
        if not 0 <= self.scale < float("inf"):
            raise ValueError(f"scale must be a finite number ≥ 0, got {self.scale}")

    def guidance(self, uncond, cond):
        return uncond + self.scale * (cond - uncond)

    def negative_prompt(self) -> str:
        return self.negative
