"""The seam between the extractor and generation techniques: what a technique stack must provide, and the
registry of the packages that provide one.

difffeat never imports a technique package. A package (``pipelines`` is the built-in one) declares an entry
point in the group ``difffeat.techniques`` whose object is a callable returning a `TechniqueProvider`; the
core loads it the first time techniques are asked for (or a program calls `register_provider`). So
``FeatureExtractor(pipe, layers, techniques=["controlnet:canny"])`` works without the caller importing the
package, and the dependency points from the package to difffeat only.

Per extraction, `FeatureExtractor` asks the stack for, in this order: whether each image can be processed at all
(`missing`), each image's prompt (`prompts`, with the fields the stack derives from the image itself, such as a
caption, `image_fields`), the per-image control inputs (`control_images`), then, with
the stack `active()`, one `BatchConditioning` per batch whose `prepare_latents` turns clean latents and noise
into what the feature pass sees and whose `features` runs that pass through the capture hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from difffeat.errors import UserError

PROVIDER_GROUP = "difffeat.techniques"


class BatchConditioning(ABC):
    """One batch's conditioning under a stack: prompt embeddings, control inputs, guidance branches."""

    @abstractmethod
    def subset(self, rows: list[int]) -> BatchConditioning:
        """The conditioning of some rows of the batch."""

    @abstractmethod
    def prepare_latents(self, z0, noise, t: int):
        """The latents the feature pass sees at timestep `t`, from clean latents `z0` and the seeded `noise`
        (plainly z0 noised at t; a schedule technique may run denoising steps first)."""

    @abstractmethod
    def features(self, capture, z, t) -> dict[str, Any]:
        """The activations `capture` (a `difffeat.extraction.capture.Capture`) records in one conditioned UNet call."""


class ConditioningStack(ABC):
    """Techniques bound to one pipeline: everything the extractor needs from them."""

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

    @abstractmethod
    def conditioning(self, encoder, prompts: Sequence[str], controls: Sequence, rows: Sequence[int],
                     resolution: tuple[int, int]) -> BatchConditioning:
        """The conditioning of batch rows `rows` (indices into `prompts` and the control inputs), with text
        embeddings from `encoder` (a `difffeat.models.prompts.PromptEncoder`); called inside `active()`."""


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


def technique_stack(pipe, techniques: Sequence | ConditioningStack = ()) -> ConditioningStack:
    """`techniques` bound to `pipe` by the installed provider; a ready `ConditioningStack` passes through."""
    if isinstance(techniques, ConditioningStack):
        return techniques
    return technique_provider().stack(pipe, list(techniques))


def pipe_cache(pipe, name: str) -> dict:
    """A dict kept on `pipe` itself, for what techniques load for that pipeline (ControlNet modules): it lives and
    is freed with the pipeline, and no module-level cache outlives it. `vars` skips diffusers' attribute hooks."""
    return vars(pipe).setdefault(f"difffeat_{name}", {})

