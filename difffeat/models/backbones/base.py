"""`Backbone`: what differs between denoiser families, behind one interface; `backbone_for(pipe)` picks the class.

A backbone owns, for its family: the latent size and the image sizes it takes, prompt encoding and the extra
conditions of its call, noising at integer timestep t, the denoiser's call arguments (ControlNet residuals added as
keyword arguments), its output read as a prediction in the latents' layout, which modules can be hooked and how
their outputs become ``[C, h, w]`` maps, attention recording, and dummy inputs for shape traces and benchmarks.
Everything above it (extraction, techniques, benchmarks) asks the backbone and never branches on the family.

Adding a backbone is one subclass registered with `register_backbone` (tests/test_backbones.py adds one).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from difffeat.errors import UserError
from difffeat.spine.run import ConfigError

BACKBONES: list[type[Backbone]] = []  # in registration order; the first that fits a pipeline is its backbone


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make `cls` a backbone `backbone_for` can choose (later registrations are tried first, so
    a specialised class registered after a general one wins)."""
    BACKBONES.insert(0, cls)
    return cls


def denoiser(pipe):
    """The pipeline's denoising network: its transformer, or its UNet."""
    model = getattr(pipe, "transformer", None)
    return model if model is not None else pipe.unet


def backbone_for(pipe) -> Backbone:
    """The backbone of `pipe`, made once and kept on the pipeline (it holds no tensors of its own)."""
    found = vars(pipe).get("difffeat_backbone")
    model = denoiser(pipe)
    if found is not None and found.model is model:
        return found
    backbone = backbone_class(model)(pipe)
    vars(pipe)["difffeat_backbone"] = backbone
    return backbone


def backbone_class(model, among: type[Backbone] | None = None) -> type[Backbone]:
    """The backbone class of denoiser `model` (the first registered that fits, of the subclasses of `among` when
    given); a UserError naming the known ones."""
    among = among or Backbone
    for cls in BACKBONES:
        if issubclass(cls, among) and cls.fits(model):
            return cls
    what = "denoiser" if among is Backbone else among.__name__.removesuffix("Backbone").lower()
    known = ", ".join(sorted(c.model_class for c in BACKBONES if c.model_class and issubclass(c, among)))
    raise UserError(f"{type(model).__name__}: a {what} difffeat cannot hook yet (known: {known})")


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` is a flow-matching one (no DDPM ``alphas_cumprod`` table)."""
    return not hasattr(scheduler, "alphas_cumprod")


class Backbone:
    """One denoiser family. Subclasses set `name` and `model_class` (or override `fits`) and the methods their
    family does differently; the defaults are a DDPM-noised model that takes ``(z, t, text)``."""

    name: ClassVar[str] = ""
    #: the diffusers class (name prefix) of the denoisers this backbone runs
    model_class: ClassVar[str] = ""
    #: the diffusers ControlNet class that fits this backbone (None: no ControlNet runs on it)
    controlnet_class: ClassVar[str | None] = None
    #: whether a LoRA in kohya's key format is converted by the pipeline's loader (FLUX's does)
    converts_kohya_lora: ClassVar[bool] = False
    #: whether LoRAs are injected into the denoiser with peft, its pipeline having no LoRA loader (PixArt)
    injects_lora: ClassVar[bool] = False

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = denoiser(pipe)

    @classmethod
    def fits(cls, model) -> bool:
        return bool(cls.model_class) and type(model).__name__.startswith(cls.model_class)

    # -------------------------------------------------------------------------------------------- sizes
    def vae_factor(self) -> int:
        """Image pixels per latent cell along a side (8 for SD, 4 for mini)."""
        pipe = self.pipe
        return getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def native_latent_size(self) -> tuple[int, int]:
        """The latent (h, w) the model was made for (its config's sample size)."""
        size = self.model.config.get("sample_size") or getattr(self.pipe, "default_sample_size", None) or 128
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return int(size[0]), int(size[1])

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent (h, w) for an image of height×width (default: the model's native resolution)."""
        factor = self.vae_factor()
        native = self.native_latent_size()
        for side in (height, width):  # the VAE maps factor×factor pixels to one latent cell: other sizes are cropped
            if side is not None and (side < 1 or side % factor):
                raise ConfigError("resolution", f"image height and width must be positive multiples of {factor} (the "
                                                f"VAE's factor) for this model, e.g. {native[0] * factor} "
                                                f"{native[1] * factor} (native); got {height} {width}")
        h = native[0] if height is None else math.ceil(height / factor)
        w = native[1] if width is None else math.ceil(width / factor)
        return int(h), int(w)

    def check_image_size(self, height: int, width: int) -> None:
        """A UserError naming the valid sizes when the model cannot take height × width (beyond the VAE's factor,
        which `latent_size` checks)."""

    # ------------------------------------------------------------------------------------------- layers
    def list_layers(self, height: int | None = None, width: int | None = None
                    ) -> list[tuple[str, tuple[int, int, int]]]:
        """`[(name, (C, h, w)), …]` of the hookable modules, in forward order (cached on the model per size)."""
        if height is not None or width is not None:
            native, factor = self.native_latent_size(), self.vae_factor()
            self.check_image_size(height or native[0] * factor, width or native[1] * factor)
        hw = self.latent_size(height, width)
        # Kept on the model it describes (per latent size), so it is freed with it; `vars` bypasses nn.Module's
        # attribute hooks, and a module-level cache keyed by id() could outlive its model.
        listings = vars(self.model).setdefault("difffeat_layer_shapes", {})
        if hw not in listings:
            listings[hw] = self.trace_layers(hw)
        return list(listings[hw][0])

    def trace_layers(self, latent_hw: tuple[int, int]) -> tuple[list[tuple[str, tuple[int, int, int]]], dict]:
        """(listing, per-layer extra) from one forward of a copy on the meta device: see the subclasses."""
        raise NotImplementedError

    def feature_maps(self, layers: Sequence[str], latent_hw: tuple[int, int], resolution: tuple[int, int]):
        """A context manager giving how hooked outputs of `layers` become maps (`Capture`'s `to_map`), or None for
        the default rule (`difffeat.extraction.capture.Capture.default_map`)."""
        return contextlib.nullcontext(None)

    # ---------------------------------------------------------------------------------------- attention
    def text_attention_modules(self) -> tuple[list[str], str] | None:
        """The attention modules image→text maps come from and what they are, or None when every attention
        module with probabilities can be recorded (a UNet's cross-attention)."""
        return None

    def attention_recorder(self, latent_hw: tuple[int, int]):
        """`Capture`'s `probs_processor` for this family (None: the UNet cross-attention one)."""
        return None

    # ------------------------------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], dict | None]:
        """Per prompt a [T, D] embedding, and the extra conditions per row (pooled projections …) or None."""
        raise NotImplementedError

    def call_conditions(self, added: dict | None, resolution: tuple[int, int]) -> dict | None:
        """The per-row extra conditions of `encode_prompts` as the denoiser's call takes them."""
        if added is None:
            return None
        model = self.model
        return {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
                for k, v in added.items()}

    # -------------------------------------------------------------------------------------------- noise
    @property
    def flow_matching(self) -> bool:
        """Whether the scheduler is a flow-matching one (`is_flow_matching`)."""
        return is_flow_matching(self.pipe.scheduler)

    def sigma_of_t(self, t: int, latent_hw: tuple[int, int]) -> float:
        """The flow-matching noise level σ ∈ (0, 1] of integer timestep t ∈ [0, 1000): ``s = (t + 1) / 1000``
        shifted as the scheduler shifts (static ``σ = k·s / (1 + (k − 1)·s)``; FLUX's resolution-dependent
        ``σ = e^μ / (e^μ + 1/s − 1)``)."""
        cfg = self.pipe.scheduler.config
        s = (int(t) + 1) / cfg.num_train_timesteps
        if cfg.get("use_dynamic_shifting"):
            mu = shift_mu(cfg, latent_hw)
            return float(math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
        k = cfg.get("shift", 1.0)
        return float(k * s / (1 + (k - 1) * s))

    def noise_latents(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """z0 noised to integer timestep t: flow matching's interpolation, or DDPM's for other schedulers."""
        if self.flow_matching:
            sigma = self.sigma_of_t(t, tuple(z0.shape[-2:]))
            return (1 - sigma) * z0 + sigma * noise
        a = self.pipe.scheduler.alphas_cumprod[int(t)].to(z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def step(self, z: torch.Tensor, prediction: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """One deterministic step from timestep t to t_next < t with the model's `prediction` at t: DDIM (η = 0) on
        ε, or an Euler step ``z + (σ(t_next) − σ(t))·v`` on a flow-matching model's velocity."""
        if self.flow_matching:
            hw = tuple(z.shape[-2:])
            return z + (self.sigma_of_t(t_next, hw) - self.sigma_of_t(t, hw)) * prediction
        return ddim_step(z, prediction, self.pipe.scheduler.alphas_cumprod, t, t_next)

    # --------------------------------------------------------------------------------------------- call
    def call(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
             sigma: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) of one denoiser call on latents z [B, C, h, w] at integer timesteps t [B]; `sigma` [B]: a
        flow-matching sampler's own noise levels (instead of σ(t))."""
        raise NotImplementedError

    def control_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (latents, timestep) of a call as a ControlNet of this family sees them."""
        raise NotImplementedError

    def prediction(self, sample: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The denoiser's output `sample` as a [B, C, h, w] prediction in the latents' layout."""
        return sample

    def dummy_call(self, latent_hw: tuple[int, int], text_tokens: int = 77) -> tuple[tuple, dict[str, Any]]:
        """Zero inputs of the right shapes for one call (shape traces on the meta device, benchmarks)."""
        raise NotImplementedError


def shift_mu(cfg, latent_hw: tuple[int, int]) -> float:
    """FLUX's resolution-dependent shift μ for latents of size `latent_hw` (2×2 latent cells per token), from the
    scheduler config `cfg`, as the FLUX pipeline computes it (`set_timesteps(mu=…)` takes it)."""
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    return base + (top - base) * (tokens - base_len) / (max_len - base_len)


def ddim_step(z: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from timestep t to t_next < t."""
    a, a_next = alphas_cumprod[t].to(z), alphas_cumprod[t_next].to(z)
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
