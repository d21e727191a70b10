"""`difffeat lora train IMAGES --out DIR`: a LoRA (peft) fitted to a few target images, the paper's recipe.

research/content_shift_gate.md §3.2: about 30 images, each seen with three caption styles (empty, tags,
a sentence), repeated; rank 64, alpha 32; learning rate 1e-4 for the UNet and 5e-5 for the text encoder;
about 100 epochs. Here the tag-style caption is the image folder's `coarse_caption` column when there is
one, the sentence its sidecar `.txt` or `fine_caption` column; styles an image lacks are left out.

The adapters go on the UNet's attention projections (to_q/k/v/out) and the text encoder's (q/k/v/out_proj).
With ``conv`` they go on every module of LyCORIS's LoCon preset, the kind of LoRA the paper trains with kohya_ss
(its guide's "sd15 - EDG_LoConOptiSettings": LyCORIS/LoCon, rank 64, conv rank 32, conv alpha 1): every Linear and
Conv2d in the UNet's transformer, resnet and down/upsampling blocks (attention, proj_in/out, feed-forward,
time_emb_proj, conv1/conv2, conv_shortcut, the samplers' convs) and in the text encoder's attention and MLP blocks
(q/k/v/out_proj, fc1/fc2): 278 + 72 modules on SD-1.5. 3×3 convolutions take the conv rank and alpha (defaults 32
and 1, the preset's), the rest (conv_shortcut and proj_in/out are 1×1) the linear ones. They are written in
diffusers' LoRA format (`pytorch_lora_weights.safetensors`), which `lora:DIR` loads, each module's scale alpha/r
folded into its up matrix (diffusers reads such a file with alpha = r, so the file gives exactly the trained model).
Batches depend only on (seed, step), and a run resumes from its last checkpoint with the same result.

The output folder is a run folder of the spine (`difffeat.spine.run.RunFolder`, kind "lora"): `config.json`,
`losses.csv`, the weights, and while training the checkpoints (`difffeat.spine.run.Checkpoints`: safetensors and
JSON, never a pickle) and its lock (one process trains it at a time). Before anything is written, a model whose
denoiser is not a UNet and a rank above every adapted layer's full rank are refused in one line (`check_adaptable`).
A folder difffeat did not write (someone's LoRA) is never written into; a LoRA run of another config is replaced only
with ``overwrite``; the same config resumes, or is done.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from difffeat.spine.run import CHECKPOINTS, ConfigError, RunFolder, refuse_pickled_checkpoints
from difffeat.utils.atomic import FILE_MODE
from pipelines.recipe_config import CAPTION_STYLES, LoraTrainConfig  # noqa: F401

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# LoCon as LyCORIS presets it ("full" before LyCORIS 1.9 and its kohya network's default; kohya_ss's "LyCORIS/LoCon"):
# every Linear and Conv2d inside these blocks. A 3×3 convolution takes the conv rank and alpha, a linear layer or 1×1
# convolution (proj_in/out, conv_shortcut) the linear ones. On SD-1.5: 278 UNet modules, 72 text-encoder modules.
LOCON_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
LOCON_TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP")
KIND = "lora"
WEIGHTS = "pytorch_lora_weights.safetensors"
LEGACY_CHECKPOINTS = ("checkpoint.pt",)  # the pickle of older versions: refused, never loaded


def _captions(source, item, styles: list[str]) -> list[str]:
    from difffeat.data.images import sidecar_caption

    row = source.row(item) or {}
    found = {"empty": "", "tags": row.get("coarse_caption"),
             "sentence": (sidecar_caption(item.path) if item.path else None) or row.get("fine_caption")}
    return list(dict.fromkeys(found[s] for s in styles if found.get(s) is not None))


def locon_modules(model, blocks: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """`model`'s Linear and Conv2d modules inside a module of a class named in `blocks` (or a subclass: CLIP's sdpa
    attention is a CLIPAttention), by dotted name, in model order: what LyCORIS's LoCon adapts."""
    found = {}
    for name, block in model.named_modules():
        if name and any(c.__name__ in blocks for c in type(block).__mro__):
            for sub, module in block.named_modules():
                if sub and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    found.setdefault(f"{name}.{sub}", module)
    return found


def on_conv_rank(module) -> bool:
    """LoCon's split: a convolution with a kernel wider than 1×1 takes the conv rank; linear layers and 1×1
    convolutions (which are linear maps) take the linear rank."""
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _targets(model, conv: bool, blocks: tuple[str, ...], names: list[str]) -> dict[str, torch.nn.Module]:
    """The modules `model`'s adapters go on: the LoCon preset's with `conv`, else the attention projections."""
    if conv:
        return locon_modules(model, blocks)
    pattern = re.compile(rf"^.*\.({'|'.join(re.escape(t) for t in names)})$")
    return {n: m for n, m in model.named_modules() if pattern.fullmatch(n)}


def _peft_config(rank: int, alpha: float, targets: dict[str, torch.nn.Module], conv_rank: int = 0,
                 conv_alpha: float = 0.0):
    """peft's config for the modules `targets`; those on the conv rank (`on_conv_rank`) at `conv_rank`/`conv_alpha`."""
    from peft import LoraConfig

    exact = "|".join(re.escape(n) for n in targets)
    convs = "|".join(re.escape(n) for n, m in targets.items() if on_conv_rank(m))
    patterns = {rf"^({convs})$": conv_rank} if convs and conv_rank else {}
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=rf"^({exact})$",
                      rank_pattern=patterns, alpha_pattern={k: conv_alpha for k in patterns})


def _folded_state_dict(model) -> dict:
    """peft's LoRA weights of `model` with each module's scale alpha/r folded into its up matrix (lora_B)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    modules = dict(model.named_modules())
    for key in state:
        if ".lora_B." in key:
            state[key] = state[key] * modules[key.split(".lora_B.")[0]].scaling["default"]
    return state


def full_rank(module) -> int:
    """The highest rank an update of `module`'s weight can have: min(out, in) of a linear layer, min(out, in·k·k /
    groups) of a convolution (0 for anything else)."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
        return 0
    return min(weight.shape[0], weight[0].numel())


def _widest(model, pattern: str) -> int:
    """The largest full rank among `model`'s modules whose dotted names match `pattern` (0: none match)."""
    return max((full_rank(m) for name, m in model.named_modules() if re.fullmatch(pattern, name)), default=0)


def check_adaptable(pipe, cfg: LoraTrainConfig) -> None:
    """One line instead of a traceback (or hours of swapping) when the recipe cannot train this model: a denoiser
    that is not a UNet (the recipe is the SD UNet's noise-prediction loss on its attention and conv layers), or a
    rank above the full rank of every layer it adapts (a higher rank adds parameters, never expressiveness: rank
    100000 is gigabytes of adapters on the mini model)."""
    unet = getattr(pipe, "components", {}).get("unet")
    if unet is None:
        denoiser = next((type(v).__name__ for k, v in getattr(pipe, "components", {}).items()
                         if k in ("transformer", "prior") and v is not None), type(pipe).__name__)
        raise UserError(f"lora train: the denoiser of model {cfg.model} is a {denoiser}, not a UNet; the recipe "
                        "trains SD-1.x/2.x/XL UNets only (a transformer LoRA trained elsewhere, in diffusers format, "
                        "loads as --technique lora:DIR)")
    adapted = list(_targets(unet, cfg.conv, LOCON_UNET_BLOCKS, UNET_TARGETS).values())
    if cfg.text_lr > 0:
        adapted += _targets(pipe.text_encoder, cfg.conv, LOCON_TEXT_BLOCKS, TEXT_TARGETS).values()
    widest = max((full_rank(m) for m in adapted if not on_conv_rank(m)), default=0)
    if cfg.rank > widest:
        raise ConfigError("rank", f"must be ≤ {widest} for model {cfg.model} (the full rank of its widest adapted "
                                  f"layer: a higher rank adds only memory), got {cfg.rank}")
    conv_widest = max((full_rank(m) for m in adapted if on_conv_rank(m)), default=0)
    if cfg.conv and cfg.conv_rank > conv_widest:
        raise ConfigError("conv_rank", f"must be ≤ {conv_widest} for the convolutions of model {cfg.model} (the full "
                                       f"rank of its widest adapted convolution), got {cfg.conv_rank}")


def train_lora(cfg: LoraTrainConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """Fit the LoRA, write `cfg.out/pytorch_lora_weights.safetensors` (+ config and losses); returns the folder.

    A finished run of the same config is not trained again; `overwrite` replaces a LoRA run of another config.
    `progress` shows a bar (rate and ETA); the last line printed sums the call up."""
    from difffeat import load_pipeline
    from difffeat.data.images import BadImageError, resize_image
    from difffeat.data.sources import ImageSource
    from difffeat.models.layers import native_resolution
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()  # model loading included: the summary says how long the call took
    cfg.validate()
    refuse_pickled_checkpoints(cfg.out, LEGACY_CHECKPOINTS)
    folder = RunFolder(cfg.out, KIND, cfg, resume=True, overwrite=overwrite, owned=(WEIGHTS, "losses.csv"))
    out = folder.path
    checkpoints = folder.checkpoints
    if folder.continuing and (out / WEIGHTS).is_file() and checkpoints.latest() is None:
        print(watch.finish_line(f"lora train: {out} is trained already (use it as --technique lora:{out})"),
              flush=True)
        return out  # this run is finished
    for flag in ("conv_rank", "conv_alpha"):
        if not cfg.conv and getattr(cfg, flag) != getattr(LoraTrainConfig, flag):
            raise ConfigError(flag, f"sets the {flag[5:]} of the convolution adapters, which only --conv adds; add "
                                    "--conv or leave it out")
    pipe = load_pipeline(cfg.model)
    check_adaptable(pipe, cfg)  # before anything is written: another family, or a rank no layer can hold
    source = ImageSource(cfg.images)
    size = native_resolution(pipe)
    images, captions = [], []
    for item in source.items[: cfg.max_images]:
        try:
            images.append(resize_image(source.load(item), size))
        except BadImageError as e:
            raise UserError(str(e)) from None
        captions.append(_captions(source, item, cfg.captions))
    if not images:
        raise UserError(f"{cfg.images}: no images to train a LoRA on")
    lock = folder.lock()  # one process trains this LoRA at a time
    try:
        folder.create()
        return _fit(cfg, folder, pipe, images, captions, watch, progress)
    finally:
        lock.release()


def _fit(cfg: LoraTrainConfig, folder: RunFolder, pipe, images: list, captions: list[list[str]], watch,
         progress: bool) -> Path:
    """The training of `train_lora` in its created (or continued) run folder."""
    from tqdm.auto import tqdm

    from difffeat.data.images import to_tensor

    out, checkpoints = folder.path, folder.checkpoints
    samples = [(i, c) for i, caps in enumerate(captions) for c in caps]
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    with torch.no_grad():
        x = to_tensor(images) * 2 - 1
        post = pipe.vae.encode(x).latent_dist
        mean, std = post.mean, post.std
    torch.manual_seed(cfg.seed)  # the adapters' initial weights
    unet.add_adapter(_peft_config(cfg.rank, cfg.alpha, _targets(unet, cfg.conv, LOCON_UNET_BLOCKS, UNET_TARGETS),
                                  cfg.conv_rank, cfg.conv_alpha))
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.unet_lr}]
    if cfg.text_lr > 0:
        from peft import inject_adapter_in_model

        # peft directly: transformers' own add_adapter insists on a newer peft than some installs have.
        targets = _targets(text_encoder, cfg.conv, LOCON_TEXT_BLOCKS, TEXT_TARGETS)
        inject_adapter_in_model(_peft_config(cfg.rank, cfg.alpha, targets), text_encoder)
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": cfg.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    params = [p for g in groups for p in g["params"]]
    steps = cfg.steps or max(1, cfg.epochs * cfg.repeats * len(samples) // cfg.batch_size)
    start = 0
    if (ck := checkpoints.latest()) is not None:
        saved = ck.load("params")
        for i, p in enumerate(params):
            p.data.copy_(saved[str(i)])
        opt.load_state_dict(ck.load("optimizer"))
        start = ck.step
    tok = pipe.tokenizer
    alphas = pipe.scheduler.alphas_cumprod
    scale = pipe.vae.config.scaling_factor
    gen = torch.Generator()
    log = out / "losses.csv"
    if start == 0:
        log.write_text("step,loss,seconds\n")
    unet.train()
    text_encoder.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), total=steps, initial=start, desc="lora train", unit="it", disable=not progress)
    for step in bar:
        gen.manual_seed(cfg.seed * 1_000_003 + step)
        pick = torch.randint(len(samples), (cfg.batch_size,), generator=gen).tolist()
        idx = [samples[k][0] for k in pick]
        ids = tok([samples[k][1] for k in pick], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, text_encoder(ids)[0]).sample, noise)
        if not torch.isfinite(loss):
            raise UserError(f"the LoRA training loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with open(log, "a") as f:
            f.write(f"{step},{loss.item():.6f},{time.time() - t0:.1f}\n")
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            checkpoints.save(step + 1, params={str(i): p.detach() for i, p in enumerate(params)},
                             optimizer=opt.state_dict())
    unet.eval()
    text_encoder.eval()
    text_layers = _folded_state_dict(text_encoder) if cfg.text_lr > 0 else None
    type(pipe).save_lora_weights(out, unet_lora_layers=_folded_state_dict(unet),
                                 text_encoder_lora_layers=text_layers, safe_serialization=True)
    os.chmod(out / WEIGHTS, FILE_MODE)  # safetensors makes it 0600; the rest of the run follows the umask
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the weights are written: the run is done
    print(f"LoRA written to {out} (use it as --technique lora:{out})", flush=True)
    print(watch.finish_line(f"lora train: {steps - start} steps on {len(images)} images to {out} ({WEIGHTS}, "
                            "losses.csv)", count=steps - start, unit="it"), flush=True)
    return out
