"""An extraction run: an image source in, a FeatureStore out, a report beside it (`difffeat extract`).

The same code runs in one process or under `accelerate launch` / `torchrun`: process r takes every
world_size-th image (sorted by key) and writes its own shards; noise seeded per image key makes the
union identical to a one-process run. Bad images are skipped and named in the report; an interrupted
run continues with `resume=True` and never redoes an image in a finished shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from difffeat.errors import UserError
from difffeat.extraction.fastpath import ATTENTION_BACKENDS
from difffeat.spine.run import Config, ConfigError, option
from difffeat.store.feature_store import SHARDING_FIELDS
from difffeat.utils.atomic import write_json_atomic

PROMPT_SOURCES = ("fixed", "sidecar", "csv", "label")


@dataclass
class ExtractRunConfig(Config):
    """Everything that defines an extraction run; stored in the manifest, and a run can be repeated from it.

    The `difffeat extract` flags are made from these fields (`difffeat.spine.config_cli`); `noise`, `store_dtype` and
    `variants` are set by flags of another shape (``--clean``, ``--fp16-store``, ``--variant`` / ``--variants``).
    """

    images: str = option(help="image folder (recursive), glob, imagefolder, or a data set LAYOUT:ROOT[:SPLIT] "
                                 "(ade20k, cityscapes, voc, coco-stuff, ddpm-seg, hf, shapes-lt; docs/datasets.md)")
    out: str = option(help="feature store folder")
    model: str = option("mini")
    layers: list[str] = option(default_factory=lambda: ["auto"], flag="--layer", metavar="LAYER",
                               help="module name or preset (auto: dift on a UNet, dit-middle on a transformer; "
                                    "dift, gdf-legacy, hyperfeatures, dit-blocks, dit-middle); repeat (default auto)")
    timesteps: list[int] = option(default_factory=lambda: [50], flag="--t", metavar="T", min=0,
                                  help="timestep; repeat for several (default 50)")
    seed: int = option(0)
    ensemble: int = option(1, min=1, help="noise draws averaged per image and timestep")
    batch_size: str | int = option(8, min=1, metavar="B|auto",
                                   help="images per batch, or auto: the largest batch that fits and still pays, "
                                        "found by probing (cached per model, size and device)")
    noise: bool = option(True, cli=False, help="False (clean mode): the UNet sees the clean latent at t")
    posterior: str = option("mean", choices=("mean", "sample"))
    prompt: str = option("", help="prompt for every image (or the fallback of --prompt-from)")
    prompt_source: str = option("fixed", choices=PROMPT_SOURCES, flag="--prompt-from",
                                help="sidecar: <image>.txt; csv: --caption-column of --captions-csv; "
                                     "label: --label-template")
    captions_csv: str | None = option(None, help="CSV with file_name and caption/label columns "
                                                 "(default: each image's own metadata row)")
    caption_column: str = option("fine_caption")
    label_template: str = option("a photo of a {label}")
    resolution: list[int] | None = option(None, flag="--size", nargs=2, metavar=("H", "W"), min=1,
                                          help="resize images to this (default: native)")
    resize: str = option("center-crop", choices=("center-crop", "pad", "stretch"))
    dtype: str = option("fp32", choices=("fp32", "fp16", "bf16"))
    store_dtype: str = option("float32", choices=("float32", "float16"), cli=False)
    concat: bool = option(False, help="resize all layers to one size and concatenate")
    concat_size: list[int] | None = option(None, nargs=2, metavar=("H", "W"), min=1)
    concat_resize: str = option("bilinear", choices=("bilinear", "nearest"),
                                help="how --concat resizes maps (nearest reproduces GDF's gdf-legacy output)")
    capture: str = option("output", choices=("output", "input"))
    attention: list[str] = option(default_factory=list,
                                  help="attention module whose maps to keep (UNet cross-attention; a transformer's "
                                       "image→text: SD3/FLUX transformer_blocks.N.attn, FLUX "
                                       "single_transformer_blocks.N.attn, PixArt transformer_blocks.N.attn2), "
                                       "or a preset (gdf-up-cross: GDF's attention feature); repeat")
    attention_prompt: str | None = option(None, help="one fixed prompt for the attention maps (as GDF), from a "
                                                     "pass of their own; default: each image's prompt")
    techniques: list[str] = option(default_factory=list, flag="--technique", metavar="SPEC",
                                   help="generation technique for every variant, e.g. controlnet:canny,scale=1.0 "
                                        "lora:DIR prompt:fine denoise-from:60 cfg:7.5; repeat "
                                        "(`difffeat techniques` lists them)")
    # name → technique specs; empty: one plain run
    variants: dict[str, list[str]] = option(default_factory=dict, cli=False)
    shard_size: int = option(256, min=1)
    # Independent jobs (other machines, a cluster's job array) each take every num_shards-th image, from
    # shard_index; `difffeat store merge` joins their stores.
    shard_index: int = option(0, min=0, help="this job's part of the images: every --num-shards-th, from this one")
    num_shards: int = option(1, min=1, help="independent jobs sharing the images (merge their stores with "
                                            "`difffeat store merge`)")
    # Fast paths (difffeat.models.loading, difffeat.extraction.write_behind, difffeat.extraction.fastpath,
    # difffeat.extraction.autobatch): how the features are computed, never which (up to float rounding); none of them is
    # part of the store's config.
    workers: int | None = option(None, min=0, help="image-decoding worker processes (default: up to 4 on CUDA, "
                                                   "none on the CPU, where they take cores from the model)")
    background_write: bool = option(True, help="write the store on a background thread, so compute never waits "
                                               "on the disk")
    background_decode: bool = option(True, help="without --workers, decode the next batches on a thread while the "
                                                "model works")
    compile: bool = option(False, help="torch.compile the UNet (once per batch shape; minutes of warm-up, "
                                       "worth it for long runs)")
    compile_backend: str = option("inductor", help="torch.compile backend (aot_eager / eager check the compiled "
                                                   "path without a compiler)")
    compile_mode: str = option("default", choices=("default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"),
                               help="torch.compile mode (reduce-overhead: CUDA graphs)")
    channels_last: bool = option(False, help="channels-last memory layout for the UNet and VAE (faster convolutions "
                                             "on recent GPUs in fp16/bf16)")
    pad_batches: bool = option(False, help="fill a short batch with copies of its last image (dropped after): "
                                           "features then never depend on how images fall into batches, so "
                                           "sharded, merged or resumed runs equal one run bit for bit (always "
                                           "on with --compile: one shape)")
    attention_backend: str = option("auto", choices=ATTENTION_BACKENDS,
                                    help="auto: xformers on CUDA when installed, else torch SDPA")
    max_memory: float | None = option(None, above=0, help="GiB of memory batches may take (default: 90%% of what "
                                                          "the device has free); --batch-size auto and the fit "
                                                          "check use it")

    # Fields that never change a feature: not in the store's config, so a run may change them on --resume.
    RUN_ONLY: ClassVar[tuple[str, ...]] = (
        "out", "batch_size", "shard_size", "workers", "background_write", "background_decode", "compile",
        "compile_backend", "compile_mode", "channels_last", "pad_batches", "attention_backend", "max_memory")
    SHARDING: ClassVar[tuple[str, ...]] = SHARDING_FIELDS
    # The data set the images came from (layout, root, split): the store records it for train-seg and eval-seg;
    # a repeated run reads the images named by `images` again.
    recorded_fields: ClassVar[tuple[str, ...]] = ("data",)

    def __post_init__(self):
        if isinstance(self.batch_size, str) and self.batch_size.strip().isdigit():  # "16" from the command line
            self.batch_size = int(self.batch_size)

    def check(self) -> None:
        for name in ("resolution", "concat_size"):
            value = getattr(self, name)
            if value is not None and len(value) != 2:
                raise ConfigError(name, f"must be [height, width], got {value!r}")
        if isinstance(self.batch_size, bool) or not (self.batch_size == "auto" or isinstance(self.batch_size, int)):
            raise ConfigError("batch_size", f"must be a whole number ≥ 1 or auto, got {self.batch_size!r}")
        if self.shard_index >= self.num_shards:
            raise ConfigError("shard_index", f"must be below num_shards ({self.num_shards}), got {self.shard_index}")

    def store_config(self) -> dict:
        """The part of the config that defines the features (not where they come from or go, nor how fast)."""
        cfg = self.to_dict()
        for k in self.RUN_ONLY:
            cfg.pop(k)
        if self.num_shards == 1:  # an unsharded store's config is what it always was
            for k in self.SHARDING:
                cfg.pop(k)
        for k, default in (("attention_prompt", None), ("concat_resize", "bilinear")):
            if cfg[k] == default:  # likewise for stores made before these options
                cfg.pop(k)
        return cfg


class PromptSource:
    """Per-image prompts from the run config: one fixed text, sidecar files, a metadata column or a label template.

    Columns come from `captions_csv` when given (keyed by file_name relative to the image folder), else
    from the image's own metadata row (imagefolder `metadata.csv`, or a dataset's columns).
    """

    def __init__(self, cfg: ExtractRunConfig, source):
        from difffeat.data.images import read_caption_table

        cfg.validate()  # an unknown prompt source fails here, naming the field
        self.cfg, self.source = cfg, source
        self.column = cfg.caption_column if cfg.prompt_source == "csv" else "label"
        self.table = read_caption_table(cfg.captions_csv, self.column) if cfg.captions_csv else None
        self._next = {a.key: b for a, b in zip(source.items, source.items[1:] + source.items[:1])}

    def caption(self, item) -> str | None:
        """The image's own caption: its sidecar `.txt`, else the caption column of its metadata or captions CSV."""
        from difffeat.data.images import sidecar_caption

        caption = (sidecar_caption(item.path) if item.path else None) or \
            (self.source.row(item) or {}).get(self.cfg.caption_column)
        if caption is None and self.table is not None and self.column != "label":
            caption = self.table.get(item.key)
        return None if caption is None else str(caption)

    def fields(self, item) -> dict:
        """The image's prompt-template fields: caption, label, and the next image's caption (`other_caption`)."""
        from difffeat.data.images import BadImageError

        label = (self.source.row(item) or {}).get("label")
        other = self._next.get(item.key)
        try:  # another image's unreadable caption is that image's failure, not this one's
            other_caption = None if other is None or other.key == item.key else self.caption(other)
        except BadImageError:
            other_caption = None
        return {"caption": self.caption(item), "label": None if label is None else str(label),
                "other_caption": other_caption}

    def __call__(self, item) -> str:
        from difffeat.data.images import label_prompt, sidecar_caption

        kind = self.cfg.prompt_source
        if kind == "fixed":
            return self.cfg.prompt
        if kind == "sidecar":
            return (sidecar_caption(item.path) if item.path else None) or self.cfg.prompt
        if self.table is not None:
            value = self.table.get(item.key)
            where = self.cfg.captions_csv
        else:
            value = (self.source.row(item) or {}).get(self.column)
            where = "its metadata (or give a captions_csv)"
        if value is None:
            raise UserError(f"{item.key}: no {self.column!r} in {where}")
        return str(value) if kind == "csv" else label_prompt(self.cfg.label_template, str(value))


def parse_spec(spec: str) -> str:
    """A technique spec in its canonical form (checks it, too), by the installed technique provider."""
    from difffeat.extraction.conditioning import technique_provider

    return technique_provider().canonical_spec(spec)


def run_extraction(cfg: ExtractRunConfig, overwrite: bool = False, resume: bool = False, progress: bool = True,
                   pipe=None, timer=None) -> dict:
    """Extract features for every image of `cfg.images` into the store `cfg.out`; returns the run report.

    `timer` (a `difffeat.utils.measure.PhaseTimer`) receives the seconds of each phase (`difffeat bench`).
    """
    return ExtractionRun(cfg, overwrite=overwrite, resume=resume, progress=progress, pipe=pipe, timer=timer).run()


class ExtractionRun:
    """One `extract` run, in the steps `run` takes: the processes of the launch, the inputs, the model, one
    extractor per variant, the store (what is done already, what is this process's share), the fast paths and
    the batch size, the batch loop, the report. Each step leaves what the next needs on the run."""

    def __init__(self, cfg: ExtractRunConfig, overwrite: bool = False, resume: bool = False, progress: bool = True,
                 pipe=None, timer=None):
        from difffeat.utils.measure import NullTimer

        cfg.validate()  # before torch and the model load
        self.cfg, self.overwrite, self.resume, self.progress = cfg, overwrite, resume, progress
        self.pipe, self.timer = pipe, timer or NullTimer()
        self.failures: list[dict] = []
        self.extracted = self.captioned = 0

    def run(self) -> dict:
        self.start_processes()
        self.find_inputs()
        self.load_model()
        self.build_extractors()
        self.open_store()
        with contextlib.ExitStack() as stack:
            self.set_up(stack)
            self.extract(stack)
        return self.finish()

    # ------------------------------------------------------------------------------------------- steps
    def start_processes(self) -> None:
        """This process's place in the launch (accelerate); refuses a launch accelerate does not see whole."""
        import torch
        from accelerate import PartialState

        # Without CUDA, accelerate starts the gloo (CPU) group only when asked for CPU explicitly.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world:  # never let several processes write as if each were alone
            raise UserError(f"launched as {launched} processes but accelerate sees {self.world}; check the "
                            "launcher's flags")
        self.device = self.state.device

    def find_inputs(self) -> None:
        from difffeat.data.sources import ImageSource

        self.source = ImageSource(self.cfg.images, exclude=[self.cfg.out])  # a store inside its input is not input
        self.items = self.source.items
        self.prompts = PromptSource(self.cfg, self.source)

    def load_model(self) -> None:
        from difffeat.models.prompts import PromptEncoder
        from difffeat.zoo import load_pipeline

        if self.pipe is None:
            self.pipe = load_pipeline(self.cfg.model, device=str(self.device), dtype=self.cfg.dtype)
        self.encoder = PromptEncoder(self.pipe)  # variants share text embeddings (per LoRA weights)

    def build_extractors(self) -> None:
        """One extractor per variant (the plain one when there are none), and the store's config."""
        from difffeat.extraction.extract import FeatureExtractor

        cfg = self.cfg
        self.first_batch = cfg.batch_size if isinstance(cfg.batch_size, int) else 1  # "auto" is settled in set_up
        self.extractors = {
            name: FeatureExtractor(
                self.pipe, cfg.layers, timesteps=cfg.timesteps, ensemble=cfg.ensemble, seed=cfg.seed, noise=cfg.noise,
                techniques=[*cfg.techniques, *specs], batch_size=self.first_batch, posterior=cfg.posterior,
                resolution=tuple(cfg.resolution) if cfg.resolution else None, capture_inputs=cfg.capture == "input",
                attention=cfg.attention, prompt_encoder=self.encoder, attention_prompt=cfg.attention_prompt,
                timer=self.timer, pad_batches=cfg.compile)
            for name, specs in (cfg.variants or {"": []}).items()
        }
        self.extractor = next(iter(self.extractors.values()))
        store_cfg = cfg.store_config()
        # Canonical spec strings: the manifest names each technique one way, and repeating a run from it works.
        store_cfg.update(layers=self.extractor.layers, resolution=list(self.extractor.resolution),
                         techniques=[parse_spec(x) for x in cfg.techniques],
                         variants={name: [parse_spec(x) for x in specs] for name, specs in cfg.variants.items()})
        if self.source.data is not None:  # which data set, layout and split: train-seg finds the masks from it
            store_cfg["data"] = self.source.data
        self.store_cfg = store_cfg

    def open_store(self) -> None:
        """The store's writer (rank 0 creates or checks it before the others open it), and this process's images
        still to do."""
        from difffeat.store.feature_store import FeatureStoreWriter

        cfg, rank = self.cfg, self.rank
        self.made_folder = not os.path.lexists(cfg.out)
        writer = None
        if rank == 0:
            writer = FeatureStoreWriter(cfg.out, self.store_cfg, shard_size=cfg.shard_size, dtype=cfg.store_dtype,
                                        rank=rank, overwrite=self.overwrite, resume=self.resume)
            if writer.continuing:  # inputs changed or deleted since they were extracted: drop them (noted)
                writer.discard(writer.stale_keys(self.source.stamps()))
        self.state.wait_for_everyone()
        if rank != 0:
            writer = FeatureStoreWriter(cfg.out, self.store_cfg, shard_size=cfg.shard_size, dtype=cfg.store_dtype,
                                        rank=rank, resume=True)
        self.writer = writer
        done = writer.done_keys()
        self.ours = self.items[cfg.shard_index :: cfg.num_shards][rank :: self.world]  # the job's, then the process's
        self.mine = [it for it in self.ours if it.key not in done]

    def set_up(self, stack: contextlib.ExitStack) -> None:
        """The writer held, the fast paths on (attention backend, channels-last, compile) and the batch size
        settled (probed for "auto"), each undone when `stack` closes."""
        import torch

        from difffeat.extraction.fastpath import Compiled, channels_last, use_attention, warn_line
        from difffeat.models import dit
        from difffeat.utils.measure import is_cuda

        cfg, pipe, writer = self.cfg, self.pipe, self.writer
        self.warn = warn_line if self.rank == 0 else _silent
        if is_cuda(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.rank == 0 and self.world == 1 and not writer.continuing:
            # Runs after the writer has let go: a store this call made and that got nothing (refused for memory, a
            # failing first batch) is taken away again, so that a retry with other settings finds no store.
            made = self.made_folder
            stack.push(lambda kind, error, tb: _remove_unstarted(writer, made) if kind else None)
        stack.enter_context(writer)  # whatever fails below, the writer keeps what is complete and lets go
        self.speed = {"attention": use_attention(pipe, cfg.attention_backend, self.device, self.warn),
                      "channels_last": cfg.channels_last}
        stack.enter_context(channels_last(dit.denoiser(pipe), cfg.channels_last))
        if getattr(pipe, "vae", None) is not None:
            stack.enter_context(channels_last(pipe.vae, cfg.channels_last))
        t_probe = time.perf_counter()
        self.batch_size, self.sizing = (_batch_size(cfg, self.extractor, self.device, self.store_cfg) if self.mine
                                        else (self.first_batch, None))
        self.speed["batch_size_seconds"] = round(time.perf_counter() - t_probe, 3)
        for ext in self.extractors.values():
            ext.batch_size = self.batch_size
        self.compiled = None
        if cfg.compile and self.mine:
            self.compiled = stack.enter_context(Compiled(dit.denoiser(pipe), cfg.compile_backend,
                                                         None if cfg.compile_mode == "default" else cfg.compile_mode,
                                                         self.warn))

    def extract(self, stack: contextlib.ExitStack) -> None:
        """The batch loop: decoded batches in, features (or a failure per image) out to the store."""
        from tqdm.auto import tqdm

        from difffeat.extraction.write_behind import WriteBehind
        from difffeat.models.loading import BatchLoader, default_workers
        from difffeat.utils.measure import is_cuda

        cfg, timer, batch_size = self.cfg, self.timer, self.batch_size
        self.workers = default_workers(self.device) if cfg.workers is None else cfg.workers
        chunks = [self.mine[s : s + batch_size] for s in range(0, len(self.mine), batch_size)]
        # Workers fork here, before the writer's thread and the progress bar's start.
        batches = iter(BatchLoader(self.source, self.prompts, chunks, self.extractor.resolution, cfg.resize,
                                   workers=self.workers, pin_memory=is_cuda(self.device) and self.workers > 0,
                                   thread=cfg.background_decode))
        stack.callback(getattr(batches, "close", lambda: None))  # a decoding thread stops with the run
        out = stack.enter_context(WriteBehind(self.writer, threaded=cfg.background_write, timer=timer))
        bar = stack.enter_context(tqdm(total=len(self.mine), desc=f"extract[{self.rank}]" if self.world > 1
                                       else "extract", unit="img", disable=not self.progress or self.rank != 0))
        self.t0 = time.perf_counter()
        while True:
            with timer.phase("decode"):  # what the loop waits for decoding (all of it without workers)
                batch = next(batches, None)
            if batch is None:
                break
            if batch.error is not None:
                raise UserError(batch.error)
            timer.add("decode_busy", batch.decode_seconds)
            self._batch(batch, out)
            bar.update(batch.size)

    def _batch(self, batch, out) -> None:
        """One decoded batch: images a technique cannot take (a missing caption) recorded as failures, the rest
        extracted (padded to the batch size where one shape is needed) and written."""
        import torch

        from difffeat.data.geometry import placement

        cfg, batch_size = self.cfg, self.batch_size
        bad = [(item, reason) for item, reason in batch.failed]
        rows = []
        for j, item in enumerate(batch.items):  # what a technique needs (a caption) and the image lacks
            why = next((w for e in self.extractors.values() if (w := e.stack.missing(item.key, batch.fields[j]))),
                       None)
            if why is None:
                rows.append(j)
            else:
                bad.append((item, why))
        for item, reason in bad:
            self.failures.append({"key": item.key, "reason": reason})
            out.fail(item.key, reason)
        if not rows:
            return
        x = batch.pixels if len(rows) == len(batch.items) else batch.pixels[rows]
        keys = [batch.items[j].key for j in rows]
        texts, fields = [batch.texts[j] for j in rows], [batch.fields[j] for j in rows]
        if (cfg.pad_batches or cfg.compile) and len(rows) < batch_size:  # one batch shape, whatever is left
            pad = batch_size - len(rows)
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
            keys, texts, fields = keys + keys[-1:] * pad, texts + texts[-1:] * pad, fields + fields[-1:] * pad
        try:
            feats, captions = _features(self.extractors, x, keys, texts, fields, cfg, self.timer)
        except Exception as e:
            from difffeat.extraction.autobatch import is_out_of_memory

            if not is_out_of_memory(e):
                raise
            raise _ran_out(batch_size, self.device, self.sizing, cfg.max_memory) from None
        keys = keys[: len(rows)]
        places = [placement(batch.sizes[j], self.extractor.resolution, cfg.resize) for j in rows]
        out.add(keys, {name: f[: len(rows)] for name, f in feats.items()}, [batch.stamps[j] for j in rows],
                captions[: len(rows)], [None if p.identity else p.to_dict() for p in places])
        self.extracted += len(rows)
        self.captioned += sum(1 for c in captions[: len(rows)] if c)

    def finish(self) -> dict:
        """The run's report (also written to the store, one per process)."""
        from difffeat.utils.measure import NullTimer, peak_device_memory
        from difffeat.utils.progress import peak_memory_bytes

        cfg, mine = self.cfg, self.mine
        seconds = time.perf_counter() - self.t0 if mine else 0.0
        speed = self.speed
        if self.compiled is not None:
            speed["compile"] = {"backend": cfg.compile_backend, "mode": cfg.compile_mode,
                                "failed": self.compiled.failed}
        speed.update(workers=self.workers if mine else 0, background_write=cfg.background_write,
                     background_decode=cfg.background_decode and not (mine and self.workers))
        report = {
            "rank": self.rank,
            "world_size": self.world,
            "shard": [cfg.shard_index, cfg.num_shards],
            "images_found": len(self.items),
            "images_of_this_process": len(self.ours),
            "already_done": len(self.ours) - len(mine),
            "extracted": self.extracted,
            "captioned": self.captioned,  # images stored with captions (prompt:auto) by this run
            "failed": self.failures,
            "notes": self.writer.notes,
            "seconds": round(seconds, 3),
            "images_per_second": round(self.extracted / seconds, 3) if seconds > 0 and self.extracted else None,
            "batch_size": self.batch_size,
            "batch_sizing": self.sizing,
            "speed": speed,
            "peak_memory_bytes": peak_memory_bytes(),  # resident memory of this process and its decoding workers
            "peak_device_memory_bytes": peak_device_memory(self.device),
        }
        if not isinstance(self.timer, NullTimer):
            report["seconds_by_phase"] = self.timer.as_dict()
        _write_report(Path(cfg.out), report, self.rank, self.world, self.state)
        return report


def _remove_unstarted(writer, made_folder: bool) -> None:
    """After a failed call: remove the store `writer` created when it holds no feature and no failure record yet
    (its manifest and empty shards folder, and the folder itself when the call made it). Anything else there (a
    shard, a failure record, another process's lock, a file of the user's) keeps the store as it is."""
    from difffeat.store.feature_store import MANIFEST, SHARDS

    path = Path(writer.path)
    with contextlib.suppress(OSError):
        if writer.folder.started() or any(p.name.startswith(".lock") for p in path.iterdir()):
            return
        shards = path / SHARDS
        if shards.is_dir() and not any(shards.iterdir()):
            shards.rmdir()
        (path / MANIFEST).unlink(missing_ok=True)
        if made_folder and not any(path.iterdir()):
            path.rmdir()


def _silent(message: str) -> None:  # warnings of processes other than the first: one copy is enough
    pass


def _features(extractors: dict, x, keys: list[str], texts: list[str], fields: list[dict], cfg: ExtractRunConfig,
              timer) -> tuple[dict, list[dict]]:
    """(stored name → [B, …] features, per image the captions techniques gave it) of one batch: one VAE pass
    shared by every variant, then each variant."""
    from difffeat.extraction.extract import concat_features

    first = next(iter(extractors.values()))
    with timer.phase("vae"):
        latents = first.encode_latents(x, keys)  # one VAE pass for every variant
    captions: list[dict] = [{} for _ in keys]
    with timer.phase("text"):  # captions (prompt:auto) are written once here; extract() finds them cached
        for ext in extractors.values():
            for row, derived in zip(captions, ext.stack.image_fields(x, keys)):
                row.update(derived)
    feats = {}
    for name, ext in extractors.items():
        part = ext.extract(x, prompts=texts, keys=keys, fields=fields, latents=latents)
        if cfg.concat:
            part = {"concat": concat_features(part, tuple(cfg.concat_size) if cfg.concat_size else None,
                                              cfg.concat_resize)}
        feats.update({f"{name}/{layer}" if name else layer: f for layer, f in part.items()})
    return feats, captions


def _batch_size(cfg: ExtractRunConfig, extractor, device, store_cfg: dict) -> tuple[int, dict | None]:
    """The batch size to run at and how it was settled: `--batch-size auto` from the cache or by probing; a
    given batch (above 2) checked against the memory there is, refused with the numbers when it cannot fit."""
    import torch

    from difffeat.extraction import autobatch
    from difffeat.utils.measure import device_name

    limit = autobatch.memory_limit(device, cfg.max_memory)
    # From shapes first: a probe at a size that cannot fit would itself be killed without a message.
    element = 2 if cfg.dtype in ("fp16", "bf16") else 4
    copies = len(cfg.timesteps) * max(1, len(cfg.variants))
    estimate = autobatch.check_estimate(extractor.pipe, extractor.layers, extractor.resolution,
                                        1 if cfg.batch_size == "auto" else cfg.batch_size, device, limit,
                                        kept_copies=copies, element_bytes=element)
    probe = autobatch.extraction_probe(extractor, device)
    if cfg.batch_size != "auto":
        # A measured probe costs a pass of one image or more: not when the batch is that small, nor when the
        # estimate from shapes leaves ample room.
        if cfg.batch_size <= 2 or estimate["estimate_bytes"] * autobatch.ROOMY <= limit:
            return cfg.batch_size, {"source": "given", **estimate}
        return cfg.batch_size, {"source": "given", **autobatch.check_fits(probe, cfg.batch_size, device, limit)}
    model = cfg.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    what = {"model": model, "size": list(extractor.resolution), "device": f"{device.type}: {device_name(device)}",
            "dtype": cfg.dtype, "layers": extractor.layers, "timesteps": len(cfg.timesteps), "ensemble": cfg.ensemble,
            "noise": cfg.noise, "techniques": store_cfg["techniques"], "variants": store_cfg["variants"],
            "capture": cfg.capture, "attention": cfg.attention, "concat": cfg.concat,
            "attention_backend": cfg.attention_backend, "channels_last": cfg.channels_last,
            "max_memory": cfg.max_memory, "torch": torch.__version__}
    cached = autobatch.cached_batch_size(what)
    if cached is not None:
        chosen = cached.get("tried", {}).get(str(cached["batch_size"]), {})
        if chosen.get("bytes", float("inf")) <= limit:  # it still fits in what is free now
            return cached["batch_size"], {"source": "cache", **{k: v for k, v in cached.items() if k != "for"}}
    choice = autobatch.choose_batch_size(probe, limit, device=device)
    autobatch.remember_batch_size(what, choice)
    return choice["batch_size"], {"source": "probe", **choice}


def _ran_out(batch_size: int, device, sizing: dict | None, max_memory: float | None) -> UserError:
    """A batch that ran out of device memory: the numbers, and a batch that would fit (smaller than this one,
    whatever the estimate from the start of the run said)."""
    from difffeat.extraction import autobatch
    from difffeat.utils.measure import free_memory
    from difffeat.utils.progress import human_bytes

    autobatch.release(device)
    limit = autobatch.memory_limit(device, max_memory)
    _, total = free_memory(device)
    fit = max(1, batch_size // 2)
    per_image = ""
    measured = (sizing or {}).get("per_image_bytes") or (sizing or {}).get("estimate_per_image_bytes")
    if measured:
        fit = max(1, min(fit, autobatch.fitting_batch(measured, (sizing or {}).get("base_bytes", 0), limit)))
        per_image = f" about {human_bytes(measured)} per image,"
    return UserError(f"batch {batch_size} ran out of memory on {device}:{per_image} {human_bytes(limit)} available "
                     f"of {human_bytes(total or 0)}; batch {fit} would fit: --batch-size {fit} or --batch-size auto")


def _write_report(out: Path, report: dict, rank: int, world: int, state) -> None:
    """Each process writes its part; process 0 merges them into report.json once all are done."""
    write_json_atomic(out / f"report-r{rank:03d}.json", report)
    state.wait_for_everyone()
    if rank == 0:
        parts = [json.loads((out / f"report-r{r:03d}.json").read_text()) for r in range(world)]
        seconds = max(p["seconds"] for p in parts)
        extracted = sum(p["extracted"] for p in parts)
        device_peaks = [p.get("peak_device_memory_bytes") for p in parts if p.get("peak_device_memory_bytes")]
        merged = {
            "images_found": parts[0]["images_found"],
            "extracted": extracted,
            "captioned": sum(p.get("captioned", 0) for p in parts),
            "already_done": sum(p["already_done"] for p in parts),
            "failed": [f for p in parts for f in p["failed"]],
            "notes": [n for p in parts for n in p.get("notes", [])],
            "seconds": seconds,
            "images_per_second": round(extracted / seconds, 3) if seconds > 0 and extracted else None,
            "batch_size": parts[0].get("batch_size"),
            "peak_memory_bytes": max(p.get("peak_memory_bytes") or 0 for p in parts),
            "peak_device_memory_bytes": max(device_peaks) if device_peaks else None,
            "processes": parts,
        }
        write_json_atomic(out / "report.json", merged)
