"""`FeatureExtractor`: images in, UNet activations out (VAE encode → noise at t → one hooked UNet pass).

Work is folded into batches of (image, timestep, noise draw) items, so a batch is always full whatever
the ensemble size. Noise is drawn per item from a generator seeded by (seed, image key, t, draw): a
feature never depends on batch size, order, or which process extracted it. The UNet stops right after
the deepest requested module; the VAE decoder never runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from difffeat.extraction.capture import Capture
from difffeat.extraction.conditioning import ConditioningStack, technique_stack
from difffeat.models.attention_feature import (
    ATTENTION_PRESETS,
    attention_groups,
    attention_modules,
    check_joint_attention,
    merge_attention,
)
from difffeat.models.backbones import backbone_for
from difffeat.models.layers import native_resolution, resolve_layers
from difffeat.models.prompts import PromptEncoder
from difffeat.utils.measure import NullTimer


def item_seed(seed: int, key: str, *parts) -> int:
    """A 63-bit seed from (seed, key, parts): stable across runs, processes and platforms."""
    digest = hashlib.sha256("|".join(map(str, (seed, key, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_normal(shape, seed: int) -> torch.Tensor:
    """Standard normal noise from its own CPU generator (so CPU and GPU runs draw the same numbers)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def encode_latents(pipe, x: torch.Tensor, keys: Sequence[str] | None = None, posterior: str = "mean", seed: int = 0,
                   batch_size: int = 8) -> torch.Tensor:
    """Clean latents z0 = VAE posterior (mean, or a sample seeded per image key) × scaling factor.

    `x`: [B, 3, H, W] images in [0, 1].
    """
    vae = pipe.vae
    keys = [str(i) for i in range(len(x))] if keys is None else list(keys)
    out = []
    pinned = x.device.type == "cpu" and x.is_pinned()  # page-locked: the copy to a GPU runs asynchronously
    for s in range(0, len(x), batch_size):
        xb = (x[s : s + batch_size].to(vae.device, non_blocking=pinned) * 2 - 1).to(vae.dtype)
        dist = vae.encode(xb).latent_dist
        z = dist.mean
        if posterior == "sample":
            eps = torch.stack([seeded_normal(z.shape[1:], item_seed(seed, k, "posterior"))
                               for k in keys[s : s + batch_size]]).to(z)
            z = z + dist.std * eps
        if vae.config.get("shift_factor") is not None:  # SD3 / FLUX latents are shifted before scaling
            z = z - vae.config.shift_factor
        out.append(z * vae.config.scaling_factor)
    return torch.cat(out)


def concat_features(features: dict[str, torch.Tensor], size: tuple[int, int] | None = None,
                    mode: str = "bilinear") -> torch.Tensor:
    """All maps resized to one resolution and concatenated along channels, in dict order.

    `size` defaults to the largest map's (h, w); `mode` is "bilinear" or "nearest" (GDF's `--aggregate_output`
    upsamples nearest, so its legacy features are reproduced with nearest).
    """
    maps = list(features.values())
    if size is None:
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return torch.cat([m if tuple(m.shape[-2:]) == tuple(size) else
                      F.interpolate(m, size=tuple(size), mode=mode, **extra) for m in maps], 1)


class FeatureExtractor:
    """Extracts features of named UNet modules for batches of images.

    Args:
        pipe: a diffusers pipeline (`difffeat.load_pipeline`).
        layers: module names as `difffeat.list_layers` gives them, or preset names (`dift`,
            `gdf-legacy`, `hyperfeatures`); checked before any work.
        timesteps: UNet timesteps; with several, output keys are `f"{layer}@{t}"`.
        ensemble: noise draws per (image, timestep); features are their mean.
        seed: base seed of the per-image noise (and of posterior samples).
        noise: False for clean mode: the UNet sees the VAE posterior mean × scaling factor at `t`.
        prompt: the prompt of every image unless `extract` is given per-image prompts.
        techniques: generation techniques: spec strings such as `controlnet:canny` (or the technique objects of
            the installed provider, `pipelines` by default), composed in hook order; or a ready
            `difffeat.extraction.conditioning.ConditioningStack`.
        batch_size: UNet items per forward.
        posterior: "mean" (default, deterministic) or "sample" (seeded per image) of the VAE posterior.
        resolution: (height, width) images are resized to (center crop) when given as PIL images of
            another size; default the model's native resolution.
        capture_inputs: hook module inputs instead of outputs.
        attention: attention modules (e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2`) whose
            head-averaged probabilities to return as `f"{name}:probs"` maps [tokens, h, w]; or attention presets
            (`gdf-up-cross`, `difffeat.models.attention_feature`): their layers' maps merged into `f"{group}:probs"`
            maps at the grid of the largest layer. On a transformer: its joint attention modules (SD3, FLUX:
            `transformer_blocks.N.attn`, FLUX's `single_transformer_blocks.N.attn`) or cross-attention modules
            (PixArt: `transformer_blocks.N.attn2`), whose maps are the image→text probabilities
            (`difffeat.models.dit_attention`).
        attention_prompt: the prompt of the attention maps when it differs from the images' (GDF fixes one, so
            that a token channel means the same everywhere): they then come from a pass of their own with it.
        early_exit: stop the UNet after the deepest requested module (never changes values).
        timer: receives the seconds of each phase (a `difffeat.utils.measure.PhaseTimer`; `difffeat bench`).
        pad_batches: pad every denoiser batch to `batch_size` (one shape for a compiled denoiser; the padding rows
            are dropped).
    """

    def __init__(self, pipe, layers: Sequence[str], timesteps: Sequence[int] = (50,), ensemble: int = 1,
                 seed: int = 0, noise: bool = True, prompt: str = "", techniques: Sequence | ConditioningStack = (),
                 batch_size: int = 8, posterior: str = "mean", resolution: tuple[int, int] | None = None,
                 capture_inputs: bool = False, attention: Sequence[str] = (), early_exit: bool = True,
                 prompt_encoder=None, attention_prompt: str | None = None, timer=None, pad_batches: bool = False):
        if ensemble < 1 or batch_size < 1:
            raise UserError(f"ensemble and batch_size must be ≥ 1 (got {ensemble}, {batch_size})")
        if posterior not in ("mean", "sample"):
            raise UserError(f"posterior must be 'mean' or 'sample', got {posterior!r}")
        n_train = pipe.scheduler.config.num_train_timesteps
        bad = [t for t in timesteps if not 0 <= int(t) < n_train]
        if bad or not timesteps:
            raise UserError(f"timesteps must be in [0, {n_train}), got {list(timesteps)}")
        self.pipe = pipe
        self.resolution = tuple(resolution) if resolution else native_resolution(pipe)
        self.layers = resolve_layers(pipe, layers, *self.resolution)
        self.backbone = backbone_for(pipe)
        modules = dict(self.backbone.model.named_modules())
        if attention:  # a transformer's image→text maps come from some attention modules only (dit_attention)
            check_joint_attention(pipe, attention)
        # Presets stand for groups of modules whose maps are merged (averaged, resized) into one feature each.
        self.attention_groups = None
        if any(a in ATTENTION_PRESETS for a in attention):
            self.attention_groups = attention_groups(pipe, attention, *self.resolution)
            attention = attention_modules(self.attention_groups)
        self.attention_prompt = attention_prompt
        for name in attention:
            if not hasattr(modules.get(name), "get_attention_scores"):
                raise UserError(f"{name!r} is not an attention module of this UNet")
        self.attention = list(attention)
        self.timesteps = [int(t) for t in timesteps]
        self.ensemble = ensemble if noise else 1  # without noise every draw is the same
        self.seed, self.noise, self.prompt = seed, noise, prompt
        self.batch_size, self.posterior = batch_size, posterior
        self.capture_inputs, self.early_exit = capture_inputs, early_exit
        # The installed technique provider binds the techniques (difffeat.extraction.conditioning); difffeat never
        # imports a technique package itself.
        self.stack = technique_stack(pipe, techniques)
        self.stack.check(self.timesteps, noise)
        self.prompt_encoder = prompt_encoder or PromptEncoder(pipe)
        # For the extract runner's fast paths: time per phase (`difffeat.utils.measure`), and denoiser batches padded
        # to `batch_size` so that a compiled denoiser sees one shape (padding rows are dropped; rows never mix).
        self.timer = timer or NullTimer()
        self.pad_batches = pad_batches

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def output_names(self) -> list[str]:
        probs = self.attention_groups if self.attention_groups is not None else self.attention
        names = self.layers + [f"{a}:probs" for a in probs]
        if len(self.timesteps) == 1:
            return names
        return [f"{n}@{t}" for t in self.timesteps for n in names]

    def _as_tensor(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise UserError(f"images tensor must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
            return images.float()
        from difffeat.data.images import resize_image, to_rgb, to_tensor

        return to_tensor([resize_image(to_rgb(im), self.resolution) for im in images])

    def encode_latents(self, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Clean latents of images x (see `encode_latents`) with this extractor's posterior and seed."""
        return encode_latents(self.pipe, x, keys, self.posterior, self.seed, self.batch_size)

    # ------------------------------------------------------------------------------------------ extract
    @torch.no_grad()
    def extract(self, images, prompts: Sequence[str] | None = None, keys: Sequence[str] | None = None,
                fields: Sequence[dict] | None = None, latents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """layer → [B, C, h, w] float32 CPU features, the mean over `ensemble` noise draws.

        `images`: PIL images or a [B, 3, H, W] tensor in [0, 1]. `keys` name the images for seeding
        (default their positions "0", "1", …); `prompts` are per image (default the extractor's prompt).
        `fields` are per-image prompt fields for prompt templates (`caption`, `label`); `latents` are the
        images' clean latents when the caller already has them (variants of one run share them).
        """
        x = self._as_tensor(images)
        n = len(x)
        keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
        prompts = [self.prompt] * n if prompts is None else list(prompts)
        fields = [{}] * n if fields is None else list(fields)
        if len(keys) != n or len(prompts) != n or len(fields) != n:
            raise UserError(f"got {n} images but {len(keys)} keys, {len(prompts)} prompts and {len(fields)} fields")
        stack = self.stack
        prompts = stack.prompts(prompts, fields, keys, x)  # with fields from the images (prompt:auto)
        z0 = self.encode_latents(x, keys) if latents is None else latents.to(self.backbone.model.device)
        controls = stack.control_images(x, keys)
        if self.attention_prompt is None or not self.attention:
            out = self._forward(z0, prompts, keys, controls, self.layers, self.attention)
        else:  # the attention maps from a pass with the one fixed prompt (other techniques still act)
            out = self._forward(z0, prompts, keys, controls, self.layers, [])
            out.update(self._forward(z0, [self.attention_prompt] * n, keys, controls, [], self.attention))
        if self.attention_groups is not None:
            self._merge_attention(out)
        return {k: out[k] for k in self.output_names}

    def _forward(self, z0: torch.Tensor, prompts: list[str], keys: list[str], controls, layers: list[str],
                 attention: list[str]) -> dict[str, torch.Tensor]:
        """The hooked UNet passes over every (image, timestep, draw) item: name → per-image mean maps."""
        n, stack = len(z0), self.stack
        latent_hw = tuple(z0.shape[-2:])
        items = [(i, t, d) for i in range(n) for t in self.timesteps for d in range(self.ensemble)]
        out: dict[str, torch.Tensor] = {}
        backbone = self.backbone
        # How hooked outputs become maps (a transformer's image tokens on the patch grid, DiTF options) and how
        # attention is recorded: the backbone's (None: the UNet rules of `Capture`).
        with stack.active(), backbone.feature_maps(layers, latent_hw, self.resolution) as to_map, \
                Capture(backbone.model, layers, latent_hw, inputs=self.capture_inputs, attention=attention,
                        early_exit=self.early_exit, to_map=to_map,
                        probs_processor=backbone.attention_recorder(latent_hw)) as cap:
            timer = self.timer
            for s in range(0, len(items), self.batch_size):
                batch = items[s : s + self.batch_size]
                run = batch + batch[-1:] * (self.batch_size - len(batch)) if self.pad_batches else batch
                idx = [i for i, _, _ in run]
                ts = torch.tensor([t for _, t, _ in run])
                with timer.phase("text"):
                    cond = stack.conditioning(self.prompt_encoder, prompts, controls, idx, self.resolution)
                with timer.phase("unet"):
                    zb = z0[idx]
                    if self.noise:
                        eps = torch.stack([seeded_normal(zb.shape[1:], item_seed(self.seed, keys[i], t, d))
                                           for i, t, d in run]).to(zb)
                        with cap.paused():  # denoise-from's steps are not the feature pass
                            for t in ts.unique().tolist():
                                rows = (ts == t).nonzero().flatten().tolist()
                                zb[rows] = cond.subset(rows).prepare_latents(zb[rows], eps[rows], t)
                    feats = cond.features(cap, zb, ts)
                with timer.phase("copy"):
                    self._collect(feats, batch, n, out)
        return out

    def _merge_attention(self, out: dict[str, torch.Tensor]) -> None:
        """Replace the preset groups' per-module maps by their merged features, per timestep, at the grid of the
        largest layer (nearest, as GDF)."""
        grids = [tuple(out[k].shape[-2:]) for k in out if not k.split("@")[0].endswith(":probs")]
        size = max(grids, key=lambda s: s[0] * s[1]) if grids else None
        suffixes = [""] if len(self.timesteps) == 1 else [f"@{t}" for t in self.timesteps]
        for suffix in suffixes:
            per_module = {f"{m}:probs": out.pop(f"{m}:probs{suffix}") for m in self.attention}
            for name, value in merge_attention(per_module, self.attention_groups, size).items():
                out[f"{name}{suffix}"] = value

    def _collect(self, feats: dict[str, torch.Tensor], batch: list[tuple[int, int, int]], n: int,
                 out: dict[str, torch.Tensor]) -> None:
        """Add one UNet batch's maps (rows in `batch` order; padding rows beyond it) to the per-image means."""
        for name, fmap in feats.items():
            fmap = fmap[: len(batch)].float().cpu()
            for row, (i, t, _) in enumerate(batch):
                key = name if len(self.timesteps) == 1 else f"{name}@{t}"
                if key not in out:
                    out[key] = torch.zeros(n, *fmap.shape[1:])
                out[key][i] += fmap[row] / self.ensemble
