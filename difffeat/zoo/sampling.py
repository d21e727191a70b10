"""Text-to-image sampling with DDIM: how a user sees what a model has learned (`difffeat sample`).

A sample folder is a run folder of the spine (kind "sample"): its `config.json` repeats the run, a folder
difffeat did not write is never written into, and an earlier run's samples are replaced only with
``overwrite`` (and only they: other files in the folder stay).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import ConfigError, RunFolder
from difffeat.utils.atomic import atomic_path

SAMPLE_FILES = ("[0-9][0-9][0-9][0-9]*.png", "grid.png")  # a sample run's own pictures


def read_captions(path: str | os.PathLike, column: str = "fine_caption", n: int | None = None) -> list[str]:
    """The `column` of a metadata CSV (Shapes-LT / imagefolder convention), first `n` rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise UserError(f"{path}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])})")
        captions = [row[column] for row in reader]
    return captions[:n] if n is not None else captions


def ddim_pipeline(pipe):
    """The same pipeline with a DDIM scheduler built from its own scheduler's config."""
    from diffusers import DDIMScheduler

    return type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})


def sample(pipe, prompts: list[str], steps: int = 50, guidance: float = 4.0, seed: int = 0, batch_size: int = 32,
           progress: bool = False, bar=None):
    """PIL images for `prompts`; image i uses noise seeded by (seed, i), independent of batching.

    `progress` shows one bar over the denoising steps of all batches (rate and ETA); a caller's tqdm `bar` is
    moved on by one per step instead. Either only watches: the images are the same without them."""
    import torch
    from tqdm.auto import tqdm

    from difffeat.utils.progress import step_callback

    ddim = ddim_pipeline(pipe)
    ddim.set_progress_bar_config(disable=True)  # diffusers' own bar starts again for every batch
    starts = range(0, len(prompts), batch_size)
    own = tqdm(total=steps * len(starts), desc="sample", unit="step", disable=not progress) if bar is None else None
    watched = bar if bar is not None else own
    hooks = {} if watched.disable else {"callback_on_step_end": step_callback(watched)}
    images = []
    try:
        for start in starts:
            chunk = prompts[start : start + batch_size]
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
            out = ddim(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **hooks)
            images += out.images
    finally:
        if own is not None:
            own.close()
    return images


def grid(images, cols: int = 8, pad: int = 2):
    """Tile PIL images into one grid image."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    cols = min(cols, len(images))
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        canvas.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return canvas


def sample_to_folder(prompts: list[str], out: str | os.PathLike, model: str = "mini", steps: int = 50,
                     guidance: float = 4.0, seed: int = 0, progress: bool = True, overwrite: bool = False) -> Path:
    """Write one PNG per prompt (``0000.png``, …), `grid.png`, and `config.json` (the run: model, prompts,
    steps, guidance, seed and library versions) to the sample run folder `out`."""
    from difffeat.zoo import load_pipeline

    if steps < 1:
        raise ConfigError("steps", f"must be ≥ 1, got {steps}")
    if not math.isfinite(guidance):
        raise ConfigError("guidance", f"must be a finite number, got {guidance}")
    config = {"model": str(model), "prompts": list(prompts), "steps": steps, "guidance": guidance, "seed": seed,
              "scheduler": "DDIMScheduler"}
    # Checked before the model loads: a folder that cannot be written to costs nothing.
    folder = RunFolder(out, "sample", config, overwrite=overwrite, owned=SAMPLE_FILES, resumable=False)
    pipe = load_pipeline(model)
    images = sample(pipe, prompts, steps=steps, guidance=guidance, seed=seed, progress=progress)
    folder.create()
    for name, image in [*((f"{i:04d}.png", im) for i, im in enumerate(images)), ("grid.png", grid(images))]:
        with atomic_path(folder.file(name), what="sample image") as tmp:
            image.save(tmp, format="PNG")
    return folder.path
