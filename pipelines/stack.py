"""`TechniqueStack`: techniques bound to one pipeline and composed in hook order. It implements the core's
`difffeat.extraction.conditioning.ConditioningStack`, whose `Conditioning` makes every denoiser call (a UNet's, or a
diffusion transformer's: SD3, PixArt, FLUX), for extraction (`features`) and generation (`eps`) alike; the stack
only contributes to it: the prompts (after the prompt techniques, with the LoRA weights active), the guidance
technique's negative prompt and combination of branches, the schedule technique's steps, and the control inputs
with the residual keyword arguments every residual technique (ControlNet) gives the call, summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch

from difffeat.errors import UserError
from difffeat.extraction.conditioning import Conditioning, ConditioningStack  # noqa: F401 (importable here)
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

    # ------------------------------------------------------------------- what the stack adds to the call
    def negative_prompt(self) -> str | None:
        return None if self.guidance is None else self.guidance.negative_prompt()

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.guidance.guidance(uncond, cond)

    def steps(self, t: int) -> list[int]:
        return self.schedule.schedule(t) if self.schedule is not None else [t]

    def control_images(self, images: torch.Tensor, keys: list[str]) -> list[torch.Tensor]:
        """Per residual technique, the control images [B, 3, H, W] of images [B, 3, H, W] in [0, 1]."""
        return [t.control_images(images, keys) for t, _ in self.residuals]

    def prepare_controls(self, controls: Sequence[torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor]:
        return [t.prepare_control(loaded, self.pipe, c[list(rows)]) for (t, loaded), c in zip(self.residuals, controls)]

    def residual_kwargs(self, x, timestep, embeds, controls: Sequence[torch.Tensor], call_kwargs: dict) -> dict:
        residuals: dict = {}  # the denoiser's residual keyword arguments, summed over the ControlNets
        for (technique, loaded), control in zip(self.residuals, controls):
            more = technique.residuals(loaded, x, timestep, embeds, control, call_kwargs)
            add_residuals(residuals, more, technique.spec)
        return residuals


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
