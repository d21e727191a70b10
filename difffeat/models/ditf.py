"""DiTF's two fixes for diffusion-transformer features, as layer options: ``NAME:remod`` and ``NAME:massive=…``.

DiTF's fixes (Gan et al., NeurIPS'25) are layer suffixes on a block: ``NAME:massive=zero|clip`` sets the block's
massive-activation channels (per image, channels whose largest magnitude over the image tokens is more than
`MASSIVE_RATIO` × the median channel's) to zero, or clips them to the largest magnitude of the other
channels; ``NAME:remod`` re-modulates the block's image tokens as its AdaLN does: ``LN(h)·(1 + scale) + shift``
(LayerNorm without affine, eps 1e-6) with the block's own pre-attention shift and scale, as DiTF's reference
code does for FLUX. Both together (``NAME:massive=zero:remod``) apply in that order.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from difffeat.models.layer_presets import blocks
from difffeat.models.maps import as_map as as_grid
from difffeat.models.maps import image_tokens

MASSIVE_RATIO = 100.0
OPTIONS = ("remod", "massive=zero", "massive=clip")


def split_layer(name: str) -> tuple[str, tuple[str, ...]]:
    """``"transformer_blocks.3:massive=zero:remod"`` → ``("transformer_blocks.3", ("massive=zero", "remod"))``."""
    base, *options = name.split(":")
    return base, tuple(options)


def check_layer_options(name: str, valid: list[str]) -> None:
    """A UserError unless `name`'s options are DiTF's and its base is a transformer block (`valid`: the model's
    hookable names)."""
    base, options = split_layer(name)
    for opt in options:
        if opt not in OPTIONS:
            raise UserError(f"layer {name!r}: unknown option {opt!r} (options: {', '.join(OPTIONS)})")
    if sum(o.startswith("massive") for o in options) > 1 or len(set(options)) != len(options):
        raise UserError(f"layer {name!r}: each option at most once")
    if base not in blocks(valid):
        close = difflib.get_close_matches(base, blocks(valid), n=3, cutoff=0.6)
        raise UserError(f"layer {name!r}: options apply to transformer blocks only"
                        + (f"; did you mean {', '.join(close)}?" if close else ""))


# ------------------------------------------------------------------------------------------ DiTF options
def massive_channels(tokens: torch.Tensor, ratio: float = MASSIVE_RATIO) -> torch.Tensor:
    """[B, N, C] tokens → [B, C] bool: per image, channels whose max |value| over tokens exceeds `ratio` × the
    median channel's max |value| (the "massive activations" of Sun et al. 2024 that DiTF discards)."""
    peak = tokens.abs().amax(dim=1)
    return peak > ratio * peak.median(dim=1, keepdim=True).values


def suppress_massive(tokens: torch.Tensor, mode: str, ratio: float = MASSIVE_RATIO) -> torch.Tensor:
    """Massive channels set to 0 (``zero``) or clipped to ± the largest magnitude of the other channels (``clip``)."""
    mask = massive_channels(tokens, ratio)[:, None, :]
    if mode == "zero":
        return tokens.masked_fill(mask, 0.0)
    bound = tokens.abs().masked_fill(mask, 0.0).amax(dim=(1, 2), keepdim=True)
    return torch.where(mask, tokens.clamp(-bound, bound), tokens)


def remodulate(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN re-modulation ``LN(h)·(1 + scale) + shift`` (LayerNorm without affine, eps 1e-6); shift, scale [B, C]."""
    normed = F.layer_norm(tokens.float(), tokens.shape[-1:], eps=1e-6)
    return (normed * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(tokens.dtype)


def _modulation_source(block):
    """(module, how) giving a block's pre-attention (shift, scale): an AdaLN's `linear` (SD3, FLUX) or PixArt's
    `scale_shift_table` with the block's timestep embedding."""
    norm = getattr(block, "norm1", None) or getattr(block, "norm", None)
    if norm is not None and isinstance(getattr(norm, "linear", None), torch.nn.Linear):
        return norm.linear, "linear"
    if hasattr(block, "scale_shift_table"):
        return block, "table"
    raise UserError(f"{type(block).__name__}: no AdaLN modulation found for :remod")


class TokenMaps:
    """Turns hooked transformer outputs into maps for `difffeat.extraction.capture.Capture` (its `to_map`), applying the
    DiTF options; a context manager that records each block's modulation while `remod` layers are requested."""

    def __init__(self, model, layers: list[str], index: dict[str, int | None], latent_hw: tuple[int, int]):
        self.model, self.layers, self.index, self.latent_hw = model, list(layers), index, latent_hw
        self.modulation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __call__(self, name: str, output) -> torch.Tensor | None:
        base, options = split_layer(name)
        tokens = image_tokens(output, self.index.get(base))
        if tokens is None or tokens.ndim != 3:
            return as_grid(tokens, self.latent_hw)
        for opt in options:
            if opt.startswith("massive="):
                tokens = suppress_massive(tokens, opt.split("=", 1)[1])
            elif opt == "remod":
                tokens = remodulate(tokens, *self.modulation[base])
        return as_grid(tokens, self.latent_hw)

    def _linear_hook(self, base: str):
        def hook(module, args, output):
            chunks = output.chunk(output.shape[-1] // self.width, dim=-1)
            self.modulation[base] = (chunks[0], chunks[1])

        return hook

    def _table_hook(self, base: str):
        def hook(module, args, kwargs):
            emb = kwargs.get("timestep")
            table = module.scale_shift_table[None] + emb.reshape(len(emb), 6, -1)
            shift, scale = table.chunk(6, dim=1)[:2]
            self.modulation[base] = (shift[:, 0], scale[:, 0])

        return hook

    @property
    def width(self) -> int:
        return int(self.model.config.num_attention_heads * self.model.config.attention_head_dim)

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for base in dict.fromkeys(split_layer(n)[0] for n in self.layers if "remod" in split_layer(n)[1]):
            source, how = _modulation_source(modules[base])
            if how == "linear":
                self._handles.append(source.register_forward_hook(self._linear_hook(base)))
            else:
                self._handles.append(source.register_forward_pre_hook(self._table_hook(base), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False
