"""UNets (SD-1.x / 2.x, SDXL, the built-in mini): feature maps as the modules give them, CLIP prompts chunked into
windows rather than cut, SDXL's added conditions, DDPM noising, ``unet(z, t, text)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difffeat.errors import UserError
from difffeat.models.backbones.base import Backbone, register_backbone
from difffeat.models.maps import as_map, first_tensor


def single_encoder(pipe) -> bool:
    return not hasattr(pipe, "text_encoder_2")


def prompt_token_count(pipe, prompt: str) -> int:
    """Tokens of `prompt` without the start / end tokens."""
    return len(pipe.tokenizer(prompt, truncation=False, verbose=False).input_ids) - 2


@torch.no_grad()
def encode_windows(pipe, prompt: str) -> torch.Tensor:
    """A prompt longer than the text encoder's window as windows of `model_max_length - 2` tokens, each encoded
    with its own start / end tokens, concatenated along the sequence: [1, windows·T, D]."""
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


def sdxl_added_conditions(pipe, pooled: torch.Tensor, resolution: tuple[int, int]) -> dict:
    """SDXL's added conditions: pooled text embeddings and (original size, crop, target size) ids."""
    h, w = resolution
    unet = pipe.unet
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(pooled))
    return {"text_embeds": pooled.to(unet.device, unet.dtype), "time_ids": time_ids.to(unet.device, unet.dtype)}


def unet_conditions(unet, batch: int, latent_hw: tuple[int, int], device=None, dtype=None) -> dict:
    """Dummy-free conditioning *shapes* a UNet needs besides latents and timestep (SDXL's added conds)."""
    cfg = unet.config
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {"added_cond_kwargs": {"text_embeds": torch.zeros(batch, text_dim, device=device, dtype=dtype),
                                      "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}}
    return {}


@register_backbone
class UNetBackbone(Backbone):
    name = "unet"
    model_class = "UNet2DConditionModel"
    controlnet_class = "ControlNetModel"

    @classmethod
    def fits(cls, model) -> bool:
        return hasattr(model, "up_blocks") or super().fits(model)

    def trace_layers(self, latent_hw: tuple[int, int]) -> tuple[list[tuple[str, tuple[int, int, int]]], dict]:
        """Every module called once per forward whose output is a feature map ([B, C, h, w]) or a token sequence
        over the latent grid ([B, h·w, C]: transformer blocks), with its [C, h, w] shape. Modules called several
        times per forward (shared activations) are left out: a hook on them would not name one place."""
        unet = self.model
        with torch.device("meta"):
            ghost = type(unet).from_config(unet.config)
        ghost.eval()
        calls: dict[str, int] = {}
        order: list[tuple[str, tuple[int, int, int]]] = []

        def make_hook(name: str) -> Callable:
            def hook(module, args, output):
                calls[name] = calls.get(name, 0) + 1
                t = first_tensor(output)
                fmap = as_map(t, latent_hw) if t is not None else None
                if fmap is not None and calls[name] == 1:
                    order.append((name, tuple(int(s) for s in fmap.shape[1:])))

            return hook

        handles = [module.register_forward_hook(make_hook(name)) for name, module in ghost.named_modules() if name]
        try:
            with torch.device("meta"), torch.no_grad():
                args, kwargs = self.dummy_call(latent_hw, model=ghost)
                ghost(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return [(name, shape) for name, shape in order if calls[name] == 1], {}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[list[torch.Tensor], dict | None]:
        """Per prompt a [T_i, D] embedding (T_i a multiple of the window), plus SDXL's pooled embeddings. Prompts that
        fit use the pipeline's own `encode_prompt`; longer ones are chunked into windows (`encode_windows`)."""
        pipe = self.pipe
        device = pipe.unet.device
        if not single_encoder(pipe):
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
                out[p] = encode_windows(pipe, p)[0]
        return [out[p] for p in prompts], None

    def call_conditions(self, added: dict | None, resolution: tuple[int, int]) -> dict | None:
        """SDXL's added conditions from its pooled embeddings (None for a single-encoder model)."""
        return None if added is None else sdxl_added_conditions(self.pipe, added["text_embeds"], resolution)

    def call(self, z: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, added: dict | None,
             sigma: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return (z, t), kwargs

    def control_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return args[0], args[1]

    def dummy_call(self, latent_hw: tuple[int, int], text_tokens: int = 77, model=None
                   ) -> tuple[tuple, dict[str, Any]]:
        model = model if model is not None else self.model
        cross = model.config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (tuple, list)) else cross
        x = torch.zeros(1, model.config.in_channels, *latent_hw)
        return (x, torch.tensor([1]), torch.zeros(1, text_tokens, cross)), unet_conditions(model, 1, latent_hw)
