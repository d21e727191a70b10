"""LoRA: low-rank weight deltas on the UNet (and text encoder), loaded with diffusers' LoRA loader (peft); on a
diffusion transformer, LoRAs of the transformer (and on FLUX of its CLIP text encoder).

`lora:PATH,scale=0.8`: PATH is a file or folder in diffusers format (what `difffeat lora train` writes), a
kohya / A1111 file (diffusers converts its keys), or a peft `save_pretrained` adapter folder. Before
loading, every LoRA matrix is checked against the module it targets, so a file made for another
architecture is refused naming the keys that do not fit, instead of failing deep in peft or, worse,
loading half of it.

On transformers: SD3 and FLUX load through their pipeline's `load_lora_weights` (diffusers-format files and peft
folders; on FLUX also kohya files of the transformer, which diffusers converts, and diffusers-format LoRAs of the
CLIP text encoder). PixArt's pipeline has
no LoRA loader: its diffusers-format files and peft folders (what PixArt-Σ's LoRA training writes) go into the
transformer with peft directly (`inject`), alpha / r folded into lora_B.

Loading happens once per pipeline and file (a named adapter); the stack switches adapters and scales
(`pipelines.stack.activate_adapters`), so variants with and without a LoRA share one pipeline and never reload.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
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
# Key prefixes of the diffusers-format LoRAs each transformer family loads: diffusers' FLUX loader also takes its
# CLIP text encoder (not T5); SD3's text-encoder LoRAs are not tested here yet.
TRANSFORMER_PREFIXES = {"sd3": ("transformer.",), "flux": ("transformer.", "text_encoder."),
                        "pixart": ("transformer.",)}
# A kohya (sd-scripts) FLUX file that diffusers' converter maps in full: LoRA pairs and alphas of the transformer
# only. It drops DoRA scales, T5 and norm "diff" keys with a log line, which would load part of the file.
_KOHYA_FLUX_KEY = re.compile(r"^lora_unet_\w+\.(?:lora_down\.weight|lora_up\.weight|alpha)$")


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
    dict: keys get the component prefix (the UNet or transformer, or the text encoder when the keys fit it), and
    lora_B is scaled by alpha / r, since diffusers reads such dicts with alpha = r."""
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
    for component in ("unet", "transformer", "text_encoder"):
        state = {f"{component}.{k}": v for k, v in raw.items()}
        if getattr(pipe, component, None) is not None and not mismatched_keys(pipe, state):
            return state
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    return {f"{denoiser}.{k}": v for k, v in raw.items()}  # mismatched: refused with the denoiser's names


def lora_file(path: Path) -> Path | None:
    """The safetensors file diffusers reads for `path` (a folder: its pytorch_lora_weights.safetensors, or its one
    .safetensors file); None when there is none."""
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    files = [path / "pytorch_lora_weights.safetensors"] if (path / "pytorch_lora_weights.safetensors").exists() \
        else sorted(path.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def check_transformer_format(path: Path, family: str, kohya: bool = False) -> None:
    """Refuse, before diffusers reads it, a LoRA file that would load only in part or not per stack on a `family`
    transformer: DoRA scales (diffusers drops them), keys other than the family's diffusers-format prefixes, or on
    FLUX a kohya file with more than LoRA pairs and alphas, or another FLUX format (XLabs, BFL Control LoRAs, whose
    norm weights diffusers writes into the transformer itself). `kohya`: the family's loader converts kohya files
    (the backbone's `converts_kohya_lora`: FLUX)."""
    from safetensors import safe_open

    file = lora_file(path)
    if file is None:
        return  # a .bin file: checked after diffusers read it
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    if dora := next((k for k in keys if "dora_scale" in k), None):
        raise UserError(f"{path}: a DoRA file ({dora!r}); diffusers drops its magnitudes and would load a plain LoRA")
    if kohya and any(k.endswith(".lora_down.weight") for k in keys):  # kohya: diffusers converts it
        if te := next((k for k in keys if k.startswith("lora_te")), None):  # to old-style keys (to_q_lora.down)
            raise UserError(f"{path}: kohya text-encoder LoRAs ({te!r}) are not supported on FLUX: diffusers' "
                            "converter gives keys its own text-encoder loader cannot always read")
        if odd := next((k for k in keys if not _KOHYA_FLUX_KEY.match(k)), None):
            raise UserError(f"{path}: {odd!r} is not a LoRA pair or alpha of a kohya (sd-scripts) FLUX file; "
                            "diffusers' converter would drop it")
        return
    if odd := next((k for k in keys if not k.startswith(TRANSFORMER_PREFIXES[family])), None):
        raise UserError(f"{path}: on transformer backbones ({family}) only diffusers-format LoRAs of the transformer "
                        f"(keys {', '.join(p + '…' for p in TRANSFORMER_PREFIXES[family])})"
                        f"{', kohya files' if kohya else ''} and peft folders "
                        f"are supported, not {odd!r}")


def diffusers_file_state_dict(path: Path) -> dict:
    """A diffusers-format LoRA file (or folder) as a state dict with lora_B scaled by alpha / r, alpha and r from
    the file's adapter metadata per component (as `save_lora_weights` writes them; none: alpha = r)."""
    from safetensors import safe_open

    file = lora_file(path)
    if file is None:
        raise UserError(f"{path}: no LoRA .safetensors file (pytorch_lora_weights.safetensors) there")
    with safe_open(str(file), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    out = {}
    for key, tensor in state.items():
        component = key.partition(".")[0]
        if meta.get(f"{component}.rank_pattern") or meta.get(f"{component}.alpha_pattern") \
                or meta.get(f"{component}.use_dora"):
            raise UserError(f"{path}: LoRAs with per-module ranks or alphas, or DoRA, are not supported here")
        r = meta.get(f"{component}.r")
        scale = float(meta.get(f"{component}.lora_alpha", r)) / float(r) if r else 1.0
        out[key] = tensor * scale if ".lora_B." in key else tensor
    return out


def inject(model, state: dict, adapter: str) -> None:
    """Put a LoRA state dict ({module path}.lora_A / lora_B.weight, alpha / r already in lora_B) into `model` as
    peft adapter `adapter`, for a model without diffusers' LoRA loader (PixArt's transformer). Lower ranks are
    padded with zeros to the highest (B·A unchanged), since peft's per-module rank patterns match by suffix."""
    import torch.nn.functional as F
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    r = max(v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight"))
    state = {k: F.pad(v, (0, 0, 0, r - v.shape[0])) if ".lora_A." in k else F.pad(v, (0, r - v.shape[1]))
             for k, v in state.items()}
    targets = sorted(k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight"))
    config = LoraConfig(r=r, lora_alpha=r, target_modules=targets)
    with warnings.catch_warnings():  # several adapters in one model are what the stack switches between
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=adapter)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"peft did not load {len(result.unexpected_keys)} LoRA keys, e.g. {result.unexpected_keys[0]}")


def injected_adapters(model) -> set[str]:
    """Names of the LoRA adapters `inject` put into `model`."""
    from peft.tuners.lora import LoraLayer

    return {name for m in model.modules() if isinstance(m, LoraLayer) for name in m.lora_A}


def activate_injected(model, adapters: list[tuple[str, float]]) -> None:
    """Make exactly `adapters` ((name, scale) pairs) of `model`'s injected ones active, as diffusers' `set_adapters`
    and `enable_lora` / `disable_lora` do on models with its loader."""
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    if not getattr(model, "peft_config", None) or not injected_adapters(model):  # peft sets peft_config
        return
    set_adapter_layers(model, enabled=bool(adapters))
    if adapters:
        set_weights_and_activate_adapters(model, [name for name, _ in adapters], [scale for _, scale in adapters])


def loaded_adapters(pipe) -> set[str]:
    """Names of the LoRA adapters loaded into `pipe` (by diffusers' loader, or by `inject` on PixArt)."""
    if hasattr(pipe, "get_list_adapters"):
        return set(sum((v for v in pipe.get_list_adapters().values()), []))
    from difffeat.models.backbones import backbone_for

    return injected_adapters(backbone_for(pipe).model)


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
        from difffeat.models.backbones import backbone_for

        backbone = backbone_for(pipe)
        # The transformer families whose LoRA keys are checked against their diffusers-format prefixes (a UNet's
        # loader takes every format it knows).
        family = backbone.name if backbone.name in TRANSFORMER_PREFIXES else None
        path = os.path.expanduser(self.path)
        if not Path(path).exists():
            raise UserError(f"{path}: LoRA file or folder not found")
        folder = (Path(path) / "adapter_config.json").exists()
        if self.adapter in loaded_adapters(pipe):
            return
        if backbone.injects_lora:  # no LoRA loader in its pipeline (PixArt): peft on the transformer itself
            state = peft_folder_state_dict(pipe, Path(path)) if folder else diffusers_file_state_dict(Path(path))
            if odd := next((k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))), None):
                raise UserError(f"{path}: on PixArt only plain LoRA pairs (….lora_A.weight / ….lora_B.weight) of "
                                f"diffusers-format files and peft folders load, not {odd!r}")
            self._check(path, state, family, pipe)
            inject(backbone.model, {k.removeprefix("transformer."): v for k, v in state.items()}, self.adapter)
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise UserError(f"{type(pipe).__name__} cannot load LoRA weights")
        if family and not folder:
            check_transformer_format(Path(path), family, kohya=backbone.converts_kohya_lora)
        source = peft_folder_state_dict(pipe, Path(path)) if folder else path
        try:
            state = source if isinstance(source, dict) else pipe.lora_state_dict(path)
            state = state[0] if isinstance(state, tuple) else state  # UNet loaders also return network alphas
        except (ValueError, OSError, KeyError, AssertionError) as e:  # FLUX's kohya converter asserts FLUX.1's widths
            why = str(e).splitlines()[0][:160] if str(e).strip() else f"{type(e).__name__} in diffusers' converter"
            raise UserError(f"{path}: not a LoRA file diffusers can read ({why})") from None
        self._check(path, state, family, pipe)
        pipe.load_lora_weights(source, adapter_name=self.adapter)

    @staticmethod
    def _check(path: str, state: dict, family: str | None, pipe) -> None:
        """Refuse a LoRA state dict (as diffusers reads the file) that would not load in full into `pipe`."""
        if family:  # keys outside the components this family loads would be dropped without a word
            other = [k for k in state if not k.startswith(TRANSFORMER_PREFIXES[family])]
            if not state:
                raise UserError(f"{path}: no LoRA weights in it")
            if other:
                raise UserError(f"{path}: {other[0]!r} (of {len(other)} such keys) is outside what LoRAs load into on "
                                f"{family} (keys {', '.join(p + '…' for p in TRANSFORMER_PREFIXES[family])}), so it "
                                "would not load")
            if norm := next((k for k in state if "lora" not in k), None):  # FLUX Control LoRAs' norm_q, …
                raise UserError(f"{path}: {norm!r} is not a LoRA matrix; diffusers would write it into the model's own "
                                "weights, not per stack")
        bad = mismatched_keys(pipe, state)
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise UserError(f"{path}: LoRA made for another architecture; {len(bad)} of {len(state)} keys do not "
                            f"fit this model: {'; '.join(bad[:5])}{more}")

    def weights(self) -> tuple[str, float]:
        return self.adapter, self.scale

