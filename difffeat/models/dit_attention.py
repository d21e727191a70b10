"""Image→text attention probabilities of diffusion transformers (SD3, FLUX, PixArt), around the stock processor.

For image query i and text key j the map is the attention's own probability, averaged over heads:
``p_ij = mean_h softmax_j'(q_i·k_j'/√d + m_ij')[j]``, the softmax taken over every key j' the module attends to
(with the mask m the processor hands its attention, if any): [B, N, T], one channel per text token, which
`difffeat.extraction.capture.Capture` lays on the patch grid as [B, T, h, w]. Where image and text share one sequence
the softmax also runs over the image keys, so a pixel's channels sum to its share of attention on the text (below 1).

| module | keys j' | q and k, as the processor computes them |
|---|---|---|
| SD3 ``transformer_blocks.N.attn`` | [image; text] | projections, q/k norms |
| FLUX ``transformer_blocks.N.attn`` (double stream) | [text; image] | projections, q/k norms, RoPE on [text; image] |
| FLUX ``single_transformer_blocks.N.attn`` | [text; image] | the same, one sequence: the image is its last N tokens |
| PixArt ``transformer_blocks.N.attn2`` (cross) | text | projections; padded text gets the −10000 bias (p = 0) |

Every recorder wraps the module's own processor and runs it unchanged: q and k are read by forward hooks on the
modules the processor calls (its projections or q/k norms), FLUX's rotary embedding is applied to them by diffusers'
own `apply_rotary_emb` with the `image_rotary_emb` of the call, so what the model computes does not change.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from difffeat.errors import UserError


# ------------------------------------------------------------------------------------------------ formula
def text_probs(q: torch.Tensor, k: torch.Tensor, text: slice, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask) over all keys k, its `text` columns, mean over heads.

    q: [B, H, N, d] (the image queries); k: [B, H, S, d]; mask: an additive bias broadcastable as
    [B|1, H|1, N|1, S] (`additive_mask`) → [B, N, T] float32. One head at a time, so that the [N, S] scores of all
    heads never exist at once."""
    heads, out = q.shape[1], None
    for h in range(heads):
        scores = q[:, h].float() @ k[:, h].float().transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask[:, h if mask.shape[1] > 1 else 0]
        p = scores.softmax(-1)[..., text]
        out = p if out is None else out + p
    return out / heads


def image_to_text_probs(q: torch.Tensor, k_image: torch.Tensor, k_text: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) over the concatenated keys [image; text], its text columns, mean over heads (SD3).

    q, k_image: [B, H, N, d]; k_text: [B, H, T, d] → [B, N, T] (float32)."""
    return text_probs(q, torch.cat([k_image, k_text], 2), slice(k_image.shape[2], None))


def additive_mask(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """An attention mask as scaled_dot_product_attention takes it (bool: True attends; float: added; [B, S] as
    diffusers' dispatch widens it to [B, 1, 1, S]) → the float bias [B|1, H|1, N|1, S] of query rows `rows`."""
    if mask is None:
        return None
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    mask = mask[:, :, rows] if mask.shape[2] > 1 else mask
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H·d] projections → [B, H, S, d] heads, as diffusers' `Attention` processors view them (their q/k norms
    run on the heads: a 4-D tensor is already [B, H, S, d])."""
    return t if t.ndim == 4 else t.unflatten(-1, (heads, -1)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- recorders
@contextmanager
def outputs_of(sources: dict[str, torch.nn.Module]):
    """`{key: output}` of each source module's call inside the block (forward hooks, removed on exit)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, key=key: seen.__setitem__(key, out))
               for key, m in sources.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class HookedProbs:
    """A processor that runs the module's own processor `inner` unchanged and hands `on_probs` the [B, N, T]
    image→text probabilities (`probs`) of the q and k read from `sources` while it ran."""

    def __init__(self, inner, on_probs):
        self.inner, self.on_probs = inner, on_probs

    def sources(self, attn) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def probs(self, attn, seen: dict[str, torch.Tensor], call: dict) -> torch.Tensor:
        """From the hooked outputs `seen` and the processor call's arguments `call` (by the processor's names)."""
        raise NotImplementedError

    def __call__(self, attn, *args, **kwargs):
        call = inspect.signature(self.inner).bind(attn, *args, **kwargs).arguments
        sources = self.sources(attn)
        with outputs_of(sources) as seen:
            out = self.inner(attn, *args, **kwargs)
        if len(seen) != len(sources):  # e.g. fused qkv projections: the hooked modules never ran
            raise RuntimeError(f"attention probabilities: {type(self.inner).__name__} did not run "
                               f"{', '.join(k for k in sources if k not in seen)} projections")
        self.on_probs(self.probs(attn, seen, call))
        return out


def _normed(attn, norm: str, projection: str) -> torch.nn.Module:
    return getattr(attn, norm) if getattr(attn, norm, None) is not None else getattr(attn, projection)


class JointAttentionProbs(HookedProbs):
    """SD3's joint attention: image queries over the keys [image; text], q and k after the q/k norms where the module
    has them (`image_to_text_probs`)."""

    def sources(self, attn):
        return {"q": _normed(attn, "norm_q", "to_q"), "k": _normed(attn, "norm_k", "to_k"),
                "k_text": _normed(attn, "norm_added_k", "add_k_proj")}

    def probs(self, attn, seen, call):
        if call.get("encoder_hidden_states") is None:
            raise RuntimeError("joint attention probabilities: the module was called without text tokens")
        q, k, k_text = (heads_first(seen[key], attn.heads) for key in ("q", "k", "k_text"))
        return image_to_text_probs(q, k, k_text)


class CrossAttentionProbs(HookedProbs):
    """Cross-attention (PixArt's ``attn2``): image queries over the text keys alone, with the encoder mask prepared as
    `AttnProcessor2_0` prepares it (`Attention.prepare_attention_mask`, one row per head)."""

    def sources(self, attn):
        return {"q": _normed(attn, "norm_q", "to_q"), "k": _normed(attn, "norm_k", "to_k")}

    def probs(self, attn, seen, call):
        q, k = heads_first(seen["q"], attn.heads), heads_first(seen["k"], attn.heads)
        mask = call.get("attention_mask")
        if mask is not None:
            b, t = k.shape[0], k.shape[2]
            mask = attn.prepare_attention_mask(mask, t, b).view(b, attn.heads, -1, t)
        return text_probs(q, k, slice(None), additive_mask(mask, slice(None)))


FLUX_INPUTS = {"attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"}


class FluxAttentionProbs(HookedProbs):
    """FLUX's attention: q and k after the q/k norms, the sequence [text; image] rotated (RoPE) as the processor does,
    the image queries over every key. Double-stream modules read the two streams from their own projections;
    single-stream ones see one sequence whose last `image_tokens` are the image."""

    def __init__(self, inner, on_probs, image_tokens: int | None = None):
        extra = set(inspect.signature(inner).parameters) - FLUX_INPUTS - {"args", "kwargs"}
        if extra:  # FluxAttention passes a processor only the inputs its own signature names
            raise UserError(f"attention maps through {type(inner).__name__}: its inputs {', '.join(sorted(extra))} "
                            "would not reach it past the recorder (only FluxAttnProcessor's are known)")
        super().__init__(inner, on_probs)
        self.image_tokens = image_tokens

    def sources(self, attn):
        stream = {"q": attn.norm_q, "k": attn.norm_k}
        if attn.added_kv_proj_dim is None:
            return stream
        return {**stream, "q_text": attn.norm_added_q, "k_text": attn.norm_added_k}

    def probs(self, attn, seen, call):
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = seen["q"], seen["k"]  # [B, S, H, d]
        if "q_text" in seen:  # double stream: text first, as the processor concatenates them
            n_text = seen["q_text"].shape[1]
            q, k = torch.cat([seen["q_text"], q], 1), torch.cat([seen["k_text"], k], 1)
        elif self.image_tokens is None or not 0 < self.image_tokens < q.shape[1]:
            raise RuntimeError(f"single-stream attention probabilities: {q.shape[1]} tokens, image tokens "
                               f"{self.image_tokens} (give `probs_processor` the image token count)")
        else:
            n_text = q.shape[1] - self.image_tokens
        rope = call.get("image_rotary_emb")
        if rope is not None:
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        q, k = q.transpose(1, 2)[:, :, n_text:], k.transpose(1, 2)
        return text_probs(q, k, slice(0, n_text), additive_mask(call.get("attention_mask"), slice(n_text, None)))


def probs_processor(attn, on_probs, image_tokens: int | None = None):
    """The recording processor for the transformer attention module `attn` (`difffeat.extraction.capture.Capture`'s
    `probs_processor`): FLUX's (`image_tokens`: the image's share of a single-stream sequence), SD3's joint one, or
    the cross-attention one (PixArt)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    if isinstance(attn, FluxAttention):
        return FluxAttentionProbs(attn.processor, on_probs, image_tokens)
    if getattr(attn, "add_k_proj", None) is not None:
        return JointAttentionProbs(attn.processor, on_probs)
    return CrossAttentionProbs(attn.processor, on_probs)
