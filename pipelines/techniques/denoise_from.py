"""denoise-from: noise at a higher timestep, denoise down to the feature timestep, then extract.

The content-shift code (`--denoising_from 60`, research/content_shift_gate.md §3.2) adds noise at 60 and
runs about ten one-timestep PNDM steps down to the feature timestep, all with the active techniques
(ControlNet, prompt), before the feature pass. Here the stack runs deterministic DDIM steps
(η = 0, `pipelines.stack.ddim_step`): z_{s'} = √ᾱ_{s'}·ẑ₀ + √(1−ᾱ_{s'})·ε̂ with
ẑ₀ = (z_s − √(1−ᾱ_s)·ε̂)/√ᾱ_s, over `steps` evenly spaced timesteps from `start` to the feature timestep
(default: one step per timestep, at most 10 steps). The noise is the same seeded draw the plain extraction
uses at the feature timestep, so variants with and without denoise-from share their noise. On a flow-matching
transformer (SD3, FLUX) the steps are Euler steps on the predicted velocity between the σ of those timesteps
(`difffeat.extraction.conditioning.Conditioning.prepare_latents`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difffeat.errors import UserError
from pipelines.base import Technique, register_technique

MAX_DEFAULT_STEPS = 10


@register_technique
@dataclass
class DenoiseFrom(Technique):
    """Noise at START, DDIM-denoise down to the feature timestep, then extract."""

    name = "denoise-from"
    positional = "start"

    start: int = 60
    steps: int = 0  # 0: one step per timestep, at most MAX_DEFAULT_STEPS

    def __post_init__(self):
        if self.start < 1 or self.steps < 0:
            raise ValueError(f"start must be ≥ 1 and steps ≥ 0 (got {self.start}, {self.steps})")

    def bind(self, pipe) -> None:
        n = pipe.scheduler.config.num_train_timesteps
        if self.start >= n:
            raise UserError(f"denoise-from:{self.start}: start must be below {n}")

    def schedule(self, t: int) -> list[int]:
        """The timesteps from `start` down to the feature timestep `t` (both included)."""
        if self.start <= t:
            raise UserError(f"denoise-from:{self.start} must start above the feature timestep {t}")
        steps = self.steps or min(self.start - t, MAX_DEFAULT_STEPS)
        return [int(round(s)) for s in np.linspace(self.start, t, steps + 1)]

