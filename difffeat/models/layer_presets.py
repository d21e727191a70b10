"""Layer presets by name: each maps a model's hookable layer names (forward order) to the layers it uses.

One registry for every backbone (`register_layer_preset`); a preset that selects nothing on a model does not fit it,
and `difffeat.models.layers.resolve_layers` says so.
"""

from __future__ import annotations

from collections.abc import Callable

LAYER_PRESETS: dict[str, Callable[[list[str]], list[str]]] = {}
# The transformer block lists of the diffusers DiTs (SD3, PixArt: the first; FLUX: both).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def register_layer_preset(name: str):
    """Decorator: a preset maps the model's hookable layer names (forward order) to the layers it uses."""

    def wrap(fn):
        LAYER_PRESETS[name] = fn
        return fn

    return wrap


def _up_block_ids(names: list[str]) -> list[int]:
    return sorted({int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")})


def blocks(names: list[str]) -> list[str]:
    """The transformer blocks among hookable names (`transformer_blocks.N`, `single_transformer_blocks.N`)."""
    return [n for n in names if n.count(".") == 1 and n.split(".")[0] in BLOCK_LISTS]


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


@register_layer_preset("dit-blocks")
def _all_blocks(names: list[str]) -> list[str]:
    """Every transformer block's output (image tokens on the patch grid)."""
    return blocks(names)


@register_layer_preset("dit-middle")
def _middle_block(names: list[str]) -> list[str]:
    """The middle transformer block (DiT features are most semantic around mid depth: DiTF, REPA)."""
    found = blocks(names)
    return found[len(found) // 2 : len(found) // 2 + 1]


@register_layer_preset("auto")
def _auto(names: list[str]) -> list[str]:
    """The default of every command that takes `--layer`: DIFT's `up_blocks.1` on a UNet, the middle transformer
    block (`dit-middle`) on a transformer, so that a command run without `--layer` fits whatever model it is given."""
    return _dift(names) if _up_block_ids(names) else _middle_block(names)
