"""LoRA: low-rank weight deltas on the UNet (and text encoder), loaded with diffusers' LoRA loader (peft).

`lora:PATH,scale=0.8`: PATH is a folder or file in diffusers, peft or kohya format (diffusers converts
kohya / A1111 keys), such as `difffeat lora train` writes. Before loading, every LoRA matrix is checked
against the module it targets, so a file made for another architecture is refused naming the keys that do
not fit, instead of failing deep in peft or, worse, loading half of it.

Loading happens once per pipeline and file (a named adapter); `activate` switches adapters and scales,
so variants with and without a LoRA share one pipeline and never reload.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from pipelines.base import Technique, register_technique

_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B",
             ".lora_down.weight": "A", ".lora_up.weight": "B"}


def _find_module(root, path: str):
    modules = dict(root.named_modules())
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        if candidate in modules:
            return modules[candidate]
    return None


def _io(module) -> tuple[int, int] | None:
    if hasattr(module, "base_layer"):  # already wrapped by peft
        module = module.base_layer
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "in_channels"):
        return module.in_channels, module.out_channels
    return None


def mismatched_keys(pipe, state_dict: dict) -> list[str]:
    """LoRA keys whose target module is missing from `pipe` or whose matrix shape does not fit it."""
    roots = {"unet": pipe.unet, "text_encoder": getattr(pipe, "text_encoder", None),
             "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    bad = []
    for key, tensor in state_dict.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue  # alphas, DoRA magnitudes …: checked by peft itself
        prefix, _, path = key[: -len(suffix)].partition(".")
        root = roots.get(prefix)
        module = _find_module(root, path) if root is not None else None
        io = _io(module) if module is not None else None
        if io is None:
            bad.append(f"{key} (no such module)")
            continue
        size_in, size_out = io
        got = tensor.shape[1] if _SUFFIXES[suffix] == "A" else tensor.shape[0]
        want = size_in if _SUFFIXES[suffix] == "A" else size_out
        if got != want:
            bad.append(f"{key} ({got} vs the model's {want})")
    return bad


def adapter_name(path: str) -> str:
    return "difffeat_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]


@register_technique
@dataclass
class LoRA(Technique):
    """LoRA weights (diffusers, peft or kohya file or folder) applied at a scale."""

    name = "lora"
    kind = "weights"
    positional = "path"

    path: str = ""
    scale: float = 1.0

    def __post_init__(self):
        if not self.path:
            raise ValueError("lora needs a path: lora:PATH[,scale=1.0]")

    @property
    def adapter(self) -> str:
        return adapter_name(os.path.expanduser(self.path))

    def bind(self, pipe) -> None:
        path = os.path.expanduser(self.path)
        if not Path(path).exists():
            raise UserError(f"{path}: LoRA file or folder not found")
        loaded = set(sum((v for v in pipe.get_list_adapters().values()), [])) if hasattr(pipe, "get_list_adapters") \
            else set()
        if self.adapter in loaded:
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise UserError(f"{type(pipe).__name__} cannot load LoRA weights")
        try:
            state = pipe.lora_state_dict(path)[0]
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"{path}: not a LoRA file diffusers can read ({str(e).splitlines()[0][:160]})") from None
        bad = mismatched_keys(pipe, state)
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise UserError(f"{path}: LoRA made for another architecture; {len(bad)} of {len(state)} keys do not "
                            f"fit this model: {'; '.join(bad[:5])}{more}")
        pipe.load_lora_weights(path, adapter_name=self.adapter)


def activate(pipe, loras: list[LoRA]) -> None:
    """Make exactly `loras` active on `pipe` with their scales (none: every loaded adapter off)."""
    if not hasattr(pipe, "get_list_adapters") or not any(pipe.get_list_adapters().values()):
        return
    if not loras:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([lo.adapter for lo in loras], [lo.scale for lo in loras])
