"""Attention features by preset: which cross-attention layers to record, and how their maps become features.

`gdf-up-cross` is the attention feature of generic-diffusion-feature (GDF), which the content-shift paper
concatenates after its amalgamation (research/content_shift_gate.md §3.1): the head-mean cross-attention
probabilities softmax(QKᵀ/√d) of the up blocks' cross-attention layers at the two coarsest resolutions (16×16
and 32×32 for SD-1.5 at 512²: up_blocks[1] and [2], three layers each), averaged over the layers of each
resolution, one channel per text token (77 on SD-1.5: 2 × 77 = 154 channels), resized (nearest) to the grid
of the conv features. GDF keeps every token position, start and padding included, and records the maps with
one fixed prompt for every image, so that a channel means the same token everywhere.

    groups = attention_groups(pipe, ["gdf-up-cross"], height, width)  # {"gdf-up-cross.16x16": [attn2 names], …}
    FeatureExtractor(pipe, layers, attention=attention_modules(groups))  # records f"{module}:probs" maps
    merge_attention(features, groups, size)  # {"gdf-up-cross.16x16:probs": [B, T, *size], …}

Joint attention (SD3's and FLUX's ``transformer_blocks.N.attn``, FLUX's ``single_transformer_blocks.N.attn``) has
no cross-attention: image and text tokens attend over one concatenated sequence. Its attention feature is the
image→text part: for image query i and text key j, softmax over *all* keys (image and text, as the joint attention
computes it) of q_i·k_j/√d, averaged over heads, restricted to the text keys: one channel per text token on the
patch grid. PixArt's cross-attention (``transformer_blocks.N.attn2``) gives the same with the text keys alone.
The recorders (`difffeat.models.dit_attention`) wrap the module's own processor and read q and k by forward hooks, so
the module's output is the stock one; `check_joint_attention` names the modules each family has.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from difffeat.models.backbones import backbone_for
from difffeat.models.dit import probs_processor_for  # noqa: F401  (importable from here as before)
from difffeat.models.dit_attention import (  # noqa: F401  (the transformers' recorders, importable from here as before)
    JointAttentionProbs,
    image_to_text_probs,
    probs_processor,
)
from difffeat.models.layers import list_layers

ATTENTION_PRESETS: dict[str, Callable[[list[tuple[str, tuple[int, int, int]]]], dict[str, list[str]]]] = {}
RESIZE_MODES = ("nearest", "bilinear")


def register_attention_preset(name: str):
    """Decorator: a preset maps the model's hookable layers `[(name, (C, h, w)), …]` (forward order) to the
    attention modules it records, grouped by the feature each group becomes: ``{feature name: [modules]}``."""

    def wrap(fn):
        ATTENTION_PRESETS[name] = fn
        return fn

    return wrap


@register_attention_preset("gdf-up-cross")
def gdf_up_cross(layers: list[tuple[str, tuple[int, int, int]]]) -> dict[str, list[str]]:
    """The up blocks' cross-attention layers (``…attn2``) at the two coarsest of their resolutions, one group per
    resolution (GDF keeps the maps between img/32 and img/16; on SD-1.x, SD-2.x and SDXL those are the two
    coarsest up-block cross-attention grids)."""
    by_grid: dict[tuple[int, int], list[str]] = {}
    for name, shape in layers:
        if name.startswith("up_blocks.") and name.endswith(".attn2"):
            by_grid.setdefault((shape[1], shape[2]), []).append(name)
    coarsest = sorted(by_grid, key=lambda hw: hw[0] * hw[1])[:2]
    return {f"gdf-up-cross.{h}x{w}": by_grid[(h, w)] for h, w in coarsest}


def attention_groups(pipe, names: Iterable[str], height: int | None = None,
                     width: int | None = None) -> dict[str, list[str]]:
    """The groups of the attention presets in `names` (a module name stands for a group of its own)."""
    layers = list_layers(pipe, height, width)
    modules = dict(pipe.unet.named_modules())
    groups: dict[str, list[str]] = {}
    for name in names:
        if name in ATTENTION_PRESETS:
            found = ATTENTION_PRESETS[name](layers)
            if not found:
                raise UserError(f"attention preset {name!r}: this UNet has no layers it records")
            groups.update(found)
        else:
            groups[name] = [name]
    for group in groups.values():
        for module in group:
            if not getattr(modules.get(module), "is_cross_attention", False):
                raise UserError(f"{module!r} is not a cross-attention module of this UNet")
    return groups


def attention_modules(groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Every module of `groups`, each once, in order."""
    return list(dict.fromkeys(m for ms in groups.values() for m in ms))


def merge_attention(features: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[str]],
                    size: tuple[int, int] | None = None, mode: str = "nearest") -> dict[str, torch.Tensor]:
    """``{f"{group}:probs": mean over the group's f"{module}:probs" maps, resized to `size`}`` ([B, T, *size]).

    `mode` is the resize (GDF's is nearest); `size` None keeps each group's own grid."""
    if mode not in RESIZE_MODES:
        raise UserError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    out = {}
    for name, group in groups.items():
        x = torch.stack([features[f"{m}:probs"] for m in group]).mean(0)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
        out[f"{name}:probs"] = x
    return out


# ---------------------------------------------------------------------------- transformers (SD3, FLUX, PixArt)
def joint_attention_modules(model) -> list[str]:
    """The joint (text–image) attention modules of a transformer: those with text-key projections (`add_k_proj`)."""
    return [n for n, m in model.named_modules()
            if hasattr(m, "processor") and getattr(m, "add_k_proj", None) is not None]


def text_attention_modules(pipe) -> tuple[list[str], str] | None:
    """The attention modules of the pipeline's denoiser that image→text maps come from, and what they are (the
    backbone's: SD3's joint ones, FLUX's double- and single-stream ones, PixArt's cross-attention ones); None for a
    UNet, whose every cross-attention module records its probabilities."""
    return backbone_for(pipe).text_attention_modules()


def check_joint_attention(pipe, names: Sequence[str]) -> None:
    """A UserError unless every name is an attention module that image→text maps come from on this pipeline's
    denoiser (`text_attention_modules`; presets and other names get the nearest module names). A UNet's names are
    checked where its modules are hooked."""
    found = text_attention_modules(pipe)
    if found is None:
        return
    valid, kind = found
    model = backbone_for(pipe).model
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6) or \
                difflib.get_close_matches(name, valid, n=3, cutoff=0.0)
            what = "a UNet attention preset" if name in ATTENTION_PRESETS else f"not a {kind} module"
            raise UserError(f"attention {name!r}: {what} of this {type(model).__name__}"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))
