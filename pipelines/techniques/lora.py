"""LoRA: low-rank weight deltas on the UNet (and text encoder), loaded with diffusers' LoRA loader (peft); on a
diffusion transformer (SD3), diffusers-format LoRAs of the transformer only.

`lora:PATH,scale=0.8`: PATH is a file or folder in diffusers format (what `difffeat lora train` writes), a
kohya / A1111 file (diffusers converts its keys), or a peft `save_pretrained` adapter folder. Before
loading, every LoRA matrix is checked against the module it targets, so a file made for another
architecture is refused naming the keys that do not fit, instead of failing deep in peft or, worse,
loading half of it.

Loading happens once per pipeline and file (a named adapter); the stack switches adapters and scales
(`pipelines.stack.activate_adapters`), so variants with and without a LoRA share one pipeline and never reload.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from pipelines.base import Technique, register_technique

# (pattern, matrix): the LoRA key layouts diffusers produces from diffusers, peft and kohya files; group 1 is
# the target module's path (after the component prefix), `to_out` of the old processor layout being `to_out.0`.
_LAYOUTS = [
    (re.compile(r"^(.*)\.lora_A(?:\.[\w-]+)?\.weight$"), "A"),
    (re.compile(r"^(.*)\.lora_B(?:\.[\w-]+)?\.weight$"), "B"),
    (re.compile(r"^(.*)\.processor\.(to_[qkv]|to_out)_lora\.down\.weight$"), "A"),
    (re.compile(r"^(.*)\.processor\.(to_[qkv]|to_out)_lora\.up\.weight$"), "B"),
    (re.compile(r"^(.*)\.lora[._]down\.weight$"), "A"),
    (re.compile(r"^(.*)\.lora[._]up\.weight$"), "B"),
]


def _target(key: str) -> tuple[str, str] | None:
    """(module path with its component prefix, "A" or "B") of a LoRA matrix key; None for other keys."""
    for pattern, matrix in _LAYOUTS:
        if m := pattern.match(key):
            path = m.group(1)
            if m.lastindex == 2:
                path += "." + ("to_out.0" if m.group(2) == "to_out" else m.group(2))
            return path, matrix
    return None


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
    roots = {"unet": getattr(pipe, "unet", None), "transformer": getattr(pipe, "transformer", None),
             "text_encoder": getattr(pipe, "text_encoder", None),
             "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    bad = []
    for key, tensor in state_dict.items():
        target = _target(key)
        if target is None:
            continue  # alphas, DoRA magnitudes …: checked by peft itself
        prefix, _, path = target[0].partition(".")
        root = roots.get(prefix)
        module = _find_module(root, path) if root is not None else None
        io = _io(module) if module is not None else None
        if io is None:
            bad.append(f"{key} (no such module)")
            continue
        size_in, size_out = io
        got = tensor.shape[1] if target[1] == "A" else tensor.shape[0]
        want = size_in if target[1] == "A" else size_out
        if got != want:
            bad.append(f"{key} ({got} vs the model's {want})")
    return bad


def peft_folder_state_dict(pipe, folder: Path) -> dict:
    """A peft `save_pretrained` folder (adapter_config.json + adapter_model.safetensors) as a diffusers LoRA state
    dict: keys get the component prefix (the UNet, or the text encoder when the keys fit it), and lora_B is scaled
    by alpha / r, since diffusers reads such dicts with alpha = r."""
    import json

    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise UserError(f"{folder}: a peft adapter folder without adapter_model.safetensors")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{folder}: peft adapters with per-module ranks or alphas are not supported")
    scale = float(config.get("lora_alpha", config["r"])) / float(config["r"])
    raw = {k.removeprefix("base_model.model."): v * scale if ".lora_B" in k else v
           for k, v in load_file(str(weights)).items()}
    for component in ("unet", "text_encoder"):
        state = {f"{component}.{k}": v for k, v in raw.items()}
        if getattr(pipe, component, None) is not None and not mismatched_keys(pipe, state):
            return state
    return {f"unet.{k}": v for k, v in raw.items()}  # mismatched: refused with the UNet's names


def adapter_name(path: str) -> str:
    return "difffeat_" + hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]


@register_technique
@dataclass
class LoRA(Technique):
    """LoRA weights (diffusers, peft or kohya file or folder) applied at a scale."""

    name = "lora"
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
        from difffeat import dit

        transformer = dit.is_transformer(pipe)
        if transformer and dit.family(dit.denoiser(pipe)) != "sd3":  # loaded and tested on SD3 only
            raise UserError(f"technique {self.spec!r} does not run on {type(dit.denoiser(pipe)).__name__} yet; "
                            "on transformers LoRA runs on SD3 (SD3Transformer2DModel) only")
        path = os.path.expanduser(self.path)
        if not Path(path).exists():
            raise UserError(f"{path}: LoRA file or folder not found")
        if transformer and (Path(path) / "adapter_config.json").exists():  # peft folders: UNet / CLIP keys only
            raise UserError(f"{path}: peft adapter folders are not supported on transformer backbones; save the LoRA "
                            "in diffusers format (save_lora_weights)")
        loaded = set(sum((v for v in pipe.get_list_adapters().values()), [])) if hasattr(pipe, "get_list_adapters") \
            else set()
        if self.adapter in loaded:
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise UserError(f"{type(pipe).__name__} cannot load LoRA weights")
        source = peft_folder_state_dict(pipe, Path(path)) if (Path(path) / "adapter_config.json").exists() else path
        try:
            state = source if isinstance(source, dict) else pipe.lora_state_dict(path)
            state = state[0] if isinstance(state, tuple) else state  # UNet loaders also return network alphas
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"{path}: not a LoRA file diffusers can read ({str(e).splitlines()[0][:160]})") from None
        if transformer:  # diffusers-format transformer LoRAs only (kohya and text-encoder LoRAs: not yet)
            other = [k for k in state if not k.startswith("transformer.")]
            if other or not state:
                raise UserError(f"{path}: on transformer backbones only diffusers-format LoRAs of the transformer "
                                f"(keys 'transformer.…') are supported, not {other[0] if other else 'an empty file'!r}")
        bad = mismatched_keys(pipe, state)
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise UserError(f"{path}: LoRA made for another architecture; {len(bad)} of {len(state)} keys do not "
                            f"fit this model: {'; '.join(bad[:5])}{more}")
        pipe.load_lora_weights(source, adapter_name=self.adapter)

    def weights(self) -> tuple[str, float]:
        return self.adapter, self.scale

