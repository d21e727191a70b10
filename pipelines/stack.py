"""`TechniqueStack`: techniques bound to one pipeline and composed in hook order; the one place that turns
them into denoiser calls (a UNet's, or a diffusion transformer's: SD3, PixArt, FLUX), for extraction (`features`)
and for generation (`eps`) alike. It implements the core's `difffeat.extraction.conditioning.ConditioningStack`.

Per batch, `conditioning(...)` gives a `Conditioning`: the prompt embeddings (after the prompt techniques,
with the LoRA weights active), the unconditional branch for guidance, and the control inputs. Its denoiser call
runs every residual technique (ControlNet) on the same latents and adds their residuals, then combines the
guidance branches; `prepare_latents` runs a schedule technique's denoising steps with that same call before
the feature pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from difffeat.errors import UserError
from difffeat.extraction.conditioning import BatchConditioning, ConditioningStack
from difffeat.models.backbones import backbone_for
from difffeat.models.backbones.base import ddim_step  # noqa: F401 (importable here as before)
from pipelines.base import MissingInput, Technique, ordered

# Hooks of which a stack takes at most one technique: two guidances or two schedules have no one meaning.
SINGLE = ("guidance", "schedule")
# Images whose derived prompt fields (captions) a stack remembers by key, for `prompt` without the images.
KEEP_DERIVED = 100_000


class TechniqueStack(ConditioningStack):
    """Techniques (`Technique`s or spec strings) bound to `pipe`, in composition order."""

    def __init__(self, pipe, techniques: Sequence[str | Technique] = ()):
        self.pipe = pipe
        self.techniques: list[Technique] = ordered(techniques)
        specs = [t.spec for t in self.techniques]
        if twice := sorted({x for x in specs if specs.count(x) > 1}):  # applied twice: surely a slip
            raise UserError(f"technique {twice[0]} is given twice; give each technique once")
        for hook in SINGLE:
            same = [t.spec for t in self.using(hook)]
            if len(same) > 1:
                raise UserError(f"at most one {hook} technique at a time, got {', '.join(same)}")
        # What each technique loaded for this pipeline (a ControlNet module), by position in `techniques`.
        self.loaded: list = [t.bind(pipe) for t in self.techniques]
        # Fields derived from each image (prompt:auto's caption), by key, as last computed by `image_fields`: a
        # caller that has no images at hand (GATE's report of the prompts used) still gets the image's prompt.
        self.derived: dict[str, dict[str, str]] = {}

    def using(self, hook: str) -> list[Technique]:
        """The stack's techniques that implement `hook`, in composition order."""
        return [t for t in self.techniques if t.implements(hook)]

    @property
    def specs(self) -> list[str]:
        return [t.spec for t in self.techniques]

    @property
    def guidance(self) -> Technique | None:
        return next(iter(self.using("guidance")), None)

    @property
    def schedule(self) -> Technique | None:
        return next(iter(self.using("schedule")), None)

    @property
    def residuals(self) -> list[tuple[Technique, object]]:
        """(technique, what it loaded) of every residual technique."""
        return [(t, m) for t, m in zip(self.techniques, self.loaded) if t.implements("residuals")]

    def check(self, timesteps: Sequence[int], noise: bool) -> None:
        if self.schedule is None:
            return
        if not noise:
            raise UserError(f"{self.schedule.spec} needs noise; it cannot run in clean mode (noise=False)")
        for t in timesteps:
            self.schedule.schedule(t)  # fails now, not mid-run, when it starts below a feature timestep

    # ------------------------------------------------------------------------------------------ prompts
    def prompt(self, base: str, fields: Mapping[str, str | None] | None = None, key: str = "") -> str:
        """The image's prompt after every prompt technique, in order."""
        text, fields = base, {**self.derived.get(key, {}), **(fields or {})}
        for t in self.using("prepare_prompt"):
            text = t.prepare_prompt(text, fields, key)
        return text

    def image_fields(self, images: torch.Tensor, keys: Sequence[str]) -> list[dict[str, str]]:
        """Per image, the prompt fields the techniques derive from images [B, 3, H, W] in [0, 1] (technique spec →
        caption for prompt:auto); remembered by key for `prompt`."""
        out: list[dict[str, str]] = [{} for _ in keys]
        for t, loaded in zip(self.techniques, self.loaded):
            if t.implements("image_fields"):
                for row, derived in zip(out, t.image_fields(loaded, images, list(keys))):
                    row.update(derived)
        for key, row in zip(keys, out):
            if row:
                self.derived.pop(key, None)  # newest last: the oldest go first beyond KEEP_DERIVED
                self.derived[key] = row
        while len(self.derived) > KEEP_DERIVED:
            self.derived.pop(next(iter(self.derived)))
        return out

    def missing(self, key: str, fields: Mapping[str, str | None] | None = None) -> str | None:
        """Why image `key` cannot be processed under this stack (a missing control map or prompt field), or None."""
        for t in self.using("missing"):
            if (why := t.missing(key)) is not None:
                return why
        # Fields derived from the image itself are there whenever the image is (computed later, from its pixels).
        fields = {**{t.spec: "" for t in self.using("image_fields")}, **(fields or {})}
        try:
            self.prompt("", fields, key)
        except MissingInput as e:
            return str(e).split(": ", 1)[-1]
        return None

    # ------------------------------------------------------------------------------------------ weights
    @property
    def weights_key(self) -> tuple[str, ...]:
        """Identifies the active weights (LoRA specs): text embeddings are cached per weights key."""
        return tuple(t.spec for t in self.using("weights"))

    @contextmanager
    def active(self):
        """The stack's adapters active (and every other adapter off) for the duration."""
        activate_adapters(self.pipe, [t.weights() for t in self.using("weights")])
        try:
            yield self
        finally:
            activate_adapters(self.pipe, [])

    # ------------------------------------------------------------------------------------------ batches
    def control_images(self, images: torch.Tensor, keys: list[str]) -> list[torch.Tensor]:
        """Per residual technique, the control images [B, 3, H, W] of images [B, 3, H, W] in [0, 1]."""
        return [t.control_images(images, keys) for t, _ in self.residuals]

    def conditioning(self, encoder, prompts: Sequence[str], controls: Sequence[torch.Tensor], rows: Sequence[int],
                     resolution: tuple[int, int]) -> Conditioning:
        """The `Conditioning` of batch rows `rows` (indices into the final `prompts` and the control images)
        with text embeddings from `encoder` (a `difffeat.models.prompts.PromptEncoder`); call inside `active()`."""
        backbone, rows = backbone_for(self.pipe), list(rows)
        model = backbone.model
        # The encoder's extra conditions as the call takes them (SDXL's added conditions, pooled projections …).
        extra = lambda a: backbone.call_conditions(a, resolution)
        texts = [prompts[i] for i in rows]
        embeds, added = encoder(texts, self.weights_key)
        uncond = uncond_added = None
        if self.guidance is not None:
            uncond, uncond_added = encoder([self.guidance.negative_prompt()] * len(rows), self.weights_key,
                                           length=embeds.shape[1])
            if uncond.shape[1] > embeds.shape[1]:  # a negative prompt longer than every prompt
                embeds, _ = encoder(texts, self.weights_key, length=uncond.shape[1])
            uncond = uncond.to(model.device, model.dtype)
            uncond_added = extra(uncond_added)
        # Control inputs as each network takes them (an SD3 ControlNet: VAE latents), once per batch.
        controls = [t.prepare_control(loaded, self.pipe, c[rows]).to(model.device, model.dtype)
                    for (t, loaded), c in zip(self.residuals, controls)]
        return self.condition(embeds.to(model.device, model.dtype), extra(added), uncond, uncond_added, controls)

    def condition(self, embeds: torch.Tensor, added: dict | None = None, uncond: torch.Tensor | None = None,
                  uncond_added: dict | None = None, controls: Sequence[torch.Tensor] = ()) -> Conditioning:
        if self.guidance is not None and uncond is None:
            raise ValueError("guidance needs the unconditional embeddings")
        return Conditioning(self, embeds, added, uncond, uncond_added, list(controls))


def activate_adapters(pipe, adapters: list[tuple[str, float]]) -> None:
    """Make exactly `adapters` ((name, scale) pairs) active on `pipe` (none: every loaded adapter off); on a
    pipeline without diffusers' LoRA loader (PixArt), on the adapters peft put into its transformer."""
    if not hasattr(pipe, "get_list_adapters"):  # no LoRA loader: the adapters peft put into the denoiser (PixArt)
        from pipelines.techniques.lora import activate_injected

        activate_injected(backbone_for(pipe).model, adapters)
        return
    if not any(pipe.get_list_adapters().values()):
        return
    if not adapters:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name for name, _ in adapters], [scale for _, scale in adapters])


def add_residuals(into: dict, more: dict, spec: str) -> None:
    """Add one ControlNet's residual keyword arguments `more` (of technique `spec`) to `into`, the stack's so far:
    per-block residual lists summed block by block (as diffusers' multi-ControlNets do), tensors summed, other
    values (FLUX's `controlnet_blocks_repeat`) kept where the ControlNets agree."""
    for key, value in more.items():
        if key not in into:
            into[key] = value
        elif isinstance(value, torch.Tensor):
            into[key] = into[key] + value
        elif isinstance(value, (list, tuple)):
            if len(value) != len(into[key]):  # zip would silently drop the extra ones
                raise UserError(f"{spec}: {len(value)} residuals where the stack's other ControlNet gives "
                                f"{len(into[key])}; ControlNets used together must have as many blocks")
            into[key] = [a + b for a, b in zip(into[key], value)]
        elif value != into[key]:
            raise UserError(f"{spec}: {key}={value} where the stack's other ControlNet has {into[key]}; ControlNets "
                            "used together must agree (XLabs-style FLUX ControlNets do not mix with InstantX-style)")


@dataclass
class Conditioning(BatchConditioning):
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

    def _branches(self, z, t, sigma=None):
        """(args, kwargs) of the denoiser call; with guidance the batch is [uncond; cond]. The backbone makes the call
        (`Backbone.call`; `sigma`: a flow-matching sampler's noise level, a scalar or [B]); ControlNet residuals join
        it as the keyword arguments each ControlNet gives for that call (a UNet's `down_block_additional_residuals`,
        SD3's `block_controlnet_hidden_states`, FLUX's `controlnet_block_samples`, …)."""
        backbone = backbone_for(self.stack.pipe)
        t = torch.as_tensor(t, device=backbone.model.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        embeds, added, controls = self.embeds, self.added, self.controls
        if self.stack.guidance is not None:
            z, t = torch.cat([z, z]), torch.cat([t, t])
            embeds = torch.cat([self.uncond, embeds])
            if added is not None:
                added = {k: torch.cat([self.uncond_added[k], v]) for k, v in added.items()}
            controls = [torch.cat([c, c]) for c in controls]
            if sigma is not None and torch.as_tensor(sigma).ndim > 0:
                sigma = torch.cat([torch.as_tensor(sigma)] * 2)
        args, kwargs = backbone.call(z, t, embeds, added, sigma=sigma)
        x, timestep = backbone.control_inputs(args, kwargs)  # the latents and timestep as a ControlNet sees them
        residuals: dict = {}  # the denoiser's residual keyword arguments, summed over the ControlNets
        for (technique, loaded), control in zip(self.stack.residuals, controls):
            more = technique.residuals(loaded, x, timestep, embeds, control, kwargs)
            add_residuals(residuals, more, technique.spec)
        kwargs.update(residuals)
        return args, kwargs

    def _combine(self, out: torch.Tensor) -> torch.Tensor:
        if self.stack.guidance is None:
            return out
        uncond, cond = out.chunk(2)
        return self.stack.guidance.guidance(uncond, cond)

    @torch.no_grad()
    def eps(self, z: torch.Tensor, t, sigma=None) -> torch.Tensor:
        """The denoiser's prediction for latents z at timestep(s) t, with every technique applied: the noise ε
        (UNets, PixArt), or a flow-matching transformer's velocity (SD3, FLUX; at noise level `sigma` when given,
        else at σ(t), `Backbone.sigma_of_t`)."""
        backbone = backbone_for(self.stack.pipe)
        args, kwargs = self._branches(z, t, sigma)
        out = backbone.model(*args, **kwargs).sample
        return self._combine(backbone.prediction(out, tuple(z.shape[-2:])))

    @torch.no_grad()
    def features(self, capture, z: torch.Tensor, t) -> dict[str, torch.Tensor]:
        """The captured activations (difffeat.extraction.capture.Capture) of one denoiser call, guidance-combined."""
        args, kwargs = self._branches(z, t)
        return {name: self._combine(fmap) for name, fmap in capture.run(*args, **kwargs).items()}

    @torch.no_grad()
    def prepare_latents(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """The latents the feature pass sees at timestep t: z0 noised at t, or, under a schedule technique
        (denoise-from), noised at its start and denoised down to t with every technique applied (DDIM, η = 0; a
        flow-matching model: Euler steps z ← z + (σ(s') − σ(s))·v between the σ of the timesteps)."""
        backbone = backbone_for(self.stack.pipe)
        schedule = self.stack.schedule
        steps = schedule.schedule(t) if schedule is not None else [t]
        z = backbone.noise_latents(z0, noise, steps[0])
        for s, s_next in zip(steps[:-1], steps[1:]):
            z = backbone.step(z, self.eps(z, s), s, s_next)
        return z

