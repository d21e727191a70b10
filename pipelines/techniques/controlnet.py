"""ControlNet: residuals from a diffusers ControlNetModel added to the UNet's skip connections, from an
SD3ControlNetModel added to an SD3 transformer's blocks (its `block_controlnet_hidden_states`), or from a
FluxControlNetModel added to a FLUX transformer's double- and single-stream blocks.

`controlnet:MODEL,scale=1.0,control=canny`: MODEL is `canny` (the built-in canny ControlNet for the
model's architecture: the shipped mini one for mini, the public canny ControlNets for SD-1.x / 2.x / XL),
a local diffusers folder, or a Hub id. The control image is computed per image (`control=canny`, OpenCV
thresholds `low` / `high`, 100 / 200 as in the content-shift paper) or read from a folder of per-image maps
(`control=DIR`: depth, segmentation maps, …, matched to images by key with any image suffix). Several
ControlNets at once add their residuals, each times its scale (as diffusers' MultiControlNet does).

An SD3 ControlNet takes its control image as VAE latents, as diffusers' StableDiffusion3ControlNetPipeline
feeds it (posterior mean here, so that features stay deterministic; without the VAE shift for ControlNets that
zero their pooled projection, InstantX's convention), and the transformer adds each block's residual after the
block: a hook on `transformer_blocks.N` sees N's output before N's own residual, the next block sees it. The
class in a folder's `config.json` must fit the backbone (a UNet ControlNet on a transformer, or back, is refused
naming both).

A FLUX ControlNet runs as diffusers' FluxControlNetPipeline runs it at one step: the control image VAE-encoded
(posterior mean), shifted, scaled and packed into 2×2 patches like FLUX's latents (InstantX style, no input hint
block), or in pixels (XLabs style, with an input hint block; its residuals repeat over the transformer's blocks),
and the ControlNet called with the transformer's own hidden states, timestep, guidance, text and ids. Union
ControlNets (a `controlnet_mode` per call) are refused.

A loaded ControlNet is kept on the pipeline it was loaded for (`difffeat.extraction.conditioning.pipe_cache`), keyed by
source, device and dtype: stacks of one pipeline share it, and it is freed with the pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difffeat.errors import UserError
from difffeat.extraction.conditioning import pipe_cache
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


# The ControlNet classes difffeat runs, by the backbone they fit.
FITS = {"ControlNetModel": "UNet2DConditionModel", "SD3ControlNetModel": "SD3Transformer2DModel",
        "FluxControlNetModel": "FluxTransformer2DModel"}
ONLY_SO_FAR = "ControlNets run on UNets, SD3 and FLUX transformers only so far"


def _controlnet_class(source: str, pipe) -> str:
    """The ControlNet class `source` needs: a folder's own (its `config.json`), else the one fitting the backbone;
    a UserError naming both classes when it does not fit the pipeline's backbone."""
    import json

    from difffeat.models.backbones import backbone_for

    fitting = backbone_for(pipe).controlnet_class  # the ControlNet class this pipeline's backbone takes
    backbone = type(backbone_for(pipe).model).__name__
    path = Path(os.path.expanduser(source))
    if path.exists():
        from difffeat.zoo.registry import check_trusted_folder

        check_trusted_folder(path)  # custom code or pickled weights: refused before anything is read from it
        if not (path / "config.json").exists():
            raise UserError(f"{path}: not a diffusers ControlNet folder (no config.json)")
        name = json.loads((path / "config.json").read_text()).get("_class_name", "ControlNetModel")
    else:  # a Hub id: the class that fits the backbone
        name = fitting
        if name is None:
            raise UserError(f"ControlNet {source}: {ONLY_SO_FAR}, not on this model's {backbone}")
    if name not in FITS:
        runs = [f"{c} (on a {b})" for c, b in FITS.items()]
        raise UserError(f"ControlNet {source} is a {name}; difffeat runs {', '.join(runs[:-1])} and {runs[-1]}")
    if name != fitting:
        raise UserError(f"ControlNet {source} is a {name}, made for a {FITS[name]}, but this model's backbone is a "
                        f"{backbone}" + ("" if backbone in FITS.values() else f"; {ONLY_SO_FAR}"))
    return name


def _load_controlnet(source: str, cls_name: str = "ControlNetModel"):
    import diffusers

    cls = getattr(diffusers, cls_name)
    path = Path(os.path.expanduser(source))
    if path.exists():
        return cls.from_pretrained(path, local_files_only=True)
    from difffeat.zoo.registry import from_hub_model

    return from_hub_model(cls, source)


def is_transformer_controlnet(net) -> bool:
    """Whether `net` is an SD3 or FLUX ControlNet (block residuals for a transformer), not a UNet ControlNet."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    return isinstance(net, (SD3ControlNetModel, FluxControlNetModel))


def is_flux_controlnet(net) -> bool:
    from diffusers import FluxControlNetModel

    return isinstance(net, FluxControlNetModel)


def check_fits_transformer(controlnet, transformer, latent_channels: int, where: str) -> None:
    """Refuse an SD3 ControlNet whose inputs or block residuals do not fit this transformer, saying which differ."""
    c, m = controlnet.config, transformer.config
    problems = []
    width, want = c.num_attention_heads * c.attention_head_dim, m.num_attention_heads * m.attention_head_dim
    if width != want:
        problems.append(f"width {width} vs the transformer's {want}")
    if c.patch_size != m.patch_size:
        problems.append(f"patch size {c.patch_size} vs {m.patch_size}")
    if c.in_channels != m.in_channels:
        problems.append(f"latent channels {c.in_channels} vs {m.in_channels}")
    if c.joint_attention_dim is not None and c.joint_attention_dim != m.joint_attention_dim:
        problems.append(f"text width {c.joint_attention_dim} vs {m.joint_attention_dim}")
    if c.pooled_projection_dim != m.pooled_projection_dim:
        problems.append(f"pooled text width {c.pooled_projection_dim} vs {m.pooled_projection_dim}")
    if c.in_channels + c.extra_conditioning_channels != latent_channels:
        problems.append(f"control latent channels {c.in_channels + c.extra_conditioning_channels} vs the VAE's "
                        f"{latent_channels}")
    if problems:
        raise UserError(f"ControlNet {where} does not fit this model's transformer: " + "; ".join(problems))


def check_fits_flux(controlnet, transformer, latent_channels: int, vae_factor: int, where: str) -> None:
    """Refuse a FLUX ControlNet whose inputs or block residuals do not fit this FLUX transformer (more blocks than
    it has would be dropped silently by diffusers), or a union one, saying which differ."""
    c, m = controlnet.config, transformer.config
    name, backbone = type(controlnet).__name__, type(transformer).__name__
    if c.num_mode is not None:
        raise UserError(f"ControlNet {where} is a union {name} ({c.num_mode} control modes, one chosen per call by "
                        "`controlnet_mode`); union ControlNets are not supported yet")
    problems = []
    width, want = c.num_attention_heads * c.attention_head_dim, m.num_attention_heads * m.attention_head_dim
    if width != want:
        problems.append(f"inner dim {width} vs the transformer's {want}")
    if c.num_layers > m.num_layers:
        problems.append(f"{c.num_layers} double-stream blocks vs the transformer's {m.num_layers}")
    if c.num_single_layers > m.num_single_layers:
        problems.append(f"{c.num_single_layers} single-stream blocks vs the transformer's {m.num_single_layers}")
    if c.in_channels != m.in_channels:
        problems.append(f"input channels {c.in_channels} vs {m.in_channels}")
    if c.joint_attention_dim != m.joint_attention_dim:
        problems.append(f"text width {c.joint_attention_dim} vs {m.joint_attention_dim}")
    if c.pooled_projection_dim != m.pooled_projection_dim:
        problems.append(f"pooled text width {c.pooled_projection_dim} vs {m.pooled_projection_dim}")
    if controlnet.input_hint_block is None:  # InstantX: VAE latents packed 2×2, as FLUX's
        if 4 * latent_channels != c.in_channels:
            problems.append(f"control latent channels {4 * latent_channels} (the VAE's {latent_channels}, packed "
                            f"2×2) vs the ControlNet's input channels {c.in_channels}")
    else:  # XLabs: pixels through the hint block (stride 8), then patches of patch_size
        p = c.patch_size
        if 8 * p != 2 * vae_factor:
            problems.append(f"control-image stride {8 * p} vs the transformer's token stride {2 * vae_factor}")
        if c.conditioning_embedding_channels * p * p != c.in_channels:
            problems.append(f"hint channels {c.conditioning_embedding_channels * p * p} vs the ControlNet's input "
                            f"channels {c.in_channels}")
    if problems:
        raise UserError(f"ControlNet {where} (a {name}) does not fit this model's {backbone}: " + "; ".join(problems))


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
        from difffeat.models.backbones import backbone_for

        backbone = backbone_for(pipe)
        if backbone.controlnet_class != "ControlNetModel":  # the built-in canny ControlNets are UNet ones
            fitting = backbone.controlnet_class
            raise UserError(f"no built-in canny ControlNet for a {type(backbone.model).__name__}; " + (
                f"pass controlnet:PATH_OR_HUB_ID of a {fitting}" if fitting else ONLY_SO_FAR))

        mini = mini_canny_dir()
        if (mini / "config.json").exists():
            import json

            cfg = json.loads((mini / "config.json").read_text())
            u = pipe.unet.config
            if (tuple(cfg["block_out_channels"]) == tuple(u.block_out_channels)
                    and cfg["cross_attention_dim"] == u.cross_attention_dim and backbone.vae_factor() == 4):
                return str(mini)
        width = pipe.unet.config.cross_attention_dim
        if width not in PUBLIC_CANNY:
            raise UserError(f"no built-in canny ControlNet for a UNet with text width {width}; "
                            "pass controlnet:PATH_OR_HUB_ID")
        return PUBLIC_CANNY[width]

    def bind(self, pipe) -> torch.nn.Module:
        """The ControlNet module for `pipe` (loaded once per pipeline, source, device and dtype)."""
        from difffeat.models.backbones import backbone_for

        backbone = backbone_for(pipe)
        source = self.resolve_model(pipe)
        loaded = pipe_cache(pipe, "controlnets")
        model = backbone.model
        cache_key = (source, str(model.device), str(model.dtype))
        if cache_key not in loaded:
            net = _load_controlnet(source, _controlnet_class(source, pipe))
            if is_flux_controlnet(net):
                check_fits_flux(net, model, pipe.vae.config.latent_channels, backbone.vae_factor(), source)
            elif is_transformer_controlnet(net):
                check_fits_transformer(net, model, pipe.vae.config.latent_channels, source)
                if net.pos_embed is None:  # SD3.5's large ControlNets share the transformer's, as diffusers' pipeline
                    net.pos_embed = net._get_pos_embed_from_transformer(model)
            else:
                check_compatible(net, model, backbone.vae_factor(), source)
            device, dtype = model.device, model.dtype
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

    @torch.no_grad()
    def prepare_control(self, loaded, pipe, control: torch.Tensor) -> torch.Tensor:
        """An SD3 ControlNet's control latents: the VAE posterior mean of the control images, shifted and scaled as
        diffusers' SD3 ControlNet pipeline does; a FLUX ControlNet's as FluxControlNetPipeline prepares them (those
        latents packed into FLUX's 2×2 tokens, or the pixels in [-1, 1] for one with an input hint block); a UNet
        ControlNet's control images as they are."""
        if not is_transformer_controlnet(loaded):
            return control
        vae = pipe.vae
        if is_flux_controlnet(loaded):
            from difffeat.models.backbones.flux import pack_flux

            pixels = control.to(vae.device, vae.dtype) * 2 - 1
            if loaded.input_hint_block is not None:  # XLabs: the hint block takes the image itself
                return pixels
            mean = vae.encode(pixels).latent_dist.mean
            return pack_flux((mean - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor)
        shift = 0.0 if loaded.config.force_zeros_for_pooled_projection else (vae.config.get("shift_factor") or 0.0)
        mean = vae.encode(control.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
        return (mean - shift) * vae.config.scaling_factor

    def residuals(self, loaded, z, t, embeds, control, call: dict):
        """The keyword arguments that carry the residuals of ControlNet `loaded` (what `bind` returned) into the
        denoiser's call `call`, for latents z at t as the backbone gives them to a ControlNet: a UNet ControlNet's
        `down_block_additional_residuals` and `mid_block_additional_residual` (with SDXL's added conditions of the
        call); an SD3 ControlNet's `block_controlnet_hidden_states`, with the
        transformer's timestep and pooled projections (zeros where the ControlNet's config says so, as diffusers'
        pipeline does); a FLUX ControlNet's `controlnet_block_samples` / `controlnet_single_block_samples` (and
        `controlnet_blocks_repeat` for one with an input hint block), called as FluxControlNetPipeline calls it."""
        if is_flux_controlnet(loaded):
            return self._flux_residuals(loaded, z, t, embeds, control, call)
        if is_transformer_controlnet(loaded):
            pooled = call["pooled_projections"]
            if loaded.config.force_zeros_for_pooled_projection:
                pooled = torch.zeros_like(pooled)
            blocks = loaded(hidden_states=z, controlnet_cond=control, conditioning_scale=self.scale,
                            encoder_hidden_states=embeds if loaded.context_embedder is not None else None,
                            pooled_projections=pooled, timestep=t, return_dict=False)[0]
            return {"block_controlnet_hidden_states": list(blocks)}
        added = call.get("added_cond_kwargs")
        kwargs = {"added_cond_kwargs": added} if added else {}
        down, mid = loaded(z, t, encoder_hidden_states=embeds, controlnet_cond=control.to(z),
                           conditioning_scale=self.scale, return_dict=False, **kwargs)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _flux_residuals(self, loaded, tokens, t, embeds, control, call: dict) -> dict:
        """A FLUX ControlNet's residuals for the transformer call `call` (its packed tokens, σ as timestep, ids)."""
        from difffeat.models.backbones.flux import FLUX_GUIDANCE

        guidance = None
        if loaded.config.guidance_embeds:  # the transformer's guidance, as the pipeline gives both the same scale
            guidance = call.get("guidance")
            if guidance is None:
                guidance = torch.full((len(tokens),), FLUX_GUIDANCE, device=tokens.device, dtype=tokens.dtype)
        double, single = loaded(hidden_states=tokens, controlnet_cond=control, conditioning_scale=self.scale,
                                encoder_hidden_states=embeds, pooled_projections=call["pooled_projections"],
                                timestep=t, img_ids=call["img_ids"], txt_ids=call["txt_ids"], guidance=guidance,
                                return_dict=False)
        out = {"controlnet_blocks_repeat": loaded.input_hint_block is not None}  # XLabs' residuals cycle
        if double is not None:
            out["controlnet_block_samples"] = list(double)
        if single is not None:
            out["controlnet_single_block_samples"] = list(single)
        return out
