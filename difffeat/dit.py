"""Diffusion transformers (SD3, PixArt, FLUX) as feature extractors: what differs from a UNet, in one place.

A transformer's blocks produce token sequences, not maps, and a joint-attention block (SD3, FLUX) returns two
streams, ``(text tokens, image tokens)``. difffeat hooks them like UNet modules, by name, and turns what a
module produced into a ``[B, C, h, w]`` map: the image tokens only (found by their count, which the shape
trace makes differ from the text's), laid back on the patch grid (latent size / patch size, any aspect ratio).

Noise: `--t` keeps its meaning, an integer in [0, 1000) from nearly clean to pure noise. For a flow-matching
scheduler (SD3, FLUX) it maps to the noise level σ the scheduler's own training table gives that step:
``s = (t + 1) / 1000``, shifted as the scheduler shifts (static ``σ = k·s / (1 + (k − 1)·s)`` with its `shift`
k; FLUX's resolution-dependent ``σ = e^μ / (e^μ + 1/s − 1)``), and the latent is ``(1 − σ)·z0 + σ·ε``. A
DDPM-family scheduler (PixArt) noises with its ``alphas_cumprod`` exactly as for UNets.

DiTF's fixes are layer options (``NAME:remod``, ``NAME:massive=zero|clip``): `difffeat.ditf`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difffeat.errors import UserError
from difffeat.layers import first_tensor, register_layer_preset, token_grid

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
# The guidance FLUX-dev is conditioned with (its distilled guidance embedding; FluxPipeline's default).
FLUX_GUIDANCE = 3.5


# ----------------------------------------------------------------------------------------------- models
def denoiser(pipe):
    """The pipeline's denoising network: its transformer, or its UNet."""
    model = getattr(pipe, "transformer", None)
    return model if model is not None else pipe.unet


def is_transformer(pipe) -> bool:
    return getattr(pipe, "transformer", None) is not None


def family(model) -> str:
    """"sd3", "pixart" or "flux" for the transformers difffeat knows; a UserError naming the class otherwise."""
    name = type(model).__name__
    for key, fam in (("SD3", "sd3"), ("PixArt", "pixart"), ("Flux", "flux")):
        if name.startswith(key):
            return fam
    raise UserError(f"{name}: a transformer difffeat cannot hook yet (known: SD3Transformer2DModel, "
                    "PixArtTransformer2DModel, FluxTransformer2DModel)")


def patch_size(model) -> int:
    """Latent cells per token along a side (FLUX packs 2×2 latent cells into one token outside the model)."""
    return 2 if family(model) == "flux" else int(model.config.patch_size)


def vae_factor(pipe) -> int:
    return getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def native_latent_size(pipe) -> tuple[int, int]:
    model = denoiser(pipe)
    size = model.config.get("sample_size") or getattr(pipe, "default_sample_size", None) or 128
    size = size if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]), int(size[1])


def check_image_size(pipe, height: int, width: int) -> None:
    """A UserError naming the valid sizes when height × width does not tile into whole patches."""
    step = vae_factor(pipe) * patch_size(denoiser(pipe))
    if height % step or width % step or height <= 0 or width <= 0:
        near = lambda v: sorted({max(step, v // step * step), max(step, -(-v // step) * step)})
        raise UserError(f"image size {height}×{width}: a {type(denoiser(pipe)).__name__} needs height and width "
                        f"multiples of {step} (VAE factor {vae_factor(pipe)} × patch {patch_size(denoiser(pipe))}); "
                        f"nearest valid: height {' or '.join(map(str, near(height)))}, "
                        f"width {' or '.join(map(str, near(width)))}")


# ------------------------------------------------------------------------------------------ noise levels
def is_flow_matching(scheduler) -> bool:
    return not hasattr(scheduler, "alphas_cumprod")


def shift_mu(cfg, latent_hw: tuple[int, int]) -> float:
    """FLUX's resolution-dependent shift μ for latents of size `latent_hw` (2×2 latent cells per token), from the
    scheduler config `cfg`, as the FLUX pipeline computes it (`set_timesteps(mu=…)` takes it)."""
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    return base + (top - base) * (tokens - base_len) / (max_len - base_len)


def sigma_of_t(pipe, t: int, latent_hw: tuple[int, int]) -> float:
    """The flow-matching noise level σ ∈ (0, 1] of integer timestep t ∈ [0, 1000) (see the module docstring)."""
    cfg = pipe.scheduler.config
    s = (int(t) + 1) / cfg.num_train_timesteps
    if cfg.get("use_dynamic_shifting"):
        mu = shift_mu(cfg, latent_hw)
        return float(math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    k = cfg.get("shift", 1.0)
    return float(k * s / (1 + (k - 1) * s))


def noise_latents(pipe, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """z0 noised to integer timestep t: flow matching's interpolation, or DDPM's for other schedulers."""
    if is_flow_matching(pipe.scheduler):
        sigma = sigma_of_t(pipe, t, tuple(z0.shape[-2:]))
        return (1 - sigma) * z0 + sigma * noise
    a = pipe.scheduler.alphas_cumprod[int(t)].to(z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


# ------------------------------------------------------------------------------------------------ prompts
def max_sequence_length(pipe) -> int | None:
    """The T5 token count to encode with: the model's own when it records one (mini-dit: 0), else the pipeline's
    default."""
    return vars(pipe).get("difffeat_max_sequence_length")


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> tuple[list[torch.Tensor], dict]:
    """Per prompt a [T, D] embedding, and the per-row extra conditions the transformer takes, encoded by the
    pipeline's own `encode_prompt` (so features condition exactly as generation does)."""
    model = denoiser(pipe)
    fam, device = family(model), model.device
    extra = {} if max_sequence_length(pipe) is None else {"max_sequence_length": max_sequence_length(pipe)}
    if fam == "sd3":
        window = pipe.tokenizer.model_max_length - 2
        if pipe.text_encoder_3 is None:  # CLIP alone would cut a longer prompt short without a word
            for p in prompts:
                if len(pipe.tokenizer(p, truncation=False, verbose=False).input_ids) - 2 > window:
                    raise UserError(f"prompt longer than the {window} tokens this model's text encoder takes: "
                                    f"{p[:60]!r}…")
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                  do_classifier_free_guidance=False, **extra)
        return list(embeds), {"pooled_projections": pooled}
    if fam == "pixart":
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False, **extra)
        return list(embeds), {"encoder_attention_mask": mask}
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, **extra)
    return list(embeds), {"pooled_projections": pooled}


def pack_flux(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents → FLUX's [B, (H/2)(W/2), 4C] tokens (2×2 latent patches, row-major)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def flux_image_ids(latent_hw: tuple[int, int], device=None, dtype=None) -> torch.Tensor:
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def forward_kwargs(pipe, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
                   guidance: float = FLUX_GUIDANCE, sigma: torch.Tensor | None = None) -> dict:
    """The keyword arguments of one transformer call on latents z [B, C, h, w] at integer timesteps t [B]; for a
    flow-matching model `sigma` [B] (a sampler's own noise levels) replaces the σ(t) of the training table."""
    model = denoiser(pipe)
    fam, latent_hw = family(model), tuple(z.shape[-2:])
    added = added or {}
    if is_flow_matching(pipe.scheduler):
        if sigma is None:
            sigma = torch.tensor([sigma_of_t(pipe, int(v), latent_hw) for v in t.tolist()], device=z.device)
        else:
            sigma = torch.as_tensor(sigma, device=z.device).float().expand(len(z))
    if fam == "sd3":
        return dict(hidden_states=z, timestep=(sigma * 1000).to(z.dtype), encoder_hidden_states=embeds,
                    pooled_projections=added["pooled_projections"])
    if fam == "pixart":
        cond = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            h, w = latent_hw[0] * vae_factor(pipe), latent_hw[1] * vae_factor(pipe)
            cond = {"resolution": torch.tensor([[h, w]] * len(z), dtype=z.dtype, device=z.device),
                    "aspect_ratio": torch.tensor([[h / w]] * len(z), dtype=z.dtype, device=z.device)}
        kw = dict(hidden_states=z, encoder_hidden_states=embeds, timestep=t.to(z.device), added_cond_kwargs=cond)
        if "encoder_attention_mask" in added:
            kw["encoder_attention_mask"] = added["encoder_attention_mask"]
        return kw
    kw = dict(hidden_states=pack_flux(z), encoder_hidden_states=embeds, pooled_projections=added["pooled_projections"],
              timestep=sigma.to(z.dtype), img_ids=flux_image_ids(latent_hw, z.device, z.dtype),
              txt_ids=torch.zeros(embeds.shape[1], 3, device=z.device, dtype=z.dtype))
    if model.config.guidance_embeds:
        kw["guidance"] = torch.full((len(z),), guidance, device=z.device, dtype=z.dtype)
    return kw


def unpack_flux(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """FLUX's [B, (H/2)(W/2), 4C] tokens → [B, C, H, W] latents (the inverse of `pack_flux`)."""
    b, n, c4 = tokens.shape
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    return tokens.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h * 2, w * 2)


def prediction(pipe, sample: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A transformer's output `sample` as a [B, C, h, w] prediction in the latents' layout: the velocity of a
    flow-matching model (SD3, FLUX: its tokens unpacked), the noise ε of a DDPM-family one (PixArt: the first half
    of its channels when it also predicts the variance, as PixArt's pipeline reads it)."""
    fam = family(denoiser(pipe))
    if fam == "flux":
        return unpack_flux(sample, latent_hw)
    if fam == "pixart" and sample.shape[1] == 2 * pipe.vae.config.latent_channels:
        return sample.chunk(2, dim=1)[0]
    return sample


def dummy_kwargs(model, latent_hw: tuple[int, int], text_tokens: int) -> dict:
    """Zero inputs of the right shapes for one call (the shape trace on the meta device)."""
    cfg, fam, h, w = model.config, family(model), *latent_hw
    if fam == "sd3":
        return dict(hidden_states=torch.zeros(1, cfg.in_channels, h, w), timestep=torch.ones(1),
                    encoder_hidden_states=torch.zeros(1, text_tokens, cfg.joint_attention_dim),
                    pooled_projections=torch.zeros(1, cfg.pooled_projection_dim))
    if fam == "pixart":
        cond = {"resolution": torch.zeros(1, 2), "aspect_ratio": torch.zeros(1, 1)} if model.use_additional_conditions \
            else {"resolution": None, "aspect_ratio": None}
        return dict(hidden_states=torch.zeros(1, cfg.in_channels, h, w), timestep=torch.ones(1, dtype=torch.long),
                    encoder_hidden_states=torch.zeros(1, text_tokens, cfg.caption_channels), added_cond_kwargs=cond)
    kw = dict(hidden_states=torch.zeros(1, (h // 2) * (w // 2), cfg.in_channels), timestep=torch.ones(1),
              encoder_hidden_states=torch.zeros(1, text_tokens, cfg.joint_attention_dim),
              pooled_projections=torch.zeros(1, cfg.pooled_projection_dim), img_ids=flux_image_ids(latent_hw),
              txt_ids=torch.zeros(text_tokens, 3))
    if cfg.guidance_embeds:
        kw["guidance"] = torch.ones(1)
    return kw


# ------------------------------------------------------------------------------------------------ layers
def image_tokens(output, index: int | None):
    """The image-token tensor of a module's output: element `index` of a tuple (None: the output itself)."""
    if index is None:
        return first_tensor(output)
    return output[index] if isinstance(output, (tuple, list)) else None


def as_grid(t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """[B, N, C] tokens on the patch grid → [B, C, h, w]; 4-D maps as they are; None when N fits no grid."""
    if t is None:
        return None
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        grid = token_grid(t.shape[1], latent_hw)
        if grid is not None:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
    return None


def trace_layers(model, latent_hw: tuple[int, int]) -> tuple[list[tuple[str, tuple[int, int, int]]], dict]:
    """Every module called once per forward whose output holds the image tokens, with its [C, h, w] shape and, for
    tuple outputs, which element holds them; from one forward of a copy on the meta device (no memory)."""
    p = patch_size(model)
    n_image = (latent_hw[0] // p) * (latent_hw[1] // p)
    text_tokens = 7 if n_image != 7 else 9  # never the image token count: the two streams cannot be confused
    with torch.device("meta"):
        ghost = type(model).from_config(model.config)
    ghost.eval()
    calls: dict[str, int] = {}
    order: list[tuple[str, tuple[int, int, int]]] = []
    index: dict[str, int | None] = {}

    def make_hook(name: str) -> Callable:
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                return
            candidates = [(None, first_tensor(output))] if not isinstance(output, (tuple, list)) else \
                [(i, o) for i, o in enumerate(output) if isinstance(o, torch.Tensor)]
            for i, t in candidates:
                if t is not None and ((t.ndim == 3 and t.shape[1] == n_image) or t.ndim == 4):
                    fmap = as_grid(t, latent_hw)
                    if fmap is not None:
                        order.append((name, tuple(int(s) for s in fmap.shape[1:])))
                        index[name] = i
                        return

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in ghost.named_modules() if n]
    try:
        with torch.device("meta"), torch.no_grad():
            ghost(**dummy_kwargs(ghost, latent_hw, text_tokens))
    finally:
        for h in handles:
            h.remove()
    listed = [(n, s) for n, s in order if calls[n] == 1]
    return listed, {n: index[n] for n, _ in listed}


def _listing(pipe, height: int | None, width: int | None):
    from difffeat.layers import latent_size

    if height is not None or width is not None:
        native = native_latent_size(pipe)
        factor = vae_factor(pipe)
        check_image_size(pipe, height or native[0] * factor, width or native[1] * factor)
    hw = latent_size(pipe, height, width)
    model = denoiser(pipe)
    # Kept on the model it describes (per latent size), so it is freed with it; `vars` skips nn.Module's hooks.
    listings = vars(model).setdefault("difffeat_layer_shapes", {})
    if hw not in listings:
        listings[hw] = trace_layers(model, hw)
    return listings[hw]


def list_layers(pipe, height: int | None = None, width: int | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """`[(name, (C, h, w)), …]` of a transformer pipeline's modules that produce the image tokens, in forward
    order (`difffeat.list_layers` for transformers); a UserError when height × width does not fit the patches."""
    return list(_listing(pipe, height, width)[0])


def token_index(pipe, height: int | None = None, width: int | None = None) -> dict[str, int | None]:
    """Per listed module, which element of its output tuple holds the image tokens (None: the output itself)."""
    return dict(_listing(pipe, height, width)[1])


def blocks(names: list[str]) -> list[str]:
    """The transformer blocks among hookable names (`transformer_blocks.N`, `single_transformer_blocks.N`)."""
    return [n for n in names if n.count(".") == 1 and n.split(".")[0] in BLOCK_LISTS]


@register_layer_preset("dit-blocks")
def _all_blocks(names: list[str]) -> list[str]:
    """Every transformer block's output (image tokens on the patch grid)."""
    return blocks(names)


@register_layer_preset("dit-middle")
def _middle_block(names: list[str]) -> list[str]:
    """The middle transformer block (DiT features are most semantic around mid depth: DiTF, REPA)."""
    found = blocks(names)
    return found[len(found) // 2 : len(found) // 2 + 1]
