"""Issue #14's comparison: features of the built-in mini UNet against the built-in mini MMDiT (SD3 architecture), on
the segmentation setup of the content-shift experiment and on pooled classification (docs/experiments/backbones.md).

    python docs/experiments/backbones.py [WORKDIR] [--iterations 200] [--seeds 0 1 2]

WORKDIR defaults to runs/content-shift: the world (400 Shapes-LT scenes), the mini UNet's store and its plain
heads come from docs/experiments/content_shift.py (run it first, or this script makes the world and the UNet
store itself). Steps, each skipped when its output exists:

1. ``extract`` with mini-dit at 128² (a 16×16 token grid), t = 50 (flow matching: σ of the scheduler at t), empty
   prompt, transformer blocks 1–3 raw, with DiTF's AdaLN re-modulation (``:remod``) and with massive-activation
   channels zeroed then re-modulated (``:massive=zero:remod``): one forward per image for all nine maps.
2. ``train_seg`` (the function behind ``difffeat train-seg``): the conv head of the content-shift experiment
   (hidden 32, 200 iterations, batch 4, lr 2e-3), CE and AUCSeg, each seed, for the UNet's gdf-legacy layers (the
   content-shift experiment's "plain" rows, the same runs) and for each DiT form; test split.
3. ``train_cls`` on globally pooled features of the same stores (train split → test split), CE and logit
   adjustment, each seed: accuracy and class-mean accuracy on the test split.
4. Tables (mean ± std over seeds) to WORKDIR/backbones.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

UNET_LAYERS = ["up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0", "up_blocks.2.attentions.2"]  # gdf-legacy
DIT_BLOCKS = ["transformer_blocks.1", "transformer_blocks.2", "transformer_blocks.3"]
DIT_FORMS = {"raw": "", "remod": ":remod", "massive-zero+remod": ":massive=zero:remod"}
LOSSES = ("ce", "aucseg")
CLS_METHODS = ("ce", "la")


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def cli(*args: str) -> None:
    log("$ difffeat", " ".join(args))
    subprocess.run([sys.executable, "-m", "difffeat", "--quiet", *args], check=True,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def prepare(w: Path) -> dict[str, tuple[str, list[str]]]:
    """{row: (store, layers)} for every feature set compared."""
    if not (w / "shapes" / "classes.json").is_file():
        cli("data", "synth", str(w / "shapes"), "--n", "400", "--seed", "0")
    common = ["--t", "50", "--size", "128", "128", "--resize", "stretch", "--shard-size", "50", "--resume"]
    if not (w / "feat" / "report.json").is_file():  # the content-shift store holds more variants; plain is enough
        cli("extract", str(w / "shapes"), "--out", str(w / "feat"), "--variant", "plain=",
            *sum((["--layer", lay] for lay in UNET_LAYERS), []), *common)
    dit_layers = [b + form for form in DIT_FORMS.values() for b in DIT_BLOCKS]
    if not (w / "feat-dit" / "report.json").is_file():
        cli("extract", str(w / "shapes"), "--out", str(w / "feat-dit"), "--model", "mini-dit",
            *sum((["--layer", lay] for lay in dit_layers), []), *common)
    rows = {"mini UNet, gdf-legacy": (str(w / "feat"), [f"plain/{lay}" for lay in UNET_LAYERS])}
    for name, form in DIT_FORMS.items():
        rows[f"mini-dit blocks 1–3, {name}"] = (str(w / "feat-dit"), [b + form for b in DIT_BLOCKS])
    return rows


def seg_runs(w: Path, rows: dict, args) -> dict[str, dict[str, list[dict]]]:
    from difffeat.errors import UserError
    from downstream.seg.config import SegTrainConfig
    from downstream.seg.train import train_seg

    out: dict[str, dict[str, list[dict]]] = {}
    for i, (row, (store, layers)) in enumerate(rows.items()):
        for loss in LOSSES:
            for seed in args.seeds:
                # The UNet row is the content-shift experiment's plain row: the same config, so the same run folder.
                name = f"plain-{loss}-s{seed}" if i == 0 else f"dit-{list(DIT_FORMS)[i - 1]}-{loss}-s{seed}"
                run = w / "seg" / name
                if not (run / "metrics.json").is_file():
                    cfg = SegTrainConfig.from_dict(dict(features=[store], masks=str(w / "shapes"), out=str(run),
                                                        layers=layers, split="train", val_split="test", head="conv",
                                                        hidden=32, loss=loss, iterations=args.iterations, batch_size=4,
                                                        lr=2e-3, seed=seed, checkpoint_every=50, log_every=50))
                    t0 = time.perf_counter()
                    try:
                        train_seg(cfg, resume=True, progress=False)
                    except UserError as e:
                        if "another config" not in str(e):
                            raise
                        train_seg(cfg, overwrite=True, progress=False)
                    log(f"{name}: {time.perf_counter() - t0:.0f} s")
                out.setdefault(row, {}).setdefault(loss, []).append(json.loads((run / "metrics.json").read_text()))
    return out


def cls_runs(w: Path, rows: dict, args) -> dict[str, dict[str, list[dict]]]:
    from downstream.cls.config import ClsTrainConfig
    from downstream.cls.labels import write_labels_csv
    from downstream.cls.train import train_cls

    labels = w / "labels.csv"
    if not labels.is_file():
        write_labels_csv(str(w / "shapes"), str(labels))
    out: dict[str, dict[str, list[dict]]] = {}
    for i, (row, (store, layers)) in enumerate(rows.items()):
        for method in CLS_METHODS:
            for seed in args.seeds:
                run = w / "cls" / f"{'unet' if i == 0 else 'dit-' + list(DIT_FORMS)[i - 1]}-{method}-s{seed}"
                if not (run / "metrics.json").is_file():
                    cfg = ClsTrainConfig(features=[store], labels=str(labels), out=str(run), split="train/",
                                         test_split="test/", layers=layers, method=method, seed=seed)
                    train_cls(cfg, overwrite=True, progress=False)
                    log(f"{run.name} done")
                out.setdefault(row, {}).setdefault(method, []).append(
                    json.loads((run / "metrics.json").read_text())["full_test"])
    return out


def ms(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def markdown(seg: dict, cls: dict) -> str:
    lines = ["| features | loss | mIoU | head | middle | tail |", "|---|---|---|---|---|---|"]
    for row, by_loss in seg.items():
        for loss, runs in by_loss.items():
            lines.append(f"| {row} | {loss} | " + " | ".join(ms([r.get(k) for r in runs]) for k in
                                                              ("miou", "miou_head", "miou_middle", "miou_tail")) + " |")
    lines += ["", "| features (global average pool) | method | test accuracy | class-mean accuracy |",
              "|---|---|---|---|"]
    for row, by_method in cls.items():
        for method, runs in by_method.items():
            lines.append(f"| {row} | {method} | {ms([r['accuracy'] for r in runs])} | "
                         f"{ms([r['class_mean_accuracy'] for r in runs])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?", default="runs/content-shift")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    w = Path(args.workdir)
    t0 = time.perf_counter()
    rows = prepare(w)
    seg = seg_runs(w, rows, args)
    cls = cls_runs(w, rows, args)
    text = markdown(seg, cls) + f"\n\nTime: {(time.perf_counter() - t0) / 60:.1f} min wall (this process)."
    (w / "backbones.json").write_text(json.dumps({"seg": seg, "cls": cls, "settings": vars(args)}, indent=1))
    (w / "backbones.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
