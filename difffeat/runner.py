"""An extraction run: an image source in, a FeatureStore out, a report beside it (`difffeat extract`).

The same code runs in one process or under `accelerate launch` / `torchrun`: process r takes every
world_size-th image (sorted by key) and writes its own shards; noise seeded per image key makes the
union identical to a one-process run. Bad images are skipped and named in the report; an interrupted
run continues with `resume=True` and never redoes an image in a finished shard.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from difffeat.atomic import write_json_atomic
from difffeat.errors import UserError
from difffeat.run import Config, ConfigError, option

PROMPT_SOURCES = ("fixed", "sidecar", "csv", "label")


@dataclass
class ExtractRunConfig(Config):
    """Everything that defines an extraction run; stored in the manifest, and a run can be repeated from it.

    The `difffeat extract` flags are made from these fields (`difffeat.config_cli`); `noise`, `store_dtype` and
    `variants` are set by flags of another shape (``--clean``, ``--fp16-store``, ``--variant`` / ``--variants``).
    """

    images: str = option(help="image folder (recursive), glob, or imagefolder")
    out: str = option(help="feature store folder")
    model: str = option("mini")
    layers: list[str] = option(default_factory=lambda: ["dift"], flag="--layer", metavar="LAYER",
                               help="module name or preset (dift, gdf-legacy, hyperfeatures); repeat")
    timesteps: list[int] = option(default_factory=lambda: [50], flag="--t", metavar="T", min=0,
                                  help="timestep; repeat for several (default 50)")
    seed: int = option(0)
    ensemble: int = option(1, min=1, help="noise draws averaged per image and timestep")
    batch_size: int = option(8, min=1)
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
    capture: str = option("output", choices=("output", "input"))
    attention: list[str] = option(default_factory=list,
                                  help="attention module whose cross-attention maps to keep")
    techniques: list[str] = option(default_factory=list, flag="--technique", metavar="SPEC",
                                   help="generation technique for every variant, e.g. controlnet:canny,scale=1.0 "
                                        "lora:DIR prompt:fine denoise-from:60 cfg:7.5; repeat "
                                        "(`difffeat techniques` lists them)")
    # name → technique specs; empty: one plain run
    variants: dict[str, list[str]] = option(default_factory=dict, cli=False)
    shard_size: int = option(256, min=1)

    def check(self) -> None:
        for name in ("resolution", "concat_size"):
            value = getattr(self, name)
            if value is not None and len(value) != 2:
                raise ConfigError(name, f"must be [height, width], got {value!r}")

    def store_config(self) -> dict:
        """The part of the config that defines the features (not where they come from or go)."""
        cfg = self.to_dict()
        for k in ("out", "batch_size", "shard_size"):
            cfg.pop(k)  # batch size and sharding never change a feature
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
        label = (self.source.row(item) or {}).get("label")
        other = self._next.get(item.key)
        return {"caption": self.caption(item), "label": None if label is None else str(label),
                "other_caption": None if other is None or other.key == item.key else self.caption(other)}

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
    from difffeat.conditioning import technique_provider

    return technique_provider().canonical_spec(spec)


def run_extraction(cfg: ExtractRunConfig, overwrite: bool = False, resume: bool = False, progress: bool = True,
                   pipe=None) -> dict:
    """Extract features for every image of `cfg.images` into the store `cfg.out`; returns the run report."""
    cfg.validate()  # before torch and the model load
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from difffeat.data.images import BadImageError, resize_image, to_tensor
    from difffeat.data.sources import ImageSource
    from difffeat.extract import FeatureExtractor, concat_features
    from difffeat.store import FeatureStoreWriter
    from difffeat.zoo import load_pipeline

    # Without CUDA, accelerate starts the gloo (CPU) group only when asked for CPU explicitly.
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # never let several processes write as if each were alone
        raise UserError(f"launched as {launched} processes but accelerate sees {world}; check the launcher's flags")
    source = ImageSource(cfg.images, exclude=[cfg.out])  # a store inside its input folder is not an input
    items = source.items
    prompts = PromptSource(cfg, source)
    if pipe is None:
        pipe = load_pipeline(cfg.model, device=str(state.device), dtype=cfg.dtype)
    from difffeat.prompts import PromptEncoder

    encoder = PromptEncoder(pipe)  # variants share text embeddings (per LoRA weights)
    extractors = {
        name: FeatureExtractor(
            pipe, cfg.layers, timesteps=cfg.timesteps, ensemble=cfg.ensemble, seed=cfg.seed, noise=cfg.noise,
            techniques=[*cfg.techniques, *specs], batch_size=cfg.batch_size, posterior=cfg.posterior,
            resolution=tuple(cfg.resolution) if cfg.resolution else None, capture_inputs=cfg.capture == "input",
            attention=cfg.attention, prompt_encoder=encoder)
        for name, specs in (cfg.variants or {"": []}).items()
    }
    extractor = next(iter(extractors.values()))
    store_cfg = cfg.store_config()
    # Canonical spec strings: the manifest names each technique one way, and repeating a run from it works.
    store_cfg.update(layers=extractor.layers, resolution=list(extractor.resolution),
                     techniques=[parse_spec(x) for x in cfg.techniques],
                     variants={name: [parse_spec(x) for x in specs] for name, specs in cfg.variants.items()})
    # Rank 0 creates (or checks) the store before the others open it.
    writer = None
    if rank == 0:
        writer = FeatureStoreWriter(cfg.out, store_cfg, shard_size=cfg.shard_size, dtype=cfg.store_dtype,
                                    rank=rank, overwrite=overwrite, resume=resume)
        if writer.continuing:  # inputs changed or deleted since they were extracted: drop them (noted)
            writer.discard(writer.stale_keys(source.stamps()))
    state.wait_for_everyone()
    if rank != 0:
        writer = FeatureStoreWriter(cfg.out, store_cfg, shard_size=cfg.shard_size, dtype=cfg.store_dtype,
                                    rank=rank, resume=True)
    done = writer.done_keys()
    mine = [it for it in items[rank::world] if it.key not in done]
    failures: list[dict] = []
    t0 = time.perf_counter()
    extracted = 0
    bar = tqdm(total=len(mine), desc=f"extract[{rank}]" if world > 1 else "extract", unit="img",
               disable=not progress or rank != 0)
    with writer:
        for s in range(0, len(mine), cfg.batch_size):
            chunk = mine[s : s + cfg.batch_size]
            batch, images, texts, fields = [], [], [], []
            for item in chunk:
                try:
                    image = resize_image(source.load(item), extractor.resolution, cfg.resize)
                    text, item_fields = prompts(item), prompts.fields(item)
                    why = next((w for e in extractors.values() if (w := e.stack.missing(item.key, item_fields))),
                               None)
                    if why is not None:
                        raise BadImageError(item.key, why)
                except BadImageError as e:
                    failures.append({"key": item.key, "reason": e.reason})
                    writer.fail(item.key, e.reason)
                    continue
                images.append(image)
                texts.append(text)
                fields.append(item_fields)
                batch.append(item)
            if batch:
                keys = [it.key for it in batch]
                x = to_tensor(images)
                latents = extractor.encode_latents(x, keys)  # one VAE pass for every variant
                feats = {}
                for name, ext in extractors.items():
                    part = ext.extract(x, prompts=texts, keys=keys, fields=fields, latents=latents)
                    if cfg.concat:
                        part = {"concat": concat_features(part, tuple(cfg.concat_size) if cfg.concat_size else None)}
                    feats.update({f"{name}/{layer}" if name else layer: f for layer, f in part.items()})
                for row, item in enumerate(batch):
                    writer.add(item.key, {name: f[row] for name, f in feats.items()}, stamp=source.stamp(item))
                extracted += len(batch)
            bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - t0
    report = {
        "rank": rank,
        "world_size": world,
        "images_found": len(items),
        "images_of_this_process": len(items[rank::world]),
        "already_done": len(items[rank::world]) - len(mine),
        "extracted": extracted,
        "failed": failures,
        "notes": writer.notes,
        "seconds": round(seconds, 3),
        "images_per_second": round(extracted / seconds, 3) if seconds > 0 and extracted else None,
    }
    _write_report(Path(cfg.out), report, rank, world, state)
    return report


def _write_report(out: Path, report: dict, rank: int, world: int, state) -> None:
    """Each process writes its part; process 0 merges them into report.json once all are done."""
    write_json_atomic(out / f"report-r{rank:03d}.json", report)
    state.wait_for_everyone()
    if rank == 0:
        parts = [json.loads((out / f"report-r{r:03d}.json").read_text()) for r in range(world)]
        merged = {
            "images_found": parts[0]["images_found"],
            "extracted": sum(p["extracted"] for p in parts),
            "already_done": sum(p["already_done"] for p in parts),
            "failed": [f for p in parts for f in p["failed"]],
            "notes": [n for p in parts for n in p.get("notes", [])],
            "processes": parts,
        }
        write_json_atomic(out / "report.json", merged)
