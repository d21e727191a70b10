"""Parity with the released extractors (issue #23 item 4): how to trust a protocol without real weights.

For two published protocols an independent reference, written here from the released code's steps with plain
diffusers calls (no difffeat function), runs on the same random-weight architecture, the same images and the very
noise difffeat draws; difffeat's features must equal the reference's to 1e-5 (absolute, fp32).

(a) **Content-shift / GATE feature collection**: `Darkbblue/generic-diffusion-feature` (GDF),
    `feature/diffusion_feature.py` `FeatureExtractor.extract` for `version='1-5'` with the legacy layer config
    `feature/configs/config_15_legacy.json`; the hook sites are GDF's patched `Upsample2D.forward`
    (`feature/diffusers/models/upsampling.py`, gathers its output) and `Transformer2DModel.forward`
    (`feature/diffusers/models/transformers/transformer_2d.py`, gathers its output). The steps: PIL resize (aspect
    not kept, bicubic) and the pipeline's `image_processor.preprocess` to [-1, 1]; SD-1.5's scheduler (PNDM)
    `set_timesteps(1000)` and img2img `get_timesteps(1000, t / 1000)`; `prepare_latents`: the VAE posterior
    *sampled* × scaling factor, then `scheduler.add_noise` at that timestep; `encode_prompt` (its CFG flag set,
    only the conditional embeddings used), repeated over the batch; `scale_model_input`; the whole UNet with the
    four outputs recorded (`FeatureStore.store`: 4-D maps kept, `normalize(mean=0, std=1)` is the identity).
    difffeat: `load_pipeline("sd15-random")`, layer preset `gdf-legacy`.

(b) **DIFT**: `Tsingularity/dift`, `src/models/dift_sd.py` (`SDFeaturizer.forward`, `OneStepSDPipeline.__call__`,
    `MyUNet2DConditionModel.forward`) with the preprocessing of `extract_dift.py` / `sd_featurizer_spair.py`: PIL
    resize (aspect not kept), `(PILToTensor / 255 - 0.5) * 2`; the image repeated `ensemble_size` times in one batch;
    "a photo of a {category}" through tokenizer + text encoder (diffusers 0.15's `_encode_prompt`, no CFG), repeated;
    `vae.encode(...).latent_dist.sample() * scaling_factor`; SD-2.1's DDIM scheduler `add_noise` at t = 261; the
    UNet's own blocks called by hand up to `up_blocks[up_ft_index]` (index 1) and then stopped; the mean over the
    ensemble. difffeat: `load_pipeline("sd21-random")`, layer preset `dift`.

Where difffeat intentionally differs, the values still match: it stops the UNet after the deepest requested module
(GDF runs it whole), runs fp32, draws its noise per (image key, t, draw) from seeded CPU generators, and for PIL
images of another size needs `resize="stretch"` (`difffeat extract --resize stretch`; the default is center-crop)
to resize as both released tools do, which is what the difffeat side does here.

Noise: difffeat has no argument to pass noise in, so the test reproduces its documented seeding rule
(`difffeat/extraction/extract.py`: per item, seeded by (seed, image key, t, draw); the posterior sample by (seed, key,
"posterior")) and hands those draws to the references; a spy on difffeat's draws checks that they are the very
tensors difffeat used.

Released steps that cannot match, so the test pins them instead of comparing them:

- GDF's t = 50 is UNet timestep **51** for SD-1.5: PNDM with `steps_offset=1` and `skip_prk_steps` lists
  1000, 999, 999, 998, …, so `get_timesteps(1000, 0.05)` lands on 51. difffeat takes timesteps literally, so the
  parity run asks difffeat for 51 (`timesteps=(51,)`), and `test_gdf_t50_is_timestep_51` pins the quirk.
- GDF stores features in fp16 (`FeatureStore.store`, and the pipeline is fp16 by default); difffeat returns fp32,
  compared here before any fp16 rounding.
- DIFT samples the VAE posterior once per *copy* of the image (the batch holds `ensemble_size` copies), so its
  ensemble averages over posterior draws too; difffeat draws one posterior sample per image and shares it across
  the ensemble's noise draws. The parity run gives every copy difffeat's one posterior draw; the rest of DIFT's
  path (noise per copy, t, layer, mean) is compared.
- Sizes: 64×64 images (8×8 latents) instead of 512² / 768², and DIFT's ensemble 2 instead of 8; both only change
  run time here (the code path is the same). The file then takes about 45 s of CPU time, most of it building the
  two random-weight pipelines (measured parity: max |Δ| ≤ 5e-6 at feature scales of 0.3–2.5).
"""

from __future__ import annotations

import gc
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 64  # image side: 8×8 latents, the smallest the SD UNet takes without forwarding upsample sizes
SEED = 7
ATOL = 1e-5

# The public checkpoints' scheduler_config.json values, as data (nothing is downloaded).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)  # PNDMScheduler
SD21_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      prediction_type="v_prediction")  # DDIMScheduler

GDF_T = 50
GDF_PROMPT = "a photo of a horse"  # GDF's Horse-21 prompt
GDF_LAYERS = {  # GDF legacy id → the module whose output GDF's patched forward gathers
    "up-level0-upsampler-out": "up_blocks.0.upsamplers.0",
    "up-level1-upsampler-out": "up_blocks.1.upsamplers.0",
    "up-level2-upsampler-out": "up_blocks.2.upsamplers.0",
    "up-level3-repeat2-vit-out": "up_blocks.3.attentions.2",
}
DIFT_T, DIFT_UP_FT_INDEX, DIFT_ENSEMBLE = 261, 1, 2  # DIFT's ensemble is 8; 2 exercises the same path
DIFT_CATEGORY = "cat"


# ------------------------------------------------------------------------------------------------ noise
def difffeat_seed(seed: int, key: str, *parts) -> int:
    """difffeat's per-item seed rule, restated: the first 8 bytes (little-endian, 63 bits) of the sha256 of
    "seed|key|part|…"."""
    digest = hashlib.sha256("|".join(map(str, (seed, key, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def normal(shape, seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def test_noise_rule_is_difffeats():
    """The restated seed rule gives difffeat's own seeds (a cheap guard; the spies below check the draws)."""
    from difffeat.extraction.extract import item_seed

    for parts in (("img", 51, 0), ("img", 261, 3), ("a/b.png", "posterior")):
        assert difffeat_seed(SEED, *parts) == item_seed(SEED, *parts)


# ------------------------------------------------------------------------------------------------ images
def source_images() -> list[Image.Image]:
    """Non-square pictures (so the resize step is exercised): smooth colour fields with some texture."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((48, 96), (80, 56)):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
        arr = 127.5 + 100 * base + rng.normal(0, 12, (h, w, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"))
    return out


def difffeat_stretched(images: list[Image.Image]) -> list[Image.Image]:
    """The difffeat side's resize, as `difffeat extract --resize stretch` does it."""
    from difffeat.data.images import resize_image

    return [resize_image(im, (SIZE, SIZE), "stretch") for im in images]


def free(pipe) -> None:
    del pipe
    gc.collect()


# ------------------------------------------------------------------------------------------------ GDF
def gdf_timestep(t: int, scheduler=None) -> torch.Tensor:
    """GDF `extract` step 3 (no `denoising_from`): SD-1.5's scheduler set to 1000 steps, then the img2img pipeline's
    `get_timesteps(1000, t / 1000)`; the first timestep is where noise is added and features are taken."""
    from diffusers import PNDMScheduler

    scheduler = scheduler or PNDMScheduler(**SD15_SCHEDULER)
    scheduler.set_timesteps(1000)
    n = 1000
    init_timestep = min(int(n * (t / 1000)), n)
    t_start = max(n - init_timestep, 0)
    return scheduler.timesteps[t_start * scheduler.order :][:1]


@torch.no_grad()
def gdf_reference(pipe, images: list[Image.Image], prompt: str, t: int, posterior_eps: torch.Tensor,
                  eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """GDF `FeatureExtractor.extract(version='1-5', t)` on PIL `images`, with the given posterior and noise draws
    (what its `prepare_latents` draws with `torch.randn`); returns GDF legacy id → [B, C, h, w]."""
    from diffusers import PNDMScheduler
    from diffusers.image_processor import VaeImageProcessor

    batch_size = len(images)
    # 2. encode_prompt (CFG flag on "as a workaround"; only the conditional embeddings are used), repeated
    prompt_embeds, _ = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True, negative_prompt="")
    prompt_embeds = prompt_embeds.repeat(batch_size, 1, 1)
    # 3. timesteps (a fresh copy of the scheduler per call)
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    t_feat = gdf_timestep(t, scheduler)
    latent_timestep = t_feat.repeat(batch_size)
    # 6. image: `_preprocess_basic` (resize, RGB) then the pipeline's image processor
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1))
    image = torch.cat([processor.preprocess(im.resize((SIZE, SIZE)).convert("RGB")) for im in images])
    # 7. prepare_latents: posterior sample × scaling factor, noise, add_noise at the latent timestep
    dist = pipe.vae.encode(image).latent_dist
    init_latents = pipe.vae.config.scaling_factor * (dist.mean + dist.std * posterior_eps)  # = dist.sample()
    latents = scheduler.add_noise(init_latents, eps, latent_timestep)
    # 8. the UNet, whole, with GDF's gatherers (the hooked modules' outputs)
    modules = dict(pipe.unet.named_modules())
    stored: dict[str, torch.Tensor] = {}
    handles = []
    for gdf_id, name in GDF_LAYERS.items():
        def gather(module, args, output, gdf_id=gdf_id):
            feat = output if isinstance(output, torch.Tensor) else output[0]
            stored[gdf_id] = (feat - 0) / 1  # FeatureStore: 4-D maps kept as they are; normalize(0, 1)
        handles.append(modules[name].register_forward_hook(gather))
    try:
        latent_model_input = scheduler.scale_model_input(latents, t_feat)
        pipe.unet(latent_model_input, timestep=t_feat, encoder_hidden_states=prompt_embeds, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return stored


def test_gdf_t50_is_timestep_51():
    """GDF's t = 50 on SD-1.5 (PNDM, steps_offset 1, skip_prk_steps) is UNet timestep 51; t = 1 would be 2."""
    assert gdf_timestep(GDF_T).tolist() == [51]
    assert gdf_timestep(1).tolist() == [2]


class TestGDFLegacyParity:
    """The content-shift papers' legacy features (GDF, SD-1.5) against difffeat's `gdf-legacy` preset."""

    @pytest.fixture(scope="class")
    def run(self):
        from difffeat import FeatureExtractor, load_pipeline

        pipe = load_pipeline("sd15-random")
        images = difffeat_stretched(source_images())
        keys = ["horse/001.png", "horse/002.png"]
        t = int(gdf_timestep(GDF_T))  # the timestep GDF really uses (see the module docstring)
        extractor = FeatureExtractor(pipe, ["gdf-legacy"], timesteps=(t,), ensemble=1, seed=SEED,
                                     prompt=GDF_PROMPT, posterior="sample", resolution=(SIZE, SIZE))
        import difffeat.extraction.extract as extract

        drawn: dict[int, torch.Tensor] = {}
        original = extract.seeded_normal
        extract.seeded_normal = lambda shape, seed: drawn.setdefault(seed, original(shape, seed)).clone()
        try:
            ours = extractor.extract(images, keys=keys)
        finally:
            extract.seeded_normal = original
        shape = (4, SIZE // 8, SIZE // 8)
        post_seeds = [difffeat_seed(SEED, k, "posterior") for k in keys]
        noise_seeds = [difffeat_seed(SEED, k, t, 0) for k in keys]
        posterior_eps = torch.stack([normal(shape, s) for s in post_seeds])
        eps = torch.stack([normal(shape, s) for s in noise_seeds])
        # the reference resizes the original pictures itself, as GDF does
        ref = gdf_reference(pipe, source_images(), GDF_PROMPT, GDF_T, posterior_eps, eps)
        layers = list(extractor.layers)
        free(pipe)
        return dict(ours=ours, ref=ref, layers=layers, drawn=drawn, post_seeds=post_seeds, noise_seeds=noise_seeds,
                    posterior_eps=posterior_eps, eps=eps)

    def test_preset_names_gdfs_modules(self, run):
        assert run["layers"] == list(GDF_LAYERS.values())

    def test_same_noise(self, run):
        drawn = run["drawn"]
        assert set(drawn) == set(run["post_seeds"]) | set(run["noise_seeds"])
        assert torch.equal(torch.stack([drawn[s] for s in run["post_seeds"]]), run["posterior_eps"])
        assert torch.equal(torch.stack([drawn[s] for s in run["noise_seeds"]]), run["eps"])

    @pytest.mark.parametrize("gdf_id", list(GDF_LAYERS))
    def test_features_equal(self, run, gdf_id):
        ours, ref = run["ours"][GDF_LAYERS[gdf_id]], run["ref"][gdf_id].float()
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"{gdf_id}: max |difffeat − GDF reference| = {diff:.3g} (scale {ref.abs().max():.3g})"


# ------------------------------------------------------------------------------------------------ DIFT
@torch.no_grad()
def dift_unet_up_ft(unet, sample: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    up_ft_indices: list[int]) -> dict[int, torch.Tensor]:
    """DIFT's `MyUNet2DConditionModel.forward`: the UNet's blocks called one by one, the up blocks only up to the
    largest requested index, whose outputs (after the block's upsampler) are returned."""
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    upsample_size = None
    timesteps = t[None] if t.ndim == 0 else t
    timesteps = timesteps.to(sample.device).expand(sample.shape[0])
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), None)
    sample = unet.conv_in(sample)
    down_block_res_samples = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        down_block_res_samples += res
    sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
    up_ft = {}
    for i, block in enumerate(unet.up_blocks):
        if i > max(up_ft_indices):
            break
        res = down_block_res_samples[-len(block.resnets) :]
        down_block_res_samples = down_block_res_samples[: -len(block.resnets)]
        if i != len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = down_block_res_samples[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        if i in up_ft_indices:
            up_ft[i] = sample.detach()
    return up_ft


@torch.no_grad()
def dift_reference(pipe, image: Image.Image, category: str, posterior_eps: torch.Tensor, eps: torch.Tensor,
                   t: int = DIFT_T, up_ft_index: int = DIFT_UP_FT_INDEX) -> torch.Tensor:
    """DIFT `SDFeaturizer.forward` on one PIL image; `posterior_eps` and `eps` are [ensemble, 4, h, w], the draws of
    `latent_dist.sample()` and `torch.randn_like(latents)`. Returns [1, C, h, w]."""
    from diffusers import DDIMScheduler

    ensemble_size = len(eps)
    img = image.resize((SIZE, SIZE))
    img_tensor = (torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255.0 - 0.5) * 2  # PILToTensor, scaled
    img_tensor = img_tensor.unsqueeze(0).repeat(ensemble_size, 1, 1, 1)
    # _encode_prompt(prompt, num_images_per_prompt=1, do_classifier_free_guidance=False)
    tok, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tok(f"a photo of a {category}", padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    prompt_embeds = encoder(ids.input_ids, attention_mask=mask)[0].to(dtype=encoder.dtype)
    prompt_embeds = prompt_embeds.repeat(ensemble_size, 1, 1)
    # OneStepSDPipeline.__call__
    scheduler = DDIMScheduler(**SD21_SCHEDULER)
    dist = pipe.vae.encode(img_tensor).latent_dist
    latents = (dist.mean + dist.std * posterior_eps) * pipe.vae.config.scaling_factor  # = sample() × factor
    t = torch.tensor(t, dtype=torch.long)
    latents_noisy = scheduler.add_noise(latents, eps, t)
    up_ft = dift_unet_up_ft(pipe.unet, latents_noisy, t, prompt_embeds, [up_ft_index])
    return up_ft[up_ft_index].mean(0, keepdim=True)


class TestDIFTParity:
    """DIFT's SD featurizer (SD-2.1, t = 261, up_ft_index 1, ensemble mean) against difffeat's `dift` preset."""

    @pytest.fixture(scope="class")
    def run(self):
        from difffeat import FeatureExtractor, load_pipeline

        pipe = load_pipeline("sd21-random")
        image = source_images()[0]
        key = f"{DIFT_CATEGORY}/2008_000123.jpg"
        extractor = FeatureExtractor(pipe, ["dift"], timesteps=(DIFT_T,), ensemble=DIFT_ENSEMBLE, seed=SEED,
                                     prompt=f"a photo of a {DIFT_CATEGORY}", posterior="sample",
                                     resolution=(SIZE, SIZE), batch_size=DIFT_ENSEMBLE)
        import difffeat.extraction.extract as extract

        drawn: dict[int, torch.Tensor] = {}
        original = extract.seeded_normal
        extract.seeded_normal = lambda shape, seed: drawn.setdefault(seed, original(shape, seed)).clone()
        try:
            ours = extractor.extract(difffeat_stretched([image]), keys=[key])
        finally:
            extract.seeded_normal = original
        shape = (4, SIZE // 8, SIZE // 8)
        post_seed = difffeat_seed(SEED, key, "posterior")
        noise_seeds = [difffeat_seed(SEED, key, DIFT_T, d) for d in range(DIFT_ENSEMBLE)]
        # one posterior draw shared by every copy (difffeat's rule; DIFT draws one per copy: module docstring)
        posterior_eps = normal(shape, post_seed).expand(DIFT_ENSEMBLE, *shape)
        eps = torch.stack([normal(shape, s) for s in noise_seeds])
        ref = dift_reference(pipe, image, DIFT_CATEGORY, posterior_eps, eps)
        layers = list(extractor.layers)
        free(pipe)
        return dict(ours=ours, ref=ref, layers=layers, drawn=drawn, post_seed=post_seed, noise_seeds=noise_seeds,
                    posterior_eps=posterior_eps, eps=eps)

    def test_preset_is_up_ft_index_1(self, run):
        assert run["layers"] == [f"up_blocks.{DIFT_UP_FT_INDEX}"]

    def test_same_noise(self, run):
        drawn = run["drawn"]
        assert set(drawn) == {run["post_seed"], *run["noise_seeds"]}
        assert torch.equal(drawn[run["post_seed"]], run["posterior_eps"][0])
        assert torch.equal(torch.stack([drawn[s] for s in run["noise_seeds"]]), run["eps"])

    def test_features_equal(self, run):
        ours, ref = run["ours"][f"up_blocks.{DIFT_UP_FT_INDEX}"], run["ref"].float()
        assert ours.shape == ref.shape == (1, 1280, SIZE // 16, SIZE // 16)
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"max |difffeat − DIFT reference| = {diff:.3g} (scale {ref.abs().max():.3g})"


def test_posterior_sample_is_mean_plus_std_times_draw():
    """The references hand diffusers' `latent_dist.sample()` its draw as mean + std · ε; check that this is what
    `sample` computes (same generator state → same tensor)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    params = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    dist = DiagonalGaussianDistribution(params)
    sampled = dist.sample(generator=torch.Generator().manual_seed(5))
    by_hand = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, by_hand)
