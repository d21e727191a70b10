"""`difffeat bench`: extraction throughput, memory and where the time goes, against baselines in the same run.

Contenders, on the same model, layers, timestep, images and speed options:

- **difffeat**: `difffeat extract` end to end (`run_extraction`): decoding, prompts, VAE, hooked UNet pass
  with early exit, copy to the host, store writing; the model is loaded once, before the clock starts.
- **bare** (``--compare bare``): the compute alone: images already decoded and on the device, batched VAE
  encode and UNet pass to the deepest layer, nothing copied back or written. The ceiling.
- **naive** (``--compare naive``): the per-image loop of ddpm-segmentation / the content-shift paper's
  code: batch 1, VAE posterior sample, full UNet pass with hooks, features kept in RAM, saved at the end.

Diffusion transformers (SD3, PixArt, FLUX; e.g. ``--model mini-dit --layer dit-middle``) run the same contenders
on their own inputs (`difffeat.models.dit`): the VAE's latents shifted and scaled, noise at σ(t) (flow matching) or
DDPM's, the transformer's own conditioning from the empty prompt, and image tokens laid back on the patch grid;
bare stops the transformer after the deepest requested block. The phase named "unet" is then the transformer's.
A preset built on the meta device (``sd3-medium-random`` …) has no weights to run: one clear error.

For each: images/s, peak memory (CUDA allocator peak; sampled RSS on the CPU) and seconds per image in each
phase (decode, vae, text, unet, copy, write; "other" is the rest), phases synchronised with the GPU. With
``--repeats R`` the contenders run R times, alternated, and each keeps its best, so that a passing load on a
shared machine does not decide a ratio. Images per CPU-second (this process and its decoding workers) are
given too: on a CPU shared with other jobs they measure the work done, which waiting for a core does not blur.
The JSON adds the machine, the load average and library versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from difffeat.extraction.fastpath import ATTENTION_BACKENDS
from difffeat.spine.run import Config, ConfigError, option

CONTENDERS = ("difffeat", "bare", "naive")
SPLIT = ("decode", "vae", "text", "unet", "copy", "write")


@dataclass
class BenchConfig(Config):
    """What `difffeat bench` measures; its flags are made from these fields."""

    model: str = option("mini")
    layers: list[str] = option(default_factory=lambda: ["auto"], flag="--layer", metavar="LAYER",
                               help="module name or preset (auto: dift on a UNet, dit-middle on a transformer; "
                                    "dift, gdf-legacy, hyperfeatures, dit-blocks, dit-middle); repeat (default auto)")
    resolution: list[int] | None = option(None, flag="--size", nargs=2, metavar=("H", "W"), min=1,
                                          help="image size (default: the model's native one)")
    batch_size: str | int = option(16, min=1, metavar="B|auto", help="images per batch, or auto (probed, cached)")
    dtype: str = option("fp32", choices=("fp32", "fp16", "bf16"))
    attention: str = option("sdpa", choices=ATTENTION_BACKENDS[1:])
    compile: bool = option(False, help="torch.compile the UNet (the warm-up is timed apart)")
    compile_backend: str = option("inductor")
    compile_mode: str = option("default", choices=("default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"))
    channels_last: bool = option(False)
    n: int = option(256, min=1, help="images per contender")
    naive_n: int | None = option(None, min=1, help="images for the naive loop (default: --n; it is slow on big models)")
    compare: list[str] = option(default_factory=list, choices=("naive", "bare"),
                                help="baselines to measure too: naive (batch-1 loop), bare (compute alone); repeat")
    timestep: int = option(50, flag="--t", min=0)
    ensemble: int = option(1, min=1)
    workers: int | None = option(None, min=0, help="decoding workers of difffeat (default as extract)")
    background_write: bool = option(True, help="difffeat writes its store on a background thread")
    max_memory: float | None = option(None, above=0, help="GiB batches may take (--batch-size auto)")
    store_dtype: str = option("float32", choices=("float32", "float16"), help="dtype difffeat stores features in")
    images: str | None = option(None, help="bench on these images (default: --n synthetic Shapes-LT scenes at --size)")
    tmp_dir: str | None = option(None, help="where the inputs and stores go while measured (default: the system's "
                                            "temporary folder; /dev/shm keeps a slow disk out of the numbers)")
    repeats: int = option(1, min=1, help="runs of each contender, alternated; each keeps its best")
    materialize: bool = option(False, help="give a real-size preset built on the meta device (sd3-medium-random, "
                                           "pixart-sigma-random, flux-random) random weights, so that it runs at the "
                                           "real cost; needs the real model's memory")
    json_out: str | None = option(None, flag="--json", help="also write the results (JSON) to this file")

    def __post_init__(self):
        if isinstance(self.batch_size, str) and self.batch_size.strip().isdigit():
            self.batch_size = int(self.batch_size)

    def check(self) -> None:
        if isinstance(self.batch_size, bool) or not (self.batch_size == "auto" or isinstance(self.batch_size, int)):
            raise ConfigError("batch_size", f"must be a whole number ≥ 1 or auto, got {self.batch_size!r}")
        if self.resolution is not None and len(self.resolution) != 2:
            raise ConfigError("resolution", f"must be [height, width], got {self.resolution!r}")


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device) -> dict:
    """What the numbers were measured on."""
    import torch

    from difffeat.spine.run import library_versions
    from difffeat.utils.measure import device_name, free_memory, is_cuda

    info = {"device": str(device), "device_name": device_name(device), "platform": platform.platform(),
            "cpu": device_name("cpu"), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "memory_total_bytes": free_memory(device)[1]}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=f"{props.major}.{props.minor}")
    versions = library_versions()
    try:
        import xformers

        versions["xformers"] = xformers.__version__
    except ImportError:
        versions["xformers"] = "not installed"
    info["versions"] = versions
    return info


# ----------------------------------------------------------------------------------------------- inputs
def synthetic_images(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """n Shapes-LT scenes resized to `size`, as PNG files (decoding them costs what real inputs cost)."""
    from PIL import Image

    from difffeat.data.shapes_lt import iter_scenes

    folder.mkdir(parents=True, exist_ok=True)
    height, width = size
    for i, scene in enumerate(iter_scenes("train", n, seed=0)):
        image = Image.fromarray(scene.image)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:06d}.png", compress_level=1)
    return folder


# ------------------------------------------------------------------------------------------- contenders
def _empty_text(pipe, batch: int, resolution: tuple[int, int]) -> tuple:
    """The empty prompt's embedding [batch, T, D] and the denoiser's extra conditions for it as its call takes them,
    repeated (what a prompt-free run conditions on)."""
    from difffeat.models.backbones import backbone_for

    backbone = backbone_for(pipe)
    embeds, added = backbone.encode_prompts([""])
    rep = lambda v: v[:1].expand(batch, *v.shape[1:])
    added = backbone.call_conditions(None if added is None else {k: rep(v) for k, v in added.items()}, resolution)
    model = backbone.model
    return rep(embeds[0][None]).to(model.device, model.dtype), added


def run_bare(pipe, x, layers: list[str], size: tuple[int, int], t: int, ensemble: int, batch: int, timer) -> None:
    """VAE encode (shifted, scaled) + noise at t + the denoiser to the deepest layer (its capture hooks' early exit),
    `batch` images at a time; images already on the device. The backbone makes the call and the maps."""
    import torch

    from difffeat.extraction.capture import Capture
    from difffeat.extraction.extract import encode_latents
    from difffeat.models.backbones import backbone_for

    backbone = backbone_for(pipe)
    generator = torch.Generator().manual_seed(0)
    text, added = _empty_text(pipe, 1, size)  # once: the compute is what is measured
    latent_hw = _latent_hw(pipe, x)
    with torch.no_grad(), backbone.feature_maps(layers, latent_hw, size) as to_map, \
            Capture(backbone.model, layers, latent_hw, to_map=to_map) as cap:
        for s in range(0, len(x), batch):
            with timer.phase("vae"):
                z = encode_latents(pipe, x[s : s + batch], batch_size=batch).repeat_interleave(ensemble, 0)
            with timer.phase("unet"):
                noise = torch.randn(z.shape, generator=generator).to(z)
                zt = backbone.noise_latents(z, noise, t)
                rows = None if added is None else {k: v.expand(len(z), *v.shape[1:]) for k, v in added.items()}
                args, kwargs = backbone.call(zt, torch.full((len(z),), t, device=z.device),
                                             text.expand(len(z), -1, -1), rows)
                cap.run(*args, **kwargs)


def _latent_hw(pipe, x) -> tuple[int, int]:
    from difffeat.models.layers import latent_size

    return latent_size(pipe, x.shape[-2], x.shape[-1])


def run_naive(pipe, paths: list[Path], size: tuple[int, int], layers: list[str], t: int, ensemble: int, out: Path,
              timer) -> None:
    """The per-image loop: decode, VAE sample, full denoiser pass with hooks (a transformer's image tokens to maps),
    features kept in RAM, saved at the end."""
    import torch

    from difffeat.models.backbones import backbone_for
    from difffeat.models.maps import first_tensor

    backbone = backbone_for(pipe)
    model = backbone.model
    latent_hw = _latent_hw(pipe, torch.empty(1, 3, *size))
    modules = dict(model.named_modules())
    current: dict = {}
    with backbone.feature_maps(layers, latent_hw, size) as to_map:
        as_map = to_map or (lambda name, output: first_tensor(output))
        hooks = [modules[n.split(":")[0]].register_forward_hook(
            lambda m, a, o, n=n: current.__setitem__(n, as_map(n, o))) for n in layers]
        try:
            with torch.no_grad():
                emb, added = _empty_text(pipe, 1, size)

                def one_pass(z):
                    zt = backbone.noise_latents(z, torch.randn_like(z), t)
                    args, kwargs = backbone.call(zt, torch.tensor([t], device=z.device), emb, added)
                    model(*args, **kwargs)

                kept = _per_image(pipe.vae, paths, size, layers, ensemble, current, one_pass, timer)
        finally:
            for h in hooks:
                h.remove()
    _save_naive(kept, out, timer)


def _per_image(vae, paths: list[Path], size: tuple[int, int], layers: list[str], ensemble: int, current: dict,
               one_pass, timer) -> list[dict]:
    """The naive loops' body (UNet and transformer alike): per image, decode, then `ensemble` times a VAE sample
    (shifted and scaled as the model's latents are) and `one_pass(latents)`, whose hooks fill `current`; the
    hooked outputs copied to the host and averaged over the ensemble, kept in RAM."""
    import torch

    from difffeat.data.images import load_image, resize_image, to_tensor

    shift = vae.config.get("shift_factor") or 0.0  # SD3 / FLUX latents are shifted before scaling
    kept = []
    for p in paths:
        with timer.phase("decode"):
            x = to_tensor([resize_image(load_image(p), size)]).to(vae.device, vae.dtype) * 2 - 1
        feats = []
        for _ in range(ensemble):
            with timer.phase("vae"):
                z = (vae.encode(x).latent_dist.sample() - shift) * vae.config.scaling_factor
            with timer.phase("unet"):
                one_pass(z)
            with timer.phase("copy"):
                feats.append({n: v.float().cpu() for n, v in current.items()})
        kept.append({n: torch.stack([f[n] for f in feats]).mean(0).numpy() for n in layers})
    return kept


def _save_naive(kept: list[dict], out: Path, timer) -> None:
    """The naive loops' features, one .npy per image and layer (as a per-image script saves them)."""
    import numpy as np

    with timer.phase("write"):
        for i, f in enumerate(kept):
            for n, v in f.items():
                np.save(out / f"{i}_{n.replace(':', '_')}.npy", v)


def _check_materialised(pipe, model: str) -> None:
    """A UserError when the model has no values (a real-size preset built on the meta device)."""
    from difffeat.models.backbones import denoiser

    if any(p.is_meta for p in denoiser(pipe).parameters()):
        raise UserError(f"--model {model}: built on the meta device (layer names and shapes, no weights), so there "
                        "is nothing to run; give it random weights with --materialize (the real model's memory), "
                        "or bench a model with weights (e.g. mini-dit)")


# ------------------------------------------------------------------------------------------------ bench
def _cpu_seconds() -> float:
    """CPU time of this process and of the children it waited for (decoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _measure(fn, device, n: int, sync) -> dict:
    """Run `fn(timer)`; images/s, wall seconds, peak memory and the phase split of `n` images."""
    from difffeat.utils.measure import PeakMemory, PhaseTimer

    timer = PhaseTimer(sync)
    with PeakMemory(device, interval=0.005) as mem:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        fn(timer)
        if sync:
            sync()
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    split = timer.as_dict()
    ms = {k: round(1000 * split.get(k, 0.0) / n, 3) for k in SPLIT}
    ms["other"] = round(max(0.0, 1000 * seconds / n - sum(ms.values())), 3)
    background = {k: round(1000 * split[k] / n, 3) for k in ("decode_busy", "write_busy") if k in split}
    return {"images": n, "seconds": round(seconds, 4), "images_per_second": round(n / seconds, 3),
            "cpu_seconds": round(cpu, 4), "images_per_cpu_second": round(n / cpu, 3) if cpu > 0 else None,
            "peak_memory_bytes": int(mem.peak), "added_memory_bytes": int(mem.added),
            "ms_per_image": ms, "background_ms_per_image": background}


def _readable_images(cfg: BenchConfig) -> list[Path]:
    """The first `cfg.n` images of `cfg.images`, each decoded once to be sure it can be: a bench of files that cannot
    be read would time nothing (a UserError naming how many and the first, before any model loads)."""
    from difffeat.data.images import BadImageError, discover_images, load_image

    paths = [it.path for it in discover_images(str(cfg.images))][: cfg.n]
    bad = []
    for path in paths:
        try:
            load_image(path)
        except BadImageError as e:
            bad.append(e)
    if bad:
        raise UserError(f"{cfg.images}: {len(bad)} of {len(paths)} images cannot be read (first: {bad[0]}); bench "
                        "measures readable images only: remove them or give another folder")
    return paths


@contextlib.contextmanager
def _temporary_folder(parent: str | None):
    """A temporary folder for the inputs and stores (in `parent`, or the system's), removed after; one line naming
    the folder when it cannot be made there."""
    try:
        folder = tempfile.TemporaryDirectory(prefix="difffeat-bench-", dir=parent)
    except OSError as e:
        raise ConfigError("tmp_dir", f"cannot make a temporary folder in {parent or tempfile.gettempdir()} "
                                     f"({e.strerror or e})") from None
    with folder as path:
        yield Path(path)


def _subset(folder: Path, paths: list[Path]) -> Path:
    """A folder of links to `paths` (a part of the inputs, without copying them)."""
    folder.mkdir()
    for p in paths:
        os.symlink(p.resolve(), folder / p.name)
    return folder


def bench(cfg: BenchConfig, warn=None, pipe=None) -> dict:
    """Measure the contenders (see the module doc); returns the results (what the JSON holds). `pipe`: the
    loaded `cfg.model` in `cfg.dtype` (several benches of one model then load it once)."""
    cfg.validate()
    given = _readable_images(cfg) if cfg.images else None  # before the model loads: bad inputs are refused first
    if cfg.tmp_dir is not None and not Path(cfg.tmp_dir).is_dir():
        raise ConfigError("tmp_dir", f"{cfg.tmp_dir}: no such folder")
    import torch

    from difffeat.extraction.fastpath import Compiled, channels_last, use_attention, warn_line
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction
    from difffeat.models.backbones import denoiser
    from difffeat.models.layers import native_resolution, resolve_layers
    from difffeat.utils.measure import device_sync
    from difffeat.zoo import load_pipeline

    warn = warn or warn_line
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = device_sync(device)
    pipe = pipe if pipe is not None else load_pipeline(cfg.model, device=device, dtype=cfg.dtype)
    if cfg.materialize:
        from difffeat.zoo.dit_presets import materialize
        from difffeat.zoo.registry import as_dtype

        if materialize(pipe, as_dtype(cfg.dtype)):
            pipe.to(device)
    _check_materialised(pipe, cfg.model)
    size = tuple(cfg.resolution) if cfg.resolution else native_resolution(pipe)
    layers = resolve_layers(pipe, cfg.layers, *size)
    attention = use_attention(pipe, cfg.attention, device, warn)
    machine = machine_info(device)
    results: dict[str, dict] = {}
    extract_reports = []
    with _temporary_folder(cfg.tmp_dir) as tmp:
        if given is None:
            from difffeat.data.images import discover_images

            given = [it.path for it in discover_images(str(synthetic_images(tmp / "images", cfg.n, size)))]
        paths = given[: cfg.n]
        n = len(paths)
        images = _subset(tmp / "inputs", paths)  # exactly the n images, whatever else the folder holds
        runs = 0  # extract runs so far (each writes a store of its own)

        def extract_cfg(out: Path, subset: Path) -> ExtractRunConfig:
            return ExtractRunConfig(
                images=str(subset), out=str(out), model=cfg.model, layers=layers, timesteps=[cfg.timestep],
                ensemble=cfg.ensemble, batch_size=cfg.batch_size, resolution=list(size), dtype=cfg.dtype,
                workers=cfg.workers, background_write=cfg.background_write, compile=cfg.compile,
                compile_backend=cfg.compile_backend, compile_mode=cfg.compile_mode, channels_last=cfg.channels_last,
                attention_backend=attention, max_memory=cfg.max_memory, store_dtype=cfg.store_dtype)

        def difffeat_run(timer, subset=images) -> None:
            nonlocal runs
            runs += 1
            store = tmp / f"store{runs}"
            report = run_extraction(extract_cfg(store, subset), progress=False, pipe=pipe, timer=timer)
            if report["failed"]:  # a rate over images that were skipped would be no rate at all
                first = report["failed"][0]
                raise UserError(f"{cfg.images}: {len(report['failed'])} image(s) could not be extracted (first: "
                                f"{first['key']}: {first['reason']}); bench measures images that extract whole")
            extract_reports.append(report)

        # Warm-up, not timed: the batch-size probe (auto; then cached), compiling (the padded batch has the full
        # shape from the first image on) and first-call costs at the full batch shape.
        from difffeat.utils.measure import NullTimer

        t0 = time.perf_counter()
        difffeat_run(NullTimer(), _subset(tmp / "warm1", paths[:1]))
        sizing = extract_reports[-1]["batch_sizing"]
        batch = extract_reports[-1]["batch_size"]
        if batch > 1 and n > 1:
            difffeat_run(NullTimer(), _subset(tmp / "warm2", paths[:batch]))
        warmup = {"seconds": round(time.perf_counter() - t0, 3), "batch_size": batch, "batch_sizing": sizing}
        for store in tmp.glob("store*"):
            shutil.rmtree(store)

        x = None
        if "bare" in cfg.compare:
            from difffeat.data.images import load_image, resize_image, to_tensor

            vae = pipe.vae
            x = to_tensor([resize_image(load_image(p), size) for p in paths]).to(vae.device)

        def bare_run(timer) -> None:
            with contextlib.ExitStack() as stack:
                stack.enter_context(channels_last(denoiser(pipe), cfg.channels_last))
                stack.enter_context(channels_last(pipe.vae, cfg.channels_last))
                if cfg.compile:
                    stack.enter_context(Compiled(denoiser(pipe), cfg.compile_backend,
                                                 None if cfg.compile_mode == "default" else cfg.compile_mode, warn))
                run_bare(pipe, x, layers, size, cfg.timestep, cfg.ensemble, batch, timer)

        naive_paths = paths[: cfg.naive_n or n]

        def naive_run(timer) -> None:
            out = tmp / f"naive{runs}"
            out.mkdir(exist_ok=True)
            run_naive(pipe, naive_paths, size, layers, cfg.timestep, cfg.ensemble, out, timer)

        contenders = {"difffeat": (difffeat_run, n)}
        if "bare" in cfg.compare:
            bare_run(NullTimer())  # its own warm-up (a compiled UNet without hooks' early exit is another graph)
            contenders["bare"] = (bare_run, n)
        if "naive" in cfg.compare:
            contenders["naive"] = (naive_run, len(naive_paths))
        for _ in range(cfg.repeats):
            for name, (fn, count) in contenders.items():
                measured = _measure(fn, device, count, sync)
                for store in tmp.glob("store*"):  # measured; a big model's features take gigabytes
                    shutil.rmtree(store)
                history = results.get(name, {}).get("runs", []) + [measured]
                best = max(history, key=lambda r: r["images_per_second"])
                results[name] = {**best, "runs": history,
                                 "best_images_per_cpu_second": max(r["images_per_cpu_second"] or 0 for r in history)}
    ratios = {}
    for rate, tag in (("images_per_second", ""), ("best_images_per_cpu_second", "_cpu")):
        ips = {k: v[rate] for k, v in results.items()}
        if "bare" in ips and ips["difffeat"]:
            ratios["bare_over_difffeat" + tag] = round(ips["bare"] / ips["difffeat"], 3)
        if "naive" in ips and ips["naive"]:
            ratios["difffeat_over_naive" + tag] = round(ips["difffeat"] / ips["naive"], 3)
    last = extract_reports[-1] if extract_reports else {}
    return {
        "config": {**cfg.to_dict(), "layers": layers, "resolution": list(size), "batch_size": batch},
        "attention": attention,
        "compile_failed": last.get("speed", {}).get("compile", {}).get("failed"),
        "warmup": warmup,
        "machine": machine,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "contenders": results,
        "ratios": ratios,
    }


# ------------------------------------------------------------------------------------------------ output
def rate(per_second: float) -> str:
    """A rate with three significant digits below 10 (a real-size model on a CPU runs at 0.025 images/s, which
    one decimal would print as 0.0), one decimal above."""
    return f"{per_second:.3g}" if per_second < 10 else f"{per_second:.1f}"


def table(result: dict) -> str:
    """The results as a Markdown table with a header line (what the run was, on what)."""
    from difffeat.utils.progress import human_bytes

    cfg, machine = result["config"], result["machine"]
    head = (f"{cfg['model']} {cfg['resolution'][0]}×{cfg['resolution'][1]}, layers {' '.join(cfg['layers'])}, "
            f"t={cfg['timestep']}, {cfg['dtype']}, batch {cfg['batch_size']}"
            + (" (auto)" if result["warmup"]["batch_sizing"] and result["warmup"]["batch_sizing"].get("source")
               in ("probe", "cache") else "")
            + f", attention {result['attention']}, compile {'on' if cfg['compile'] else 'off'}"
            + (" (failed: ran eagerly)" if result.get("compile_failed") else "")
            + f", channels-last {'on' if cfg['channels_last'] else 'off'}; {machine['device_name']}"
            + (f", load {machine['load_average'][0]:.1f}" if machine.get("load_average") else ""))
    rows = [head, "",
            "| contender | images | images/s | images/CPU-s | peak memory | " + " | ".join(SPLIT)
            + " | other (ms/img) |",
            "|---|---|---|---|---|" + "---|" * (len(SPLIT) + 1)]
    for name, r in result["contenders"].items():
        split = " | ".join(f"{r['ms_per_image'][k]:.2f}" for k in (*SPLIT, "other"))
        cpu = r.get("best_images_per_cpu_second") or 0
        rows.append(f"| {name} | {r['images']} | {rate(r['images_per_second'])} | {rate(cpu)} | "
                    f"{human_bytes(r['peak_memory_bytes'])} | {split} |")
    ratios = result["ratios"]
    if ratios:
        rows.append("")
        if "bare_over_difffeat" in ratios:
            rows.append(f"- bare / difffeat: {ratios['bare_over_difffeat']:.3f}× by wall time, "
                        f"{ratios['bare_over_difffeat_cpu']:.3f}× by CPU time (1.00 = no overhead over the compute)")
        if "difffeat_over_naive" in ratios:
            rows.append(f"- difffeat / naive: {ratios['difffeat_over_naive']:.2f}× by wall time, "
                        f"{ratios['difffeat_over_naive_cpu']:.2f}× by CPU time")
    return "\n".join(rows)


def cmd_bench(args) -> None:
    from difffeat.spine.config_cli import config_from_args

    cfg = config_from_args(BenchConfig, args)
    if cfg.json_out:
        from difffeat.spine.run import check_new_file

        check_new_file(cfg.json_out, overwrite=args.overwrite, what="JSON")
    result = bench(cfg)
    print(table(result))
    text = json.dumps(result, indent=1)
    if cfg.json_out:
        from difffeat.utils.atomic import write_json_atomic

        write_json_atomic(Path(cfg.json_out), result)
    else:
        print(text)


def add_bench_command(sub) -> None:
    """`difffeat bench` (flags from `BenchConfig`)."""
    from difffeat.spine.config_cli import add_config_arguments

    p = sub.add_parser("bench", help="extraction throughput, memory and time split against baselines")
    add_config_arguments(p, BenchConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: difffeat bench …")
