"""Which UNet modules can be hooked, their output shapes, and layer presets by name.

Shapes come from one forward pass of a copy of the UNet built on the `meta` device: no memory, no
compute, any architecture (SD-1.x/2.x, SDXL with its added text/time conditions) at any resolution.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable

import torch

from difffeat.errors import UserError
from difffeat.run import ConfigError


def vae_scale_factor(pipe) -> int:
    """Image pixels per latent cell along a side (8 for SD, 4 for mini)."""
    return getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def native_resolution(pipe) -> tuple[int, int]:
    """The (height, width) of images the model was made for."""
    factor = vae_scale_factor(pipe)
    h, w = latent_size(pipe)
    return h * factor, w * factor


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Latent (h, w) for an image of height×width (default: the model's native resolution)."""
    from difffeat.dit import native_latent_size

    factor = vae_scale_factor(pipe)
    native = native_latent_size(pipe)  # the UNet's or transformer's sample size
    for side in (height, width):  # the VAE maps factor×factor pixels to one latent cell: other sizes are cropped
        if side is not None and (side < 1 or side % factor):
            raise ConfigError("resolution", f"image height and width must be positive multiples of {factor} (the "
                                            f"VAE's factor) for this model, e.g. {native[0] * factor} "
                                            f"{native[1] * factor} (native); got {height} {width}")
    h = native[0] if height is None else math.ceil(height / factor)
    w = native[1] if width is None else math.ceil(width / factor)
    return int(h), int(w)


def unet_conditions(unet, batch: int, latent_hw: tuple[int, int], device=None, dtype=None) -> dict:
    """Dummy-free conditioning *shapes* a UNet needs besides latents and timestep (SDXL's added conds)."""
    cfg = unet.config
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {"added_cond_kwargs": {"text_embeds": torch.zeros(batch, text_dim, device=device, dtype=dtype),
                                      "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}}
    return {}


def first_tensor(output):
    """The tensor a module produced: itself, the first element of a tuple, or a diffusers output's first field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple())
    return None


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) of a token sequence of length n: the latent grid downsampled by a power of two."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == n_tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


def as_map(t: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """A module output as a [B, C, h, w] map: 4-D as is, token sequences [B, h·w, C] reshaped, else None."""
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        grid = token_grid(t.shape[1], latent_hw)
        if grid is not None:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
    return None


def list_layers(pipe, height: int | None = None, width: int | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """`[(name, (C, h, w)), …]` for every hookable module of `pipe.unet`, in forward order.

    Hookable: called once per forward and producing a feature map ([B, C, h, w]) or a token sequence
    over the latent grid ([B, h·w, C], e.g. transformer blocks). Modules called several times per
    forward (shared activations) are left out: a hook on them would not name one place.
    """
    from difffeat import dit

    unet = dit.denoiser(pipe)
    if dit.is_transformer(pipe):  # a transformer's blocks as maps of their image tokens (difffeat.dit)
        return dit.list_layers(pipe, height, width)
    hw = latent_size(pipe, height, width)
    # The listing is kept on the UNet it describes (per latent size), so it is freed with the model; `vars`
    # bypasses nn.Module's attribute hooks, and a module-level cache keyed by id() could outlive its UNet.
    listings = vars(unet).setdefault("difffeat_layer_shapes", {})
    if hw not in listings:
        listings[hw] = _trace_shapes(unet, hw)
    return list(listings[hw])


def _trace_shapes(unet, hw: tuple[int, int]) -> list[tuple[str, tuple[int, int, int]]]:
    with torch.device("meta"):
        ghost = type(unet).from_config(unet.config)
    ghost.eval()
    calls: dict[str, int] = {}
    order: list[tuple[str, tuple[int, int, int]]] = []
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            t = first_tensor(output)
            fmap = as_map(t, hw) if t is not None else None
            if fmap is not None and calls[name] == 1:
                order.append((name, tuple(int(s) for s in fmap.shape[1:])))

        return hook

    for name, module in ghost.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    cross = ghost.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (tuple, list)) else cross
    with torch.device("meta"), torch.no_grad():
        x = torch.zeros(1, ghost.config.in_channels, *hw)
        ghost(x, torch.tensor([1]), torch.zeros(1, 77, cross), **unet_conditions(ghost, 1, hw))
    for h in handles:
        h.remove()
    return [(name, shape) for name, shape in order if calls[name] == 1]


# ---------------------------------------------------------------------------------------------- presets
LAYER_PRESETS: dict[str, Callable[[list[str]], list[str]]] = {}


def register_layer_preset(name: str):
    """Decorator: a preset maps the model's hookable layer names (forward order) to the layers it uses."""

    def wrap(fn):
        LAYER_PRESETS[name] = fn
        return fn

    return wrap


def _up_block_ids(names: list[str]) -> list[int]:
    return sorted({int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")})


@register_layer_preset("dift")
def _dift(names: list[str]) -> list[str]:
    """DIFT's choice: the output of up_blocks[1] (SD's 1/16-resolution semantic features)."""
    return ["up_blocks.1"]


@register_layer_preset("gdf-legacy")
def _gdf_legacy(names: list[str]) -> list[str]:
    """The content-shift paper's four maps: the upsampler of every up block but the last, plus the
    last transformer of the last up block (research/content_shift_gate.md §3.1), mapped to the model's
    own block count. Where the last up block has no transformer (SDXL), its last resnet stands in: the
    same full-resolution map one module earlier."""
    ups = _up_block_ids(names)
    if not ups:  # not a UNet
        return []
    chosen = [f"up_blocks.{i}.upsamplers.0" for i in ups if f"up_blocks.{i}.upsamplers.0" in names]
    last = [n for n in names if n.startswith(f"up_blocks.{ups[-1]}.attentions.") and n.count(".") == 3]
    last = last or [n for n in names if n.startswith(f"up_blocks.{ups[-1]}.resnets.") and n.count(".") == 3]
    return chosen + last[-1:]


@register_layer_preset("hyperfeatures")
def _hyperfeatures(names: list[str]) -> list[str]:
    """Diffusion Hyperfeatures: every resnet of every up block."""
    return [n for n in names if n.startswith("up_blocks.") and ".resnets." in n and n.count(".") == 3]


def resolve_layers(pipe, layers: Iterable[str], height: int | None = None, width: int | None = None) -> list[str]:
    """Expand presets, check every name against `list_layers`, and return the names in forward order.

    Unknown names fail here, before any work, with the closest valid names as suggestions.
    """
    from difffeat import dit

    valid = [name for name, _ in list_layers(pipe, height, width)]
    model = type(dit.denoiser(pipe)).__name__
    wanted: list[str] = []
    for layer in layers:
        if layer in LAYER_PRESETS:
            chosen = LAYER_PRESETS[layer](valid)
            foreign = [n for n in chosen if n not in valid]
            if foreign or not chosen:
                raise UserError(f"layer preset {layer!r} does not fit this {model}"
                                + (f" (it names {', '.join(foreign)})" if foreign else " (it selects nothing)")
                                + f"; presets: {', '.join(LAYER_PRESETS)}")
            wanted += chosen
        elif layer in valid:
            wanted.append(layer)
        elif ":" in layer and layer.split(":")[0] in valid:  # a transformer block with DiTF options
            from difffeat.ditf import check_layer_options

            check_layer_options(layer, valid)
            wanted.append(layer)
        else:
            # The nearest names even when none is close: a name of another architecture (a UNet's on a
            # transformer) then shows what this model's names look like.
            close = difflib.get_close_matches(layer, valid + list(LAYER_PRESETS), n=3, cutoff=0.6) or \
                difflib.get_close_matches(layer, valid, n=3, cutoff=0.0)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `difffeat layers` lists them"
            raise UserError(f"unknown layer {layer!r} for this {model}{hint}")
    if not wanted:
        raise UserError("no layers requested")
    rank = {name: i for i, name in enumerate(valid)}
    return sorted(dict.fromkeys(wanted), key=lambda n: (rank[n.split(":")[0]], n))
