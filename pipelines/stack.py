"""`TechniqueStack`: techniques bound to one pipeline and composed in kind order; the one place that turns
them into UNet calls, for extraction (`features`) and for generation (`eps`) alike.

Per batch, `conditioning(...)` gives a `Conditioning`: the prompt embeddings (after the prompt techniques,
with the LoRA weights active), the unconditional branch for CFG, and the control images. Its UNet call
runs every ControlNet on the same latents and adds their residuals, then combines CFG's two branches;
`prepare_latents` runs denoise-from's steps with that same call before the feature pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from difffeat.errors import UserError
from pipelines.base import Technique, ordered


class TechniqueStack:
    """Techniques (`Technique`s or spec strings) bound to `pipe`, in composition order."""

    def __init__(self, pipe, techniques: Sequence[str | Technique] = ()):
        self.pipe = pipe
        self.techniques: list[Technique] = ordered(techniques)
        for kind in ("guidance", "schedule"):
            same = [t.spec for t in self.techniques if t.kind == kind]
            if len(same) > 1:
                raise UserError(f"at most one {kind} technique at a time, got {', '.join(same)}")
        for t in self.techniques:
            t.bind(pipe)

    def of_kind(self, kind: str) -> list[Technique]:
        return [t for t in self.techniques if t.kind == kind]

    @property
    def specs(self) -> list[str]:
        return [t.spec for t in self.techniques]

    @property
    def guidance(self):
        return next(iter(self.of_kind("guidance")), None)

    @property
    def schedule(self):
        return next(iter(self.of_kind("schedule")), None)

    @property
    def controlnets(self):
        return self.of_kind("residual")

    # ------------------------------------------------------------------------------------------ prompts
    def prompt(self, base: str, fields: Mapping[str, str | None] | None = None, key: str = "") -> str:
        """The image's prompt after every prompt technique, in order."""
        text = base
        for t in self.of_kind("prompt"):
            text = t.rewrite(text, fields or {}, key)
        return text

    def missing(self, key: str, fields: Mapping[str, str | None] | None = None) -> str | None:
        """Why image `key` cannot be processed under this stack (a missing control map or prompt field), or None."""
        from pipelines.prompt import MissingPromptField

        for t in self.controlnets:
            if (why := t.missing(key)) is not None:
                return why
        try:
            self.prompt("", fields, key)
        except MissingPromptField as e:
            return str(e).split(": ", 1)[-1]
        return None

    # ------------------------------------------------------------------------------------------ weights
    @property
    def weights_key(self) -> tuple[str, ...]:
        """Identifies the active weights (LoRA specs): text embeddings are cached per weights key."""
        return tuple(t.spec for t in self.of_kind("weights"))

    @contextmanager
    def active(self):
        """The stack's LoRA adapters active (and every other adapter off) for the duration."""
        from pipelines.lora import activate

        activate(self.pipe, self.of_kind("weights"))
        try:
            yield self
        finally:
            activate(self.pipe, [])

    # ------------------------------------------------------------------------------------------ batches
    def control_images(self, images: torch.Tensor, keys: list[str]) -> list[torch.Tensor]:
        """Per ControlNet, the control images [B, 3, H, W] of images [B, 3, H, W] in [0, 1]."""
        return [c.control_images(images, keys) for c in self.controlnets]

    def conditioning(self, encoder, prompts: Sequence[str], controls: Sequence[torch.Tensor], rows: Sequence[int],
                     resolution: tuple[int, int]) -> Conditioning:
        """The `Conditioning` of batch rows `rows` (indices into the final `prompts` and the control images)
        with text embeddings from `encoder` (a `difffeat.prompts.PromptEncoder`); call inside `active()`."""
        from difffeat.prompts import sdxl_added_conditions

        unet, rows = self.pipe.unet, list(rows)
        texts = [prompts[i] for i in rows]
        embeds, added = encoder(texts, self.weights_key)
        uncond = uncond_added = None
        if self.guidance is not None:
            uncond, uncond_added = encoder([self.guidance.negative] * len(rows), self.weights_key,
                                           length=embeds.shape[1])
            if uncond.shape[1] > embeds.shape[1]:  # a negative prompt longer than every prompt
                embeds, _ = encoder(texts, self.weights_key, length=uncond.shape[1])
            uncond = uncond.to(unet.device, unet.dtype)
            if uncond_added is not None:
                uncond_added = sdxl_added_conditions(self.pipe, uncond_added["text_embeds"], resolution)
        if added is not None:
            added = sdxl_added_conditions(self.pipe, added["text_embeds"], resolution)
        return self.condition(embeds.to(unet.device, unet.dtype), added, uncond, uncond_added,
                              [c[rows].to(unet.device, unet.dtype) for c in controls])

    def condition(self, embeds: torch.Tensor, added: dict | None = None, uncond: torch.Tensor | None = None,
                  uncond_added: dict | None = None, controls: Sequence[torch.Tensor] = ()) -> Conditioning:
        if self.guidance is not None and uncond is None:
            raise ValueError("CFG needs the unconditional embeddings")
        return Conditioning(self, embeds, added, uncond, uncond_added, list(controls))


@dataclass
class Conditioning:
    """One batch's conditioning under a stack; rows of every tensor line up with the batch's latents."""

    stack: TechniqueStack
    embeds: torch.Tensor
    added: dict | None
    uncond: torch.Tensor | None
    uncond_added: dict | None
    controls: list[torch.Tensor]

    def subset(self, rows: list[int]) -> Conditioning:
        """The conditioning of some rows of the batch."""
        pick = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}
        return Conditioning(self.stack, self.embeds[rows], pick(self.added),
                            None if self.uncond is None else self.uncond[rows], pick(self.uncond_added),
                            [c[rows] for c in self.controls])

    def _branches(self, z, t):
        """(latents, timesteps, kwargs) of the UNet call; with CFG the batch is [uncond; cond]."""
        unet = self.stack.pipe.unet
        t = torch.as_tensor(t, device=unet.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        embeds, added, controls = self.embeds, self.added, self.controls
        if self.stack.guidance is not None:
            z, t = torch.cat([z, z]), torch.cat([t, t])
            embeds = torch.cat([self.uncond, embeds])
            if added is not None:
                added = {k: torch.cat([self.uncond_added[k], v]) for k, v in added.items()}
            controls = [torch.cat([c, c]) for c in controls]
        kwargs = {"encoder_hidden_states": embeds}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        down = mid = None
        for net, control in zip(self.stack.controlnets, controls):
            d, m = net.residuals(z, t, embeds, control, added)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is not None:
            kwargs["down_block_additional_residuals"] = down
            kwargs["mid_block_additional_residual"] = mid
        return z, t, kwargs

    def _combine(self, out: torch.Tensor) -> torch.Tensor:
        if self.stack.guidance is None:
            return out
        uncond, cond = out.chunk(2)
        return self.stack.guidance.combine(uncond, cond)

    @torch.no_grad()
    def eps(self, z: torch.Tensor, t) -> torch.Tensor:
        """The UNet's noise prediction for latents z at timestep(s) t, with every technique applied."""
        z, t, kwargs = self._branches(z, t)
        return self._combine(self.stack.pipe.unet(z, t, **kwargs).sample)

    @torch.no_grad()
    def features(self, capture, z: torch.Tensor, t) -> dict[str, torch.Tensor]:
        """The captured activations (difffeat.capture.Capture) of one UNet call, CFG-combined."""
        z, t, kwargs = self._branches(z, t)
        return {name: self._combine(fmap) for name, fmap in capture.run(z, t, **kwargs).items()}

    @torch.no_grad()
    def prepare_latents(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """The latents the feature pass sees at timestep t: z0 noised at t, or, under denoise-from, noised
        at its start and denoised down to t (DDIM, η = 0) with every technique applied."""
        from pipelines.denoise_from import ddim_step

        alphas = self.stack.pipe.scheduler.alphas_cumprod
        schedule = self.stack.schedule
        steps = schedule.timesteps(t) if schedule is not None else [t]
        a = alphas[steps[0]].to(z0)
        z = a.sqrt() * z0 + (1 - a).sqrt() * noise
        for s, s_next in zip(steps[:-1], steps[1:]):
            z = ddim_step(z, self.eps(z, s), alphas, s, s_next)
        return z
