"""Pictures of a mini training run for docs/: the loss curve and a sample grid from fine captions.

These are named documentation files (``mini_loss.png``, ``mini_samples.png``, ``mini_samples.txt``,
``mini_quality.json``) that `difffeat zoo report` exists to make again; each is written atomically, and
nothing else in the folder is touched.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from difffeat.spine.run import mkdir
from difffeat.utils.atomic import atomic_path, write_atomic


def plot_losses(losses_csv: str | Path, out_png: str | Path) -> None:
    """One panel per stage (VAE, UNet) of `losses.csv`, loss against step, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(losses_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        steps = [int(r["step"]) for r in rows if r["stage"] == stage]
        loss = [float(r["loss"]) for r in rows if r["stage"] == stage]
        ax.plot(steps, loss, lw=1)
        ax.set(title=f"{stage} training loss", xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png, what="loss curve") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def sample_grid(pipe, out_png: str | Path, n: int = 16, seed: int = 0, scale: int = 2,
                progress: bool = False) -> list[str]:
    """Held-out scenes (top row of each pair) above samples from their fine captions; returns the captions.
    `progress` shows a bar over the denoising steps."""
    from PIL import Image

    from difffeat.zoo.quality import heldout_scenes
    from difffeat.zoo.sampling import grid, sample

    scenes = heldout_scenes(n, seed)
    captions = [s.fine_caption for s in scenes]
    samples = sample(pipe, captions, seed=seed, progress=progress)
    cols = 8
    tiles = []
    for start in range(0, n, cols):
        tiles += [Image.fromarray(s.image) for s in scenes[start : start + cols]]
        tiles += samples[start : start + cols]
    g = grid(tiles, cols=cols)
    with atomic_path(out_png, what="sample grid") as tmp:
        g.resize((g.width * scale, g.height * scale), Image.NEAREST).save(tmp, format="PNG")
    return captions


def write_mini_report(run: str | Path, model: str, out_dir: str | Path, seed: int = 0, progress: bool = False) -> dict:
    """Loss curve, sample grid and quality numbers of a mini model into `out_dir` (docs/); `progress` shows a bar
    for the samples and one for the quality checks."""
    from difffeat.zoo import load_pipeline
    from difffeat.zoo.quality import evaluate_quality

    out_dir = mkdir(out_dir)
    plot_losses(Path(run) / "losses.csv", out_dir / "mini_loss.png")
    captions = sample_grid(load_pipeline(model), out_dir / "mini_samples.png", seed=seed, progress=progress)
    write_atomic(out_dir / "mini_samples.txt", "\n".join(captions) + "\n")
    report = evaluate_quality(model, seed=seed, progress=progress)
    write_atomic(out_dir / "mini_quality.json", json.dumps(report, indent=1) + "\n")
    return report
