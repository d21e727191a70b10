"""Prompt text → denoiser conditioning, cached per prompt; a UNet's prompts longer than the text encoder's window
chunked, never cut (the backbone encodes: `difffeat.models.backbones`).

Prompts that fit use the pipeline's own `encode_prompt`, so every architecture conditions exactly as it
does when generating (SDXL: both encoders, penultimate states, pooled projection). A longer prompt is
split into windows of `model_max_length - 2` tokens, each encoded with its own start / end tokens, and the
window embeddings are concatenated along the sequence (the community "long prompt" scheme the content-shift
code uses). Prompts of one batch must have equal lengths: shorter ones are padded with the empty prompt's
window (`pad_to_same_length`), which is what generation UIs do for CFG's two branches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difffeat.models.backbones import backbone_for
from difffeat.models.backbones.unet import (  # noqa: F401 (importable here as before)
    encode_windows,
    prompt_token_count,
    sdxl_added_conditions,
)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[list[torch.Tensor], dict | None]:
    """Per prompt a [T_i, D] embedding, plus the extra conditions the denoiser takes (SDXL's pooled embeddings, a
    transformer's pooled projections or attention mask), as the pipeline's backbone encodes them
    (`difffeat.models.backbones`; a UNet's long prompts chunked into windows, T_i a multiple of the window).

    Returns a list, not a stacked tensor, because long prompts give longer sequences; stack them with
    `pad_to_same_length`.
    """
    return backbone_for(pipe).encode_prompts(list(prompts))


def pad_to_same_length(embeds: Sequence[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Stack [T_i, D] embeddings into [B, T_max, D], padding with windows of the empty prompt `empty` [T, D]."""
    longest = max(e.shape[0] for e in embeds)
    rows = []
    for e in embeds:
        missing = (longest - e.shape[0]) // empty.shape[0]
        rows.append(torch.cat([e, *([empty.to(e)] * missing)]) if missing else e)
    return torch.stack(rows)


class PromptEncoder:
    """Cached prompt embeddings for one pipeline: each distinct (weights, prompt) is encoded once.

    `weights` names the active text-encoder weights (a LoRA changes the embeddings), so one encoder can
    serve several variants of a run. `__call__` returns the batch [B, T, D] padded to one length and
    SDXL's added conditions (pooled embeddings) or None.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self._cache: dict[tuple, tuple[torch.Tensor, dict | None]] = {}

    def rows(self, prompts: Sequence[str], weights: tuple = ()) -> list[tuple[torch.Tensor, dict | None]]:
        new = [p for p in dict.fromkeys(prompts) if (weights, p) not in self._cache]
        if new:
            embeds, added = encode_prompts(self.pipe, new)
            for i, p in enumerate(new):
                self._cache[(weights, p)] = (embeds[i], None if added is None else {k: v[i] for k, v in added.items()})
        return [self._cache[(weights, p)] for p in prompts]

    def __call__(self, prompts: Sequence[str], weights: tuple = (), length: int = 0
                 ) -> tuple[torch.Tensor, dict | None]:
        rows = self.rows(prompts, weights)
        empty = self.rows([""], weights)[0][0]
        embeds = [e for e, _ in rows]
        if length > max(e.shape[0] for e in embeds):
            embeds.append(torch.cat([empty] * (length // empty.shape[0])))
            stacked = pad_to_same_length(embeds, empty)[:-1]
        else:
            stacked = pad_to_same_length(embeds, empty)
        added = None if rows[0][1] is None else {k: torch.stack([a[k] for _, a in rows]) for k in rows[0][1]}
        return stacked, added
