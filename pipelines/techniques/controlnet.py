"""ControlNet: residuals from a diffusers ControlNetModel added to the UNet's skip connections.

`controlnet:MODEL,scale=1.0,control=canny`: MODEL is `canny` (the built-in canny ControlNet for the
model's architecture: the shipped mini one for mini, the public canny ControlNets for SD-1.x / 2.x / XL),
a local diffusers folder, or a Hub id. The control image is computed per image (`control=canny`, OpenCV
thresholds `low` / `high`, 100 / 200 as in the content-shift paper) or read from a folder of per-image maps
(`control=DIR`: depth, segmentation maps, …, matched to images by key with any image suffix). Several
ControlNets at once add their residuals, each times its scale (as diffusers' MultiControlNet does).

A loaded ControlNet is kept on the pipeline it was loaded for (`difffeat.conditioning.pipe_cache`), keyed by
source, device and dtype: stacks of one pipeline share it, and it is freed with the pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difffeat.conditioning import pipe_cache
from difffeat.errors import UserError
from pipelines.base import MissingInput, Technique, register_technique

MAP_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The canny ControlNet that fits each architecture, by the UNet's cross-attention width.
PUBLIC_CANNY = {768: "lllyasviel/sd-controlnet-canny", 1024: "thibaud/controlnet-sd21-canny-diffusers",
                2048: "diffusers/controlnet-canny-sdxl-1.0"}


class MissingControlMap(MissingInput):
    """An image has no map in the control folder; its run skips the image."""


def mini_canny_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("difffeat.zoo") / "weights" / "mini-controlnet-canny"))


def _load_controlnet(source: str):
    from diffusers import ControlNetModel

    path = Path(os.path.expanduser(source))
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{path}: not a diffusers ControlNet folder (no config.json)")
        return ControlNetModel.from_pretrained(path, local_files_only=True)
    from difffeat.zoo.registry import from_hub_model

    return from_hub_model(ControlNetModel, source)


def check_compatible(controlnet, unet, vae_factor: int, where: str) -> None:
    """Refuse a ControlNet whose residuals cannot be added to this UNet, saying which shapes differ."""
    c, u = controlnet.config, unet.config
    problems = []
    if tuple(c.block_out_channels) != tuple(u.block_out_channels[: len(c.block_out_channels)]):
        problems.append(f"block widths {tuple(c.block_out_channels)} vs the UNet's {tuple(u.block_out_channels)}")
    if c.layers_per_block != u.layers_per_block:
        problems.append(f"layers per block {c.layers_per_block} vs {u.layers_per_block}")
    if c.cross_attention_dim != u.cross_attention_dim:
        problems.append(f"text width {c.cross_attention_dim} vs {u.cross_attention_dim}")
    if c.in_channels != u.in_channels:
        problems.append(f"latent channels {c.in_channels} vs {u.in_channels}")
    stride = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if stride != vae_factor:
        problems.append(f"control-image stride {stride} vs the VAE's {vae_factor}")
    if problems:
        raise UserError(f"ControlNet {where} does not fit this model's UNet: " + "; ".join(problems))


@register_technique
@dataclass
class ControlNet(Technique):
    """ControlNet residuals from canny maps of each image or from a folder of per-image control maps."""

    name = "controlnet"
    positional = "model"

    model: str = "canny"
    scale: float = 1.0
    control: str = "canny"  # "canny", or a folder of per-image control maps
    low: int = 100
    high: int = 200

    def __post_init__(self):
        if not self.model.strip():
            raise ValueError("no model: give canny, a diffusers folder or a Hub id (controlnet:canny)")
        if not -float("inf") < self.scale < float("inf"):
            raise ValueError(f"scale must be a finite number, got {self.scale}")
        if not 0 <= self.low <= self.high:  # OpenCV swaps them silently, which hides the slip
            raise ValueError(f"canny thresholds need 0 ≤ low ≤ high, got low={self.low}, high={self.high}")

    def resolve_model(self, pipe) -> str:
        if self.model != "canny":
            return self.model
        from difffeat.layers import vae_scale_factor

        mini = mini_canny_dir()
        if (mini / "config.json").exists():
            import json

            cfg = json.loads((mini / "config.json").read_text())
            u = pipe.unet.config
            if (tuple(cfg["block_out_channels"]) == tuple(u.block_out_channels)
                    and cfg["cross_attention_dim"] == u.cross_attention_dim and vae_scale_factor(pipe) == 4):
                return str(mini)
        width = pipe.unet.config.cross_attention_dim
        if width not in PUBLIC_CANNY:
            raise UserError(f"no built-in canny ControlNet for a UNet with text width {width}; "
                            "pass controlnet:PATH_OR_HUB_ID")
        return PUBLIC_CANNY[width]

    def bind(self, pipe) -> torch.nn.Module:
        """The ControlNet module for `pipe` (loaded once per pipeline, source, device and dtype)."""
        from difffeat.layers import vae_scale_factor

        source = self.resolve_model(pipe)
        loaded = pipe_cache(pipe, "controlnets")
        cache_key = (source, str(pipe.unet.device), str(pipe.unet.dtype))
        if cache_key not in loaded:
            net = _load_controlnet(source)
            check_compatible(net, pipe.unet, vae_scale_factor(pipe), source)
            device, dtype = pipe.unet.device, pipe.unet.dtype
            net = net.to(device) if net.dtype == dtype else net.to(device, dtype)
            loaded[cache_key] = net.eval().requires_grad_(False)
        if self.control != "canny" and not Path(self.control).is_dir():
            raise UserError(f"controlnet control={self.control!r}: not 'canny' and not a folder of control maps")
        return loaded[cache_key]

    # ---------------------------------------------------------------------------------- control images
    def map_path(self, key: str) -> Path | None:
        stem = Path(self.control) / Path(key).with_suffix("")
        for suffix in MAP_SUFFIXES:
            if (p := stem.with_suffix(suffix)).exists():
                return p
        return None

    def missing(self, key: str) -> str | None:
        """Why `key` cannot be controlled (no map in the control folder), or None."""
        if self.control == "canny" or self.map_path(key) is not None:
            return None
        return f"no control map for it in {self.control}"

    def control_images(self, images: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """[B, 3, H, W] control images in [0, 1] for images [B, 3, H, W] in [0, 1]."""
        if self.control == "canny":
            from pipelines.canny import canny_tensor

            return canny_tensor(images, self.low, self.high)
        from difffeat.data.images import load_image, resize_image, to_rgb, to_tensor

        maps = []
        for key in keys:
            path = self.map_path(key)
            if path is None:
                raise MissingControlMap(f"{key}: {self.missing(key)}")
            maps.append(resize_image(to_rgb(load_image(path)), tuple(images.shape[-2:]), "stretch"))
        return to_tensor(maps)

    def residuals(self, loaded, z, t, embeds, control, added_cond_kwargs=None):
        """(down residuals, mid residual) of the ControlNet `loaded` (what `bind` returned) for latents z at t."""
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
        return loaded(z, t, encoder_hidden_states=embeds, controlnet_cond=control.to(z),
                        conditioning_scale=self.scale, return_dict=False, **kwargs)
