"""Prompt text → UNet conditioning, with prompts longer than the text encoder's window chunked, never cut.

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

from difffeat.errors import UserError


def _single_encoder(pipe) -> bool:
    return not hasattr(pipe, "text_encoder_2")


def prompt_token_count(pipe, prompt: str) -> int:
    """Tokens of `prompt` without the start / end tokens."""
    return len(pipe.tokenizer(prompt, truncation=False, verbose=False).input_ids) - 2


@torch.no_grad()
def _encode_windows(pipe, prompt: str) -> torch.Tensor:
    tok, device = pipe.tokenizer, pipe.unet.device
    window = tok.model_max_length - 2
    ids = tok(prompt, truncation=False, add_special_tokens=False, verbose=False).input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chunks = []
    for s in range(0, len(ids), window):
        body = [tok.bos_token_id, *ids[s : s + window], tok.eos_token_id]
        chunks.append(body + [pad] * (tok.model_max_length - len(body)))
    input_ids = torch.tensor(chunks, device=device)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = (input_ids != pad).long()
        mask[:, 0] = 1
    embeds = pipe.text_encoder(input_ids, attention_mask=mask)[0]  # [windows, T, D]
    return embeds.reshape(1, -1, embeds.shape[-1]).to(pipe.unet.dtype)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[list[torch.Tensor], dict | None]:
    """Per prompt a [T_i, D] embedding (T_i a multiple of the window), plus SDXL's pooled embeddings.

    Returns a list, not a stacked tensor, because long prompts give longer sequences; stack them with
    `pad_to_same_length`.
    """
    from difffeat import dit

    if dit.is_transformer(pipe):  # SD3 / PixArt / FLUX: their own encoders and extra conditions
        return dit.encode_prompts(pipe, list(prompts))
    device = pipe.unet.device
    prompts = list(prompts)
    if not _single_encoder(pipe):
        limit = pipe.tokenizer.model_max_length - 2
        long = [p for p in prompts if prompt_token_count(pipe, p) > limit]
        if long:
            raise UserError(f"prompt of {prompt_token_count(pipe, long[0])} tokens is longer than the "
                            f"{limit} this two-encoder model takes; long prompts are chunked only for "
                            f"single-encoder models: {long[0][:60]!r}…")
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return list(embeds), {"text_embeds": pooled}
    limit = pipe.tokenizer.model_max_length - 2
    short = [p for p in prompts if prompt_token_count(pipe, p) <= limit]
    out: dict[str, torch.Tensor] = {}
    if short:
        embeds, _ = pipe.encode_prompt(short, device, 1, False)
        out.update(zip(short, embeds))
    for p in prompts:
        if p not in out:
            out[p] = _encode_windows(pipe, p)[0]
    return [out[p] for p in prompts], None


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


def sdxl_added_conditions(pipe, pooled: torch.Tensor, resolution: tuple[int, int]) -> dict:
    """SDXL's added conditions: pooled text embeddings and (original size, crop, target size) ids."""
    h, w = resolution
    unet = pipe.unet
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(pooled))
    return {"text_embeds": pooled.to(unet.device, unet.dtype), "time_ids": time_ids.to(unet.device, unet.dtype)}
