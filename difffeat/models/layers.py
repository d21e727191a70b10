"""Which modules of a pipeline's denoiser can be hooked, their output shapes, and layer names checked by preset.

Shapes come from one forward pass of a copy of the denoiser built on the `meta` device: no memory, no compute, any
architecture (SD-1.x/2.x, SDXL with its added text/time conditions, the diffusion transformers) at any resolution;
the pipeline's backbone traces them (`difffeat.models.backbones`). Presets live in `difffeat.models.layer_presets`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from difffeat.errors import UserError
from difffeat.models.backbones import backbone_for, denoiser
from difffeat.models.backbones.unet import unet_conditions  # noqa: F401 (importable here as before)
from difffeat.models.ditf import check_layer_options
from difffeat.models.layer_presets import LAYER_PRESETS, register_layer_preset  # noqa: F401 (as before)
from difffeat.models.maps import as_map, first_tensor, token_grid  # noqa: F401 (importable here as before)


def vae_scale_factor(pipe) -> int:
    """Image pixels per latent cell along a side (8 for SD, 4 for mini)."""
    return backbone_for(pipe).vae_factor()


def native_resolution(pipe) -> tuple[int, int]:
    """The (height, width) of images the model was made for."""
    factor = vae_scale_factor(pipe)
    h, w = latent_size(pipe)
    return h * factor, w * factor


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Latent (h, w) for an image of height×width (default: the model's native resolution)."""
    return backbone_for(pipe).latent_size(height, width)


def list_layers(pipe, height: int | None = None, width: int | None = None) -> list[tuple[str, tuple[int, int, int]]]:
    """`[(name, (C, h, w)), …]` for every hookable module of the pipeline's denoiser, in forward order.

    Hookable: called once per forward and producing a feature map ([B, C, h, w]) or a token sequence
    over the latent grid ([B, h·w, C], e.g. transformer blocks; a diffusion transformer's image tokens). Modules
    called several times per forward (shared activations) are left out: a hook on them would not name one place.
    The backbone traces them (`difffeat.models.backbones`).
    """
    return backbone_for(pipe).list_layers(height, width)


def resolve_layers(pipe, layers: Iterable[str], height: int | None = None, width: int | None = None) -> list[str]:
    """Expand presets, check every name against `list_layers`, and return the names in forward order.

    Unknown names fail here, before any work, with the closest valid names as suggestions.
    """
    valid = [name for name, _ in list_layers(pipe, height, width)]
    model = type(denoiser(pipe)).__name__
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
