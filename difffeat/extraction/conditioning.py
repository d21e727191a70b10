"""The seam between the extractor and generation techniques: what a technique stack must provide, and the
registry of the packages that provide one.

difffeat never imports a technique package. A package (``pipelines`` is the built-in one) declares an entry
point in the group ``difffeat.techniques`` whose object is a callable returning a `TechniqueProvider`; the
core loads it the first time techniques are asked for (or a program calls `register_provider`). So
``FeatureExtractor(pipe, layers, techniques=["controlnet:canny"])`` works without the caller importing the
package, and the dependency points from the package to difffeat only.

Per extraction, `FeatureExtractor` asks the stack for, in this order: whether each image can be processed at all
(`missing`), each image's prompt (`prompts`, with the fields the stack derives from the image itself, such as a
caption, `image_fields`), the per-image control inputs (`control_images`), then, with the stack `active()`, one
`Conditioning` per batch whose `prepare_latents` turns clean latents and noise into what the feature pass sees and
whose `features` runs that pass through the capture hooks.

The core makes every denoiser call (`Conditioning`: the backbone's call arguments, the guidance branches, the
schedule's steps); a stack only contributes to it through hooks with plain defaults — a negative prompt and how
the guidance branches combine, the steps of a schedule, the control inputs and the residual keyword arguments they
give the call. Extraction without techniques is `PlainStack`, here: no provider is loaded for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from difffeat.errors import UserError

PROVIDER_GROUP = "difffeat.techniques"


class ConditioningStack(ABC):
    """Techniques bound to one pipeline: everything the extractor needs from them. The hooks below the abstract
    methods have the plain behaviour as their default (no guidance, one step, no controls)."""

    @property
    @abstractmethod
    def specs(self) -> list[str]:
        """The stack's techniques as canonical spec strings, in composition order."""

    @abstractmethod
    def check(self, timesteps: Sequence[int], noise: bool) -> None:
        """Raise UserError when the stack cannot run at these feature timesteps (or without noise)."""

    @abstractmethod
    def missing(self, key: str, fields: Mapping[str, str | None] | None = None) -> str | None:
        """Why image `key` cannot be processed (a missing control map or prompt field), or None."""

    @abstractmethod
    def prompt(self, base: str, fields: Mapping[str, str | None] | None = None, key: str = "") -> str:
        """The image's prompt after the stack's prompt techniques."""

    def image_fields(self, images, keys: Sequence[str]) -> list[dict[str, str]]:
        """Per image, the prompt fields the techniques derive from images [B, 3, H, W] in [0, 1] themselves (a
        caption from a captioning model, under its technique's spec); the extractor records them in the store.
        Default: none."""
        return [{} for _ in keys]

    def prompts(self, bases: Sequence[str], fields: Sequence[Mapping[str, str | None]], keys: Sequence[str],
                images=None) -> list[str]:
        """Each image's prompt (`prompt`), with the fields derived from `images` (`image_fields`) added when given."""
        derived = self.image_fields(images, list(keys)) if images is not None else [{} for _ in keys]
        return [self.prompt(b, {**(f or {}), **d}, k) for b, f, d, k in zip(bases, fields, derived, keys)]

    @abstractmethod
    def control_images(self, images, keys: list[str]) -> list:
        """Per-image control inputs the techniques derive from images [B, 3, H, W] in [0, 1]."""

    @abstractmethod
    def active(self) -> AbstractContextManager:
        """A context in which the pipeline's weights are those the stack needs (e.g. its LoRA adapters)."""

    # ---------------------------------------------------------------- what a stack adds to the denoiser call
    @property
    def weights_key(self) -> tuple[str, ...]:
        """Identifies the weights the stack makes active (LoRA specs): text embeddings are cached per key."""
        return ()

    def negative_prompt(self) -> str | None:
        """The unconditional branch's prompt under a guidance technique; None: one branch, no guidance."""
        return None

    def combine_guidance(self, uncond, cond):
        """The guided output from the unconditional and conditional branches' outputs (called only when
        `negative_prompt` is not None)."""
        raise NotImplementedError("a stack with a negative prompt combines its guidance branches")

    def steps(self, t: int) -> list[int]:
        """The timesteps from the first noising to the feature pass at `t` (a schedule technique: denoising steps
        before it); plainly ``[t]``."""
        return [t]

    def prepare_controls(self, controls: Sequence, rows: Sequence[int]) -> list:
        """Per residual technique, its control input for batch rows `rows` as its network takes it."""
        return []

    def residual_kwargs(self, x, timestep, embeds, controls: Sequence, call_kwargs: dict) -> dict:
        """Keyword arguments the residual techniques add to one denoiser call (ControlNet residuals, summed over
        the networks), from the latents `x` and `timestep` as a ControlNet sees them, the text `embeds` and the
        call's own keyword arguments."""
        return {}

    # --------------------------------------------------------------------------------------------- batches
    def conditioning(self, encoder, prompts: Sequence[str], controls: Sequence, rows: Sequence[int],
                     resolution: tuple[int, int]) -> Conditioning:
        """The conditioning of batch rows `rows` (indices into `prompts` and the control inputs), with text
        embeddings from `encoder` (a `difffeat.models.prompts.PromptEncoder`); called inside `active()`."""
        from difffeat.models.backbones import backbone_for

        backbone, rows = backbone_for(self.pipe), list(rows)
        model = backbone.model
        # The encoder's extra conditions as the call takes them (SDXL's added conditions, pooled projections …).
        extra = lambda a: backbone.call_conditions(a, resolution)
        texts = [prompts[i] for i in rows]
        embeds, added = encoder(texts, self.weights_key)
        uncond = uncond_added = None
        negative = self.negative_prompt()
        if negative is not None:
            uncond, uncond_added = encoder([negative] * len(rows), self.weights_key, length=embeds.shape[1])
            if uncond.shape[1] > embeds.shape[1]:  # a negative prompt longer than every prompt
                embeds, _ = encoder(texts, self.weights_key, length=uncond.shape[1])
            uncond = uncond.to(model.device, model.dtype)
            uncond_added = extra(uncond_added)
        # Control inputs as each network takes them (an SD3 ControlNet: VAE latents), once per batch.
        controls = [c.to(model.device, model.dtype) for c in self.prepare_controls(controls, rows)]
        return self.condition(embeds.to(model.device, model.dtype), extra(added), uncond, uncond_added, controls)

    def condition(self, embeds, added: dict | None = None, uncond=None, uncond_added: dict | None = None,
                  controls: Sequence = ()) -> Conditioning:
        """A `Conditioning` from ready embeddings (the unconditional ones needed under guidance)."""
        if self.negative_prompt() is not None and uncond is None:
            raise ValueError("guidance needs the unconditional embeddings")
        return Conditioning(self, embeds, added, uncond, uncond_added, list(controls))


class PlainStack(ConditioningStack):
    """No technique: the image's own prompt, one denoiser call per pass. Extraction without techniques uses it
    without loading a technique provider."""

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def specs(self) -> list[str]:
        return []

    def check(self, timesteps: Sequence[int], noise: bool) -> None:
        return None

    def missing(self, key: str, fields: Mapping[str, str | None] | None = None) -> str | None:
        return None

    def prompt(self, base: str, fields: Mapping[str, str | None] | None = None, key: str = "") -> str:
        return base

    def control_images(self, images, keys: list[str]) -> list:
        return []

    def active(self) -> AbstractContextManager:
        return nullcontext(self)


@dataclass
class Conditioning:
    """One batch's conditioning under a stack — prompt embeddings, the unconditional branch under guidance, the
    control inputs; rows of every tensor line up with the batch's latents — and the denoiser call made with it."""

    stack: ConditioningStack
    embeds: Any
    added: dict | None
    uncond: Any
    uncond_added: dict | None
    controls: list

    def subset(self, rows: list[int]) -> Conditioning:
        """The conditioning of some rows of the batch."""
        pick = lambda d: None if d is None else {k: v[rows] for k, v in d.items()}
        return Conditioning(self.stack, self.embeds[rows], pick(self.added),
                            None if self.uncond is None else self.uncond[rows], pick(self.uncond_added),
                            [c[rows] for c in self.controls])

    @property
    def guided(self) -> bool:
        """Whether the stack guides: the call runs [uncond; cond] and `combine` mixes them."""
        return self.stack.negative_prompt() is not None

    def call_arguments(self, z, t, sigma=None) -> tuple[tuple, dict]:
        """(args, kwargs) of the denoiser call; with guidance the batch is [uncond; cond]. The backbone makes the
        arguments (`Backbone.call`; `sigma`: a flow-matching sampler's noise level, a scalar or [B]); the stack's
        residual keyword arguments join them (a UNet's `down_block_additional_residuals`, SD3's
        `block_controlnet_hidden_states`, FLUX's `controlnet_block_samples`, …)."""
        import torch

        from difffeat.models.backbones import backbone_for

        backbone = backbone_for(self.stack.pipe)
        t = torch.as_tensor(t, device=backbone.model.device)
        t = t.expand(len(z)) if t.ndim == 0 else t
        embeds, added, controls = self.embeds, self.added, self.controls
        if self.guided:
            z, t = torch.cat([z, z]), torch.cat([t, t])
            embeds = torch.cat([self.uncond, embeds])
            if added is not None:
                added = {k: torch.cat([self.uncond_added[k], v]) for k, v in added.items()}
            controls = [torch.cat([c, c]) for c in controls]
            if sigma is not None and torch.as_tensor(sigma).ndim > 0:
                sigma = torch.cat([torch.as_tensor(sigma)] * 2)
        args, kwargs = backbone.call(z, t, embeds, added, sigma=sigma)
        if controls:
            x, timestep = backbone.control_inputs(args, kwargs)  # the latents and timestep as a ControlNet sees them
            kwargs.update(self.stack.residual_kwargs(x, timestep, embeds, controls, kwargs))
        return args, kwargs

    def combine(self, out):
        """The guided output of a call's [uncond; cond] output (the output itself without guidance)."""
        if not self.guided:
            return out
        uncond, cond = out.chunk(2)
        return self.stack.combine_guidance(uncond, cond)

    def eps(self, z, t, sigma=None):
        """The denoiser's prediction for latents z at timestep(s) t, with every technique applied: the noise ε
        (UNets, PixArt), or a flow-matching transformer's velocity (SD3, FLUX; at noise level `sigma` when given,
        else at σ(t), `Backbone.sigma_of_t`)."""
        import torch

        from difffeat.models.backbones import backbone_for

        backbone = backbone_for(self.stack.pipe)
        with torch.no_grad():
            args, kwargs = self.call_arguments(z, t, sigma)
            out = backbone.model(*args, **kwargs).sample
            return self.combine(backbone.prediction(out, tuple(z.shape[-2:])))

    def features(self, capture, z, t) -> dict[str, Any]:
        """The activations `capture` (a `difffeat.extraction.capture.Capture`) records in one conditioned call,
        guidance-combined."""
        import torch

        with torch.no_grad():
            args, kwargs = self.call_arguments(z, t)
            return {name: self.combine(fmap) for name, fmap in capture.run(*args, **kwargs).items()}

    def prepare_latents(self, z0, noise, t: int):
        """The latents the feature pass sees at timestep t: z0 noised at t, or, under a schedule (denoise-from),
        noised at its start and denoised down to t with every technique applied (DDIM, η = 0; a flow-matching
        model: Euler steps z ← z + (σ(s') − σ(s))·v between the σ of the timesteps)."""
        import torch

        from difffeat.models.backbones import backbone_for

        backbone = backbone_for(self.stack.pipe)
        steps = self.stack.steps(t)
        with torch.no_grad():
            z = backbone.noise_latents(z0, noise, steps[0])
            for s, s_next in zip(steps[:-1], steps[1:]):
                z = backbone.step(z, self.eps(z, s), s, s_next)
        return z


class TechniqueProvider(ABC):
    """What a technique package gives the core: stacks, and the spec strings and variants it can read (the core
    checks every spec before any model loads, and stores each in one spelling)."""

    @abstractmethod
    def stack(self, pipe, techniques: Sequence) -> ConditioningStack:
        """`techniques` (spec strings or the package's technique objects) bound to `pipe`."""

    @abstractmethod
    def canonical_spec(self, spec: str) -> str:
        """`spec` in its one canonical spelling; UserError naming the valid techniques when it is wrong."""

    @abstractmethod
    def parse_variants(self, args: Sequence[str]) -> dict[str, list[str]]:
        """``NAME=SPEC[+SPEC…]`` strings → {name: canonical specs}, in the order given."""

    @abstractmethod
    def read_variants(self, path: str) -> dict[str, list[str]]:
        """A variants file (name → list of specs) → {name: canonical specs}."""


class Providers:
    """Technique providers by name: registered by a call, or found through the entry-point group on first use."""

    def __init__(self, group: str = PROVIDER_GROUP):
        self.group = group
        self.registered: dict[str, TechniqueProvider] = {}
        self.scanned = False

    def register(self, name: str, provider: TechniqueProvider) -> None:
        if not isinstance(provider, TechniqueProvider):
            raise TypeError(f"technique provider {name!r} is a {type(provider).__name__}, not a TechniqueProvider")
        self.registered[name] = provider

    def scan(self) -> None:
        from importlib.metadata import entry_points

        self.scanned = True
        for ep in entry_points(group=self.group):
            if ep.name not in self.registered:
                self.register(ep.name, ep.load()())

    def get(self, name: str | None = None) -> TechniqueProvider:
        """The provider `name`, or the only one installed."""
        if not self.scanned:
            self.scan()
        if name is not None:
            if name not in self.registered:
                raise UserError(f"no technique provider {name!r} (installed: {', '.join(self.registered) or 'none'})")
            return self.registered[name]
        if len(self.registered) != 1:
            raise UserError(f"generation techniques need exactly one technique provider installed (an entry point in "
                            f"{self.group!r}); found {', '.join(self.registered) or 'none'}")
        return next(iter(self.registered.values()))


# The one registry of this process: providers are code, like the modules that define them.
PROVIDERS = Providers()


def register_provider(name: str, provider: TechniqueProvider) -> None:
    """Make `provider` available under `name` without an entry point (e.g. a package not installed)."""
    PROVIDERS.register(name, provider)


def technique_provider(name: str | None = None) -> TechniqueProvider:
    """The installed technique provider (`name` chooses one when several are)."""
    return PROVIDERS.get(name)


def variants_given(file: str | None, flags: Sequence[str] = ()) -> dict[str, list[str]]:
    """Named technique lists from a variants file (`gate --emit`) and ``--variant NAME=SPEC+SPEC`` flags, read by the
    installed provider (loaded only when something is given); a name in both is an error naming it and the file."""
    if not file and not flags:
        return {}
    provider = technique_provider()
    variants = provider.read_variants(file) if file else {}
    for name, specs in provider.parse_variants(list(flags)).items():
        if name in variants:
            raise UserError(f"--variant {name!r} is also in {file}")
        variants[name] = specs
    return variants


def technique_stack(pipe, techniques: Sequence | ConditioningStack = ()) -> ConditioningStack:
    """`techniques` bound to `pipe` by the installed provider (none: `PlainStack`, no provider loaded); a ready
    `ConditioningStack` passes through."""
    if isinstance(techniques, ConditioningStack):
        return techniques
    if not list(techniques):
        return PlainStack(pipe)
    return technique_provider().stack(pipe, list(techniques))


def pipe_cache(pipe, name: str) -> dict:
    """A dict kept on `pipe` itself, for what techniques load for that pipeline (ControlNet modules): it lives and
    is freed with the pipeline, and no module-level cache outlives it. `vars` skips diffusers' attribute hooks."""
    return vars(pipe).setdefault(f"difffeat_{name}", {})

