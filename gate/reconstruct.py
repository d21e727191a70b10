"""Reconstructions and features of one image set under many candidates, sharing what they have in common.

Every candidate starts from the same clean latents (one VAE encode), the same per-image noise (seeded by
image key in `pipelines.img2img` and `FeatureExtractor`) and one cache of text embeddings
(`PromptEncoder`); only what the candidate's techniques change is recomputed. `reuse=False` recomputes
encodes and embeddings per call (the baseline the benchmark measures against).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gate.inputs import GateInputs


class Reconstructor:
    """img2img reconstructions and UNet features of `inputs` for any technique list."""

    def __init__(self, pipe, inputs: GateInputs, strength: float = 0.7, steps: int = 25, seed: int = 0,
                 layers: Sequence[str] = ("dift",), batch_size: int = 8, reuse: bool = True):
        from difffeat.extraction.extract import encode_latents
        from difffeat.models.prompts import PromptEncoder

        self.pipe, self.inputs = pipe, inputs
        self.strength, self.steps, self.seed = strength, steps, seed
        self.layers, self.batch_size, self.reuse = list(layers), batch_size, reuse
        self.encoder = PromptEncoder(pipe)
        self.latents = encode_latents(pipe, inputs.images, inputs.keys, batch_size=batch_size) if reuse else None
        self._stacks: dict[tuple[str, ...], object] = {}

    def _encoder(self):
        from difffeat.models.prompts import PromptEncoder

        return self.encoder if self.reuse else PromptEncoder(self.pipe)

    def stack(self, specs: Sequence[str]):
        """The bound `TechniqueStack` of a technique list (bound once: LoRA / ControlNet loads are not redone)."""
        from pipelines.stack import TechniqueStack

        key = tuple(specs)
        if key not in self._stacks:
            self._stacks[key] = TechniqueStack(self.pipe, list(specs))
        return self._stacks[key]

    def reconstruct(self, specs: Sequence[str], seed: int | None = None) -> torch.Tensor:
        """img2img reconstructions [B, 3, H, W] in [0, 1] under the techniques `specs` (noise seeded by `seed`,
        default the reconstructor's, and each image's key)."""
        from pipelines.generate import img2img

        x = self.inputs
        return img2img(self.pipe, x.images, prompts=x.prompts, keys=x.keys, strength=self.strength, steps=self.steps,
                       seed=self.seed if seed is None else seed, fields=x.fields, latents=self.latents,
                       stack=self.stack(specs), prompt_encoder=self._encoder(), batch_size=self.batch_size)

    def features(self, specs: Sequence[str], t: int, noise: bool = True, seed: int | None = None
                 ) -> dict[str, torch.Tensor]:
        """{layer: [B, C, h, w]} features of the inputs under `specs` at timestep t (noise=False: clean latents;
        noise seeded by `seed`, default the reconstructor's)."""
        from difffeat.extraction.extract import FeatureExtractor

        x = self.inputs
        extractor = FeatureExtractor(self.pipe, self.layers, timesteps=(t,), seed=self.seed if seed is None else seed,
                                     noise=noise, techniques=list(specs), batch_size=self.batch_size,
                                     prompt_encoder=self._encoder())
        return extractor.extract(x.images, prompts=x.prompts, keys=x.keys, fields=x.fields, latents=self.latents)
