"""What the diffusion transformers (SD3, PixArt, FLUX) share: blocks produce token sequences, not maps, and a
joint-attention block returns two streams, ``(text tokens, image tokens)``. Modules are hooked by name like a UNet's;
a module's output becomes a ``[B, C, h, w]`` map from its image tokens (found by their count, which the shape trace
makes differ from the text's), laid back on the patch grid (latent size / patch size, any aspect ratio).

`--t` keeps its meaning, an integer in [0, 1000) from nearly clean to pure noise; on a flow-matching scheduler
(SD3, FLUX) it maps to the σ of the scheduler's own training table (`Backbone.sigma_of_t`). DiTF's fixes are layer
options (``NAME:remod``, ``NAME:massive=zero|clip``): `difffeat.models.ditf`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from difffeat.errors import UserError
from difffeat.models.backbones.base import Backbone
from difffeat.models.maps import as_map, first_tensor


def max_sequence_length(pipe) -> int | None:
    """The T5 token count to encode with: the model's own when it records one (mini-dit: 0), else the pipeline's
    default."""
    return vars(pipe).get("difffeat_max_sequence_length")


class TransformerBackbone(Backbone):
    """The shared part of the diffusion transformers; a family sets `model_class` and its prompts and call."""

    def patch_size(self) -> int:
        """Latent cells per token along a side."""
        return int(self.model.config.patch_size)

    def max_sequence_length(self) -> int | None:
        return max_sequence_length(self.pipe)

    def check_image_size(self, height: int, width: int) -> None:
        step = self.vae_factor() * self.patch_size()
        if height % step or width % step or height <= 0 or width <= 0:
            near = lambda v: sorted({max(step, v // step * step), max(step, -(-v // step) * step)})
            raise UserError(f"image size {height}×{width}: a {type(self.model).__name__} needs height and width "
                            f"multiples of {step} (VAE factor {self.vae_factor()} × patch {self.patch_size()}); "
                            f"nearest valid: height {' or '.join(map(str, near(height)))}, "
                            f"width {' or '.join(map(str, near(width)))}")

    # ------------------------------------------------------------------------------------------- layers
    def trace_layers(self, latent_hw: tuple[int, int]) -> tuple[list[tuple[str, tuple[int, int, int]]], dict]:
        """Every module called once per forward whose output holds the image tokens, with its [C, h, w] shape and,
        for tuple outputs, which element holds them; from one forward of a copy on the meta device (no memory)."""
        model = self.model
        p = self.patch_size()
        n_image = (latent_hw[0] // p) * (latent_hw[1] // p)
        text_tokens = 7 if n_image != 7 else 9  # never the image token count: the two streams cannot be confused
        with torch.device("meta"):
            ghost = type(model).from_config(model.config)
        ghost.eval()
        calls: dict[str, int] = {}
        order: list[tuple[str, tuple[int, int, int]]] = []
        index: dict[str, int | None] = {}

        def make_hook(name: str) -> Callable:
            def hook(module, args, output):
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:
                    return
                candidates = [(None, first_tensor(output))] if not isinstance(output, (tuple, list)) else \
                    [(i, o) for i, o in enumerate(output) if isinstance(o, torch.Tensor)]
                for i, t in candidates:
                    if t is not None and ((t.ndim == 3 and t.shape[1] == n_image) or t.ndim == 4):
                        fmap = as_map(t, latent_hw)
                        if fmap is not None:
                            order.append((name, tuple(int(s) for s in fmap.shape[1:])))
                            index[name] = i
                            return

            return hook

        handles = [m.register_forward_hook(make_hook(n)) for n, m in ghost.named_modules() if n]
        try:
            with torch.device("meta"), torch.no_grad():
                args, kwargs = self.dummy_call(latent_hw, text_tokens, model=ghost)
                ghost(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        listed = [(n, s) for n, s in order if calls[n] == 1]
        return listed, {n: index[n] for n, _ in listed}

    def token_index(self, height: int | None = None, width: int | None = None) -> dict[str, int | None]:
        """Per listed module, which element of its output tuple holds the image tokens (None: the output itself)."""
        self.list_layers(height, width)
        return dict(vars(self.model)["difffeat_layer_shapes"][self.latent_size(height, width)][1])

    def feature_maps(self, layers: Sequence[str], latent_hw: tuple[int, int], resolution: tuple[int, int]):
        """Image tokens on the patch grid with the DiTF options applied (`difffeat.models.ditf.TokenMaps`, a context
        that records each block's modulation while `remod` layers are requested)."""
        from difffeat.models.ditf import TokenMaps

        return TokenMaps(self.model, list(layers), self.token_index(*resolution), latent_hw)

    # ---------------------------------------------------------------------------------------- attention
    def text_attention_modules(self) -> tuple[list[str], str] | None:
        """The joint (text–image) attention modules: those with text-key projections (`add_k_proj`)."""
        return [n for n, m in self.model.named_modules()
                if hasattr(m, "processor") and getattr(m, "add_k_proj", None) is not None], "joint attention"

    def attention_recorder(self, latent_hw: tuple[int, int]):
        """`difffeat.models.dit_attention.probs_processor` with this latent size's image token count bound."""
        from difffeat.models.dit_attention import probs_processor

        p = self.patch_size()
        return functools.partial(probs_processor, image_tokens=(latent_hw[0] // p) * (latent_hw[1] // p))

    # --------------------------------------------------------------------------------------------- call
    def sigmas(self, t: torch.Tensor, latent_hw: tuple[int, int], sigma, device) -> torch.Tensor | None:
        """A flow-matching call's noise levels [B]: `sigma` when a sampler gives its own, else σ(t) of the training
        table; None for a DDPM-family scheduler."""
        if not self.flow_matching:
            return None
        if sigma is None:
            return torch.tensor([self.sigma_of_t(int(v), latent_hw) for v in t.tolist()], device=device)
        return torch.as_tensor(sigma, device=device).float().expand(len(t))

    def control_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return kwargs["hidden_states"], kwargs["timestep"]
