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

Joint attention (SD3's ``transformer_blocks.N.attn``) has no cross-attention: image and text tokens attend over
one concatenated sequence. Its attention feature is the image→text part: for image query i and text key j,
softmax over *all* keys (image and text, as the joint attention computes it) of q_i·k_j/√d, averaged over
heads, restricted to the text keys: one channel per text token on the patch grid. `JointAttentionProbs` wraps
the module's own processor (whatever it is, SDPA by default) and reads q and k by forward hooks on its
projections and q/k norms, so the module's output is the stock one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from difffeat import dit
from difffeat.capture import AttentionProbsProcessor
from difffeat.errors import UserError
from difffeat.layers import list_layers

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


# --------------------------------------------------------------------------------- joint attention (SD3)
def joint_attention_modules(model) -> list[str]:
    """The joint (text–image) attention modules of a transformer: those with text-key projections (`add_k_proj`)."""
    return [n for n, m in model.named_modules()
            if hasattr(m, "processor") and getattr(m, "add_k_proj", None) is not None]


def check_joint_attention(pipe, names: Sequence[str]) -> None:
    """A UserError unless every name is a joint attention module of the pipeline's SD3 transformer (presets and
    other names get the nearest module names)."""
    model = dit.denoiser(pipe)
    if dit.family(model) != "sd3":  # FLUX rotates q and k (RoPE) inside its processor; PixArt is not built yet
        raise UserError(f"attention maps from a {type(model).__name__}: only SD3's joint attention so far")
    valid = joint_attention_modules(model)
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6) or \
                difflib.get_close_matches(name, valid, n=3, cutoff=0.0)
            what = "a UNet attention preset" if name in ATTENTION_PRESETS else "not a joint attention module"
            raise UserError(f"attention {name!r}: {what} of this {type(model).__name__}"
                            + (f"; did you mean {', '.join(close)}?" if close else ""))


def image_to_text_probs(q: torch.Tensor, k_image: torch.Tensor, k_text: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) over the concatenated keys [image; text], its text columns, mean over heads.

    q, k_image: [B, H, N, d]; k_text: [B, H, T, d] → [B, N, T] (float32). One head at a time, so that the
    [N, N + T] scores of all heads never exist at once."""
    n, heads = k_image.shape[2], q.shape[1]
    keys = torch.cat([k_image, k_text], 2).float()
    out = None
    for h in range(heads):
        p = (q[:, h].float() @ keys[:, h].transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[..., n:]
        out = p if out is None else out + p
    return out / heads


class JointAttentionProbs:
    """A processor for a joint attention module that runs the module's own processor `inner` unchanged and hands
    `on_probs` the image→text probabilities [B, N, T] (`image_to_text_probs`) of the q and k it computed, read by
    forward hooks (after the q/k norms where the module has them, as the processor applies them)."""

    def __init__(self, inner, on_probs):
        self.inner, self.on_probs = inner, on_probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError("joint attention probabilities: the module was called without text tokens")
        seen: dict[str, torch.Tensor] = {}
        sources = {"q": attn.norm_q if attn.norm_q is not None else attn.to_q,
                   "k": attn.norm_k if attn.norm_k is not None else attn.to_k,
                   "k_text": attn.norm_added_k if attn.norm_added_k is not None else attn.add_k_proj}
        handles = [m.register_forward_hook(lambda mod, a, out, key=key: seen.__setitem__(key, out))
                   for key, m in sources.items()]
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        if len(seen) != len(sources):  # e.g. fused qkv projections: the hooked modules never ran
            raise RuntimeError(f"joint attention probabilities: {type(self.inner).__name__} did not run "
                               f"{', '.join(k for k in sources if k not in seen)} projections")
        # [B, N, H·d] projections (no norm) → [B, H, N, d], as the processor views them
        q, k, k_text = (t if t.ndim == 4 else t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                        for t in (seen["q"], seen["k"], seen["k_text"]))
        self.on_probs(image_to_text_probs(q, k, k_text))
        return out


def probs_processor(attn, on_probs):
    """The recording processor for attention module `attn` (`difffeat.capture.Capture`'s `probs_processor`): the
    joint one for joint attention, the UNet's cross-attention one otherwise."""
    if getattr(attn, "add_k_proj", None) is not None:
        return JointAttentionProbs(attn.processor, on_probs)
    return AttentionProbsProcessor(on_probs)
