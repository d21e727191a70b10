"""Capturing activations of named UNet modules with plain forward hooks, and cross-attention maps.

The UNet's own `forward` runs untouched (no copy, no patch): hooks record what the named modules
produce, and once every requested module has fired, the last hook raises `StopForward` so that the
rest of the UNet is skipped (early exit). Cross-attention probabilities come from a processor set on
the selected attention layers alone; every other layer keeps its fast processor (SDPA / xformers).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from difffeat.models.layers import as_map, first_tensor


class StopForward(Exception):
    """Raised by the capture hooks once everything requested has been recorded (early exit)."""


class AttentionProbsProcessor:
    """Wraps diffusers' classic `AttnProcessor` and records softmax(QKᵀ/√d) averaged over heads.

    It reuses diffusers' processor for the computation, intercepting only `get_attention_scores`, so
    outputs are those of the stock (non-fused) attention.
    """

    def __init__(self, on_probs):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner = AttnProcessor()
        self.on_probs = on_probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        original = attn.get_attention_scores

        def scores(query, key, mask=None):
            probs = original(query, key, mask)
            self.on_probs(probs.unflatten(0, (-1, attn.heads)).mean(1))  # [B, N, T]
            return probs

        attn.get_attention_scores = scores
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        finally:
            del attn.get_attention_scores  # back to the class's method


class Capture:
    """Records the outputs (or inputs) of named modules of one UNet during a forward pass.

    Use as a context manager around UNet calls; `.features` maps each name to a [B, C, h, w] tensor
    (token outputs reshaped to maps), and attention names `f"{name}:probs"` to [B, tokens, h, w] maps.
    """

    def __init__(self, unet, layers: list[str], latent_hw: tuple[int, int], inputs: bool = False,
                 attention: list[str] = (), early_exit: bool = True, to_map=None, probs_processor=None):
        self.unet = unet
        # The processor recording an attention module's maps, `probs_processor(module, on_probs)`: by default the
        # UNet's cross-attention one; a transformer passes `difffeat.models.attention_feature.probs_processor` (joint).
        self.probs_processor = probs_processor or (lambda attn, on_probs: AttentionProbsProcessor(on_probs))
        # How a hooked output becomes a map, `to_map(layer, output)`: by default the UNet rule below; a transformer
        # passes `difffeat.models.ditf.TokenMaps` (image tokens only, patch grid, DiTF options after a ":" in the name).
        self.to_map = to_map or self.default_map
        self.layers = list(layers)
        self.attention = list(attention)
        self.latent_hw = latent_hw
        self.inputs = inputs
        self.early_exit = early_exit
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        self._saved_processors = {}
        self._paused = False

    @property
    def wanted(self) -> list[str]:
        return self.layers + [f"{a}:probs" for a in self.attention]

    @contextmanager
    def paused(self):
        """UNet calls inside run to the end and record nothing (e.g. denoising steps before the feature pass)."""
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False

    def _record(self, name: str, fmap: torch.Tensor) -> None:
        if self._paused:
            return
        self.features[name] = fmap
        if self.early_exit and len(self.features) == len(self.wanted):
            raise StopForward

    def default_map(self, name: str, output) -> torch.Tensor | None:
        t = first_tensor(output)
        return as_map(t, self.latent_hw) if t is not None else None

    def _output_hook(self, name):
        def hook(module, args, output):
            fmap = self.to_map(name, output)
            if fmap is None:
                t = first_tensor(output)
                raise RuntimeError(f"layer {name}: output of shape {getattr(t, 'shape', None)} is not a feature map")
            self._record(name, fmap)

        return hook

    def _input_hook(self, name):
        def hook(module, args, kwargs):
            t = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
            fmap = as_map(t, self.latent_hw) if isinstance(t, torch.Tensor) else None
            if fmap is None:
                raise RuntimeError(f"layer {name}: input is not a feature map")
            self._record(name, fmap)

        return hook

    def _probs_callback(self, name):
        def record(probs: torch.Tensor):  # [B, N, T] → [B, T, h, w]
            self._record(f"{name}:probs", as_map(probs, self.latent_hw))

        return record

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        for name in self.layers:
            module = modules[name.split(":")[0]]  # options after ":" (DiTF's) change the map, not the module
            if self.inputs:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
        for name in self.attention:
            attn = modules[name]
            self._saved_processors[name] = attn.processor
            attn.set_processor(self.probs_processor(attn, self._probs_callback(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        modules = dict(self.unet.named_modules())
        for name, proc in self._saved_processors.items():
            modules[name].set_processor(proc)
        self._handles, self._saved_processors = [], {}
        return False

    def run(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """One UNet call; returns the captured maps (the forward stops early once all are captured)."""
        self.features = {}
        try:
            self.unet(*args, **kwargs)
        except StopForward:
            pass
        missing = [n for n in self.wanted if n not in self.features]
        if missing:
            raise RuntimeError(f"layers not reached by the forward pass: {', '.join(missing)}")
        return self.features
