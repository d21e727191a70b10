"""Issue #12's experiment: does the chain GATE → extract → amalgamate give better segmentation heads than plain
features, and does GATE's ranking predict which techniques help? (docs/experiments/content_shift.md)

    python docs/experiments/content_shift.py [WORKDIR] [--scenes 400] [--iterations 200] [--seeds 0 1 2]

Every step is difffeat's own command or API, and every step is skipped when its output is there, so an
interrupted run goes on where it stopped:

1. ``data synth``: a Shapes-LT world (80/10/10 train/val/test).
2. ``lora train``: a LoRA on 30 training images (LoCon, conv layers too, when ``lora train --conv`` exists).
3. ``gate``: img2img with and without each of the candidates below on 16 validation images, with ``--emit``.
   The base prompt is empty (plain = no technique); prompt techniques set it.
4. ``extract``: the whole world at 128² (a 32×32 feature grid), gdf-legacy layers, plain + every candidate as
   variants of one store; and the attention feature (cross-attention maps of the up blocks, one fixed prompt)
   into a second store.
5. ``train_seg`` (in this process, the same code as ``difffeat train-seg``; a fresh interpreter per run would
   cost more than the run): conv head, CE and AUCSeg, each seed, for plain, every candidate alone, and plain +
   GATE's accepted candidates (at most 2) fused by concat / weighted / amalgamate n = 1, 2, 3, with and without
   the attention feature; scored on the test split.
6. The tables (mean ± std over seeds), per-class IoU, and Spearman ρ over the candidates between GATE's scores
   (primary: PSNR; the paper's feature Score) and the heads' mIoU, with 95% bootstrap intervals (images of
   the GATE run and seeds of the heads resampled). Written to WORKDIR/results.{json,md} and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CANDIDATES = {  # name → technique specs; `lora` is filled in with the LoRA trained in step 2
    "caption": ["prompt:caption"],
    "fine": ["prompt:fine"],
    "canny": ["controlnet:canny"],
    "lora": None,
    "canny-caption": ["controlnet:canny", "prompt:caption"],
    "other-caption": ["prompt:other-caption"],  # another image's caption: meant to hurt
}
LAYERS = ["up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0", "up_blocks.2.attentions.2"]  # gdf-legacy on mini
ATTENTION_PROMPT = "a scene of shapes: circle, square, triangle, star, ring, cross, on a textured background"
FUSIONS = [("concat", {}), ("weighted", {"variants": "weighted"}),
           *[(f"amalgamate-n{n}", {"variants": "amalgamate", "assigners": n}) for n in (1, 2, 3)]]
LOSSES = ("ce", "aucseg")


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def cli(*args: str) -> None:
    """One difffeat command, as a user types it (one thread, offline)."""
    log("$ difffeat", " ".join(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "difffeat", "--quiet", *args], check=True, env=env)


def help_text(*command: str) -> str:
    return subprocess.run([sys.executable, "-m", "difffeat", *command, "--help"], capture_output=True,
                          text=True).stdout


# ------------------------------------------------------------------------------------------ steps 1–4
def prepare(w: Path, args) -> dict:
    if not (w / "shapes" / "classes.json").is_file():
        sizes = ["--splits", *map(str, args.splits)] if args.splits else ["--n", str(args.scenes)]
        cli("data", "synth", str(w / "shapes"), *sizes, "--seed", "0")
    locon = "--conv" in help_text("lora", "train")
    if not (w / "lora" / "pytorch_lora_weights.safetensors").is_file():
        cli("lora", "train", str(w / "shapes" / "train" / "images"), "--out", str(w / "lora"), "--rank", "8",
            "--alpha", "8", "--unet-lr", "1e-3", "--text-lr", "0", "--steps", str(args.lora_steps), "--max-images",
            "30", "--batch-size", "4", *(["--conv"] if locon else []))
    candidates = {k: (v if v is not None else [f"lora:{w / 'lora'}"]) for k, v in CANDIDATES.items()}
    (w / "candidates.yaml").write_text("".join(f"{k}: [{', '.join(v)}]\n" for k, v in candidates.items()))
    if not (w / "gate" / "ranking.json").is_file():
        cli("gate", str(w / "shapes" / "val"), "--candidates", str(w / "candidates.yaml"), "--out", str(w / "gate"),
            "--n", "16", "--layer", "gdf-legacy", "--emit", str(w / "gate" / "variants.yaml"), "--overwrite")
    variants = {"plain": [], **candidates}
    (w / "variants.yaml").write_text("variants:\n" + "".join(f"  {k}: [{', '.join(v)}]\n" for k, v in variants.items()))
    # Small shards: an interrupted extraction resumes from the last finished shard.
    common = ["--t", "50", "--size", "128", "128", "--resize", "stretch", "--shard-size", "50"]
    if not (w / "feat" / "manifest.json").is_file() or not (w / "feat" / "report.json").is_file():
        cli("extract", str(w / "shapes"), "--out", str(w / "feat"), "--variants", str(w / "variants.yaml"),
            *sum((["--layer", lay] for lay in LAYERS), []), *common, "--resume")
    if not (w / "feat-attn" / "report.json").is_file():
        if "--attention-prompt" in help_text("extract"):  # the GDF attention feature as a preset
            attention = ["--layer", LAYERS[-1], "--attention", "gdf-up-cross", "--attention-prompt", ATTENTION_PROMPT]
        else:  # one cross-attention layer per resolution, the prompt fixed for every image
            attention = ["--layer", LAYERS[-1], "--prompt", ATTENTION_PROMPT,
                         "--attention", "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
                         "--attention", "up_blocks.2.attentions.2.transformer_blocks.0.attn2"]
        cli("extract", str(w / "shapes"), "--out", str(w / "feat-attn"), *attention, *common, "--resume")
    ranking = json.loads((w / "gate" / "ranking.json").read_text())
    return {"candidates": candidates, "ranking": ranking, "locon": locon}


def fused_set(ranking: dict) -> tuple[list[str], str]:
    """Plain + GATE's accepted candidates (at most 2, rank order); when none is accepted, the best two."""
    order = [r["candidate"] for r in ranking["ranking"] if r["candidate"] != "reference"]
    accepted = [c for c in order if c in ranking["accepted"]][:2]
    if len(accepted) == 2:
        return ["plain", *accepted], "plain + GATE's two best accepted candidates"
    chosen = (accepted + [c for c in order if c not in accepted])[:2]
    return ["plain", *chosen], (f"plain + {', '.join(chosen)}: GATE accepted {len(accepted)}, filled up with the "
                                "next best by its ranking")


# --------------------------------------------------------------------------------------------- step 5
def attention_layers(w: Path) -> list[str]:
    from difffeat import FeatureStore

    return [lay for lay in FeatureStore(w / "feat-attn").layers if lay.endswith(":probs")]


def rows(w: Path, prep: dict, attention: bool = True) -> list[dict]:
    """Every head to train: name, stores, layers, head options and a priority (lower trains first)."""
    feat, attn = str(w / "feat"), str(w / "feat-attn")
    layers_of = (lambda variants: [f"{v}/{lay}" for v in variants for lay in LAYERS])
    # Priorities: plain and GATE's first choice, then plain + its choices concatenated and amalgamated (n = 2), then
    # the other candidates (GATE's ranking against the heads), then the other fusions; the long-tail rows last.
    fused, _ = fused_set(prep["ranking"])
    out = [{"row": "plain", "group": "single", "priority": 0, "features": [feat], "layers": layers_of(["plain"])}]
    out += [{"row": c, "group": "single", "priority": 0 if c == fused[1] else 2, "features": [feat],
             "layers": layers_of([c])} for c in prep["candidates"]]
    for name, opts in FUSIONS:
        out.append({"row": name, "group": "fused", "priority": 1 if name in ("concat", "amalgamate-n2") else 3,
                    "features": [feat], "layers": layers_of(fused), **opts})
    if attention:
        att = attention_layers(w)
        out.append({"row": "plain+attn", "group": "attention", "priority": 5, "features": [feat, attn],
                    "layers": layers_of(["plain"]) + att})
        for name, opts in FUSIONS:
            out.append({"row": f"{name}+attn", "group": "attention", "priority": 5, "features": [feat, attn],
                        "layers": layers_of(fused) + att, **opts})
    return out


def tail_rows(w: Path, specs: list[dict], seeds) -> list[dict]:
    """The long-tail components on the best fusion (the fused row with the highest mean AUCSeg mIoU once every
    fused row has its seeds): AUCSeg with the T-Memory Bank, and with the class-aware sampler."""
    fused = [r for r in specs if r["group"] == "fused"]
    if not all((w / "seg" / f"{r['row']}-aucseg-s{s}" / "metrics.json").is_file() for r in fused for s in seeds):
        return []
    best = max(fused, key=lambda r: statistics.mean(m["miou"] for m in scores_of(w, r["row"], "aucseg", seeds)))
    base = {k: v for k, v in best.items() if k not in ("row", "group", "priority")}
    return [{**base, "row": f"{best['row']}+bank", "group": "long-tail", "priority": 4, "memory_bank": True,
             "losses": ("aucseg",)},
            {**base, "row": f"{best['row']}+sampler", "group": "long-tail", "priority": 4, "sampler": "class-aware",
             "losses": ("aucseg",)}]


def train_all(w: Path, specs: list[dict], args) -> None:
    """Every (row, loss, seed) head, by priority; with ``--shard I/N`` only every N-th job from the I-th (several
    processes share the list; each job is done once)."""
    from difffeat.errors import UserError
    from downstream.seg.config import SegTrainConfig
    from downstream.seg.train import train_seg

    jobs = sorted(((r, loss, seed) for r in specs for seed in args.seeds for loss in r.get("losses", LOSSES)),
                  key=lambda j: (j[0]["priority"], j[2], j[1]))
    index, count = args.shard
    # --reverse: each priority's heads from its last, so that a second process helps the first from the other end
    order = sorted(enumerate(jobs, 1), key=lambda j: (j[1][0]["priority"], -j[0] if args.reverse else j[0]))
    for i, (r, loss, seed) in order:
        if (i - 1) % count != index:
            continue
        out = w / "seg" / f"{r['row']}-{loss}-s{seed}"
        if (out / "metrics.json").is_file():
            continue
        options = {k: v for k, v in r.items() if k not in ("row", "group", "layers", "features", "priority", "losses")}
        if options.get("variants") == "amalgamate":
            options["assigner_hidden"] = args.assigner_hidden
        if r["row"] == "plain" and loss == "ce":  # the learning curve: test scores every --curve-every iterations
            options["eval_every"] = args.curve_every
        cfg = SegTrainConfig.from_dict(dict(features=r["features"], masks=str(w / "shapes"), out=str(out),
                                            layers=r["layers"], split="train", val_split="test", head="conv",
                                            hidden=args.hidden, loss=loss, iterations=args.iterations,
                                            batch_size=args.batch_size, lr=args.lr, seed=seed, checkpoint_every=100,
                                            log_every=50, **options))
        t0 = time.perf_counter()
        try:  # an interrupted run goes on from its last checkpoint
            train_seg(cfg, resume=True, progress=False)
        except UserError as e:
            if "another config" not in str(e):
                raise
            train_seg(cfg, overwrite=True, progress=False)
        miou = json.loads((out / "metrics.json").read_text())["miou"]
        log(f"[{i}/{len(jobs)}] {out.name}: test mIoU {100 * miou:.1f} ({time.perf_counter() - t0:.0f} s)")


# --------------------------------------------------------------------------------------------- step 6
def scores_of(w: Path, row: str, loss: str, seeds) -> list[dict]:
    return [json.loads((w / "seg" / f"{row}-{loss}-s{s}" / "metrics.json").read_text()) for s in seeds]


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spearman_interval(gate_per_image: dict[str, np.ndarray], miou: dict[str, list[float]], boot: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """ρ between each candidate's mean GATE score and its mean mIoU over seeds, with a 95% percentile interval
    from resampling the GATE images (paired over candidates) and each candidate's seeds."""
    from gate.stats import spearman

    names = list(gate_per_image)
    x = np.array([gate_per_image[n].mean() for n in names])
    y = np.array([np.mean(miou[n]) for n in names])
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    n_img = len(next(iter(gate_per_image.values())))
    draws = []
    for _ in range(boot):
        idx = rng.integers(0, n_img, n_img)
        xb = np.array([gate_per_image[n][idx].mean() for n in names])
        yb = np.array([np.mean(rng.choice(miou[n], len(miou[n]))) for n in names])
        r = spearman(xb, yb)
        if np.isfinite(r):
            draws.append(r)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return float(rho), float(low), float(high)


def split_scores(metrics: dict) -> tuple[float, int, list[str]]:
    """mIoU over the classes present in the split only, the pixels predicted as classes absent from it, and those
    classes (`miou` counts a predicted absent class as IoU 0, as mmsegmentation does)."""
    m = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    tp, true, pred = np.diag(m), m.sum(1), m.sum(0)
    present = true > 0
    iou = tp[present] / (true + pred - tp)[present]
    absent = ~present & (pred > 0)
    names = list(metrics["per_class_iou"])
    return float(iou.mean()), int(pred[absent].sum()), [names[i] for i in np.flatnonzero(absent)]


def t_interval(values) -> tuple[float, float]:
    """95% t-interval of the mean over seeds."""
    from scipy import stats

    values = [v for v in values if v is not None]
    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return statistics.mean(values) - half, statistics.mean(values) + half


def learning_curve(w: Path, seeds, iterations: int) -> list[dict]:
    """Test mIoU and tail mIoU of the plain CE heads at each evaluation (the last: `iterations`), mean ± std over
    seeds."""
    per_seed = []
    for s in seeds:
        file = w / "seg" / f"plain-ce-s{s}" / "history.json"
        if file.is_file():
            per_seed.append({e["iteration"]: e for e in json.loads(file.read_text()) if "val_miou" in e})
        final = w / "seg" / f"plain-ce-s{s}" / "metrics.json"
        if file.is_file() and final.is_file():
            m = json.loads(final.read_text())
            per_seed[-1][iterations] = {
                "val_miou": m["miou"], "val_miou_tail": m["miou_tail"]}
    if not per_seed:
        return []
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    return [{"iteration": it, "miou": mean_std([p[it]["val_miou"] for p in per_seed]),
             "tail": mean_std([p[it]["val_miou_tail"] for p in per_seed])} for it in common]


MIXER_IMAGES = 64


def mixer_weights(w: Path, row: str, loss: str, seeds, images: int = MIXER_IMAGES) -> list[dict] | None:
    """What a fused head's variant weights do on the test split, per layer (mean over seeds and assigners):

    - ``largest``: the largest of the V weights of a (pixel, channel), averaged (1/V: an even average of the
      variants; 1: one variant chosen);
    - ``chosen``: the share of (pixel, channel) entries where one variant has more than half the weight;
    - ``won``: per variant, the share of entries where it has the largest weight.

    `weighted` has one input-independent weight per channel, so its entries are its channels. None when the row's
    runs are not all there."""
    import torch

    from downstream.seg.amalgamate import Amalgamation
    from downstream.seg.data import SegDataset, collate
    from downstream.seg.evaluate import load_run

    runs = [w / "seg" / f"{row}-{loss}-s{s}" for s in seeds]
    if not all((r / "metrics.json").is_file() for r in runs):
        return None
    per_layer: dict[str, list[dict]] = {}
    for run in runs:
        saved, model, classes = load_run(run)
        mixer = model.amalgamate
        names, layers = list(mixer.layout.names), list(mixer.layout.layers)
        if isinstance(mixer, Amalgamation):
            trained = saved["config"]
            data = SegDataset(trained["features"], trained["masks"], classes, split="test", layers=trained["layers"],
                              cache_bytes=0, read_masks=False)
            picks = np.linspace(0, len(data) - 1, min(images, len(data))).round().astype(int)
            stacks: list[list[torch.Tensor]] = [[] for _ in layers]
            with torch.no_grad():
                for start in range(0, len(picks), 16):
                    feats = collate([data[int(i)] for i in picks[start:start + 16]])["features"]
                    feats = model.norm(feats) if model.norm is not None else feats
                    for k, ws in enumerate(mixer.weights(feats)):  # per assigner [B, V, C, h, w]
                        stacks[k] += [x.movedim(1, -1).reshape(-1, len(names)) for x in ws]
            entries = [torch.cat(x) for x in stacks]  # [entries, V]
        else:
            entries = [x.detach().T for x in mixer.weights()]  # [C, V]
        for layer, e in zip(layers, entries):
            top, which = e.max(dim=1)
            per_layer.setdefault(layer, []).append(
                {"largest": top.mean().item(), "chosen": (top > 0.5).float().mean().item(),
                 "won": {n: (which == v).float().mean().item() for v, n in enumerate(names)}})
    return [{"layer": layer, "variants": len(names),
             "largest": statistics.mean(d["largest"] for d in ds), "chosen": statistics.mean(d["chosen"] for d in ds),
             "won": {n: statistics.mean(d["won"][n] for d in ds) for n in names}} for layer, ds in per_layer.items()]


BN_CHECK_ROW = "amalgamate-n2"


def batch_norm_check(w: Path, row: str, loss: str, seeds) -> dict | None:
    """Test mIoU and tail mIoU of an amalgamated head as trained (the assigners' BatchNorm on its running
    statistics, pooled over the variants because one assigner sees every variant in turn), and with the assigners'
    BatchNorm on each variant's statistics in the test batch (16 scenes), as in training: whether the assigners'
    train / test difference costs the head anything. Mean over seeds; None when the runs are not all there."""
    import torch

    from downstream.seg.data import SegDataset, collate
    from downstream.seg.evaluate import load_run
    from downstream.seg.metrics import SegMetrics

    runs = [w / "seg" / f"{row}-{loss}-s{s}" for s in seeds]
    if not all((r / "metrics.json").is_file() for r in runs):
        return None
    scores: dict[str, list[tuple[float, float]]] = {"running": [], "batch": []}
    for run in runs:
        saved, model, classes = load_run(run)
        trained = saved["config"]
        data = SegDataset(trained["features"], trained["masks"], classes, split="test", layers=trained["layers"])
        for mode in scores:
            model.eval()
            if mode == "batch":
                for m in model.amalgamate.assigners.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.train()
                        m.momentum = 0.0  # batch statistics, running statistics left as trained
            metrics = SegMetrics(data.classes)
            with torch.no_grad():
                for batch in torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate):
                    metrics.update(model.predict(batch["features"], data.mask_size), batch["mask"])
            got = metrics.compute()
            scores[mode].append((got["miou"], got["miou_tail"]))
    return {mode: {"miou": mean_std([v[0] for v in vs]), "tail": mean_std([v[1] for v in vs])}
            for mode, vs in scores.items()}


def summarize(w: Path, prep: dict, specs: list[dict], args, timing: dict) -> dict:
    table, missing = [], []
    for r in specs:
        for loss in r.get("losses", LOSSES):
            if not all((w / "seg" / f"{r['row']}-{loss}-s{s}" / "metrics.json").is_file() for s in args.seeds):
                missing.append(f"{r['row']} {loss}")
                continue
            runs = scores_of(w, r["row"], loss, args.seeds)
            entry = {"row": r["row"], "group": r["group"], "loss": loss}
            for k in ("miou", "miou_head", "miou_middle", "miou_tail"):
                entry[k] = mean_std([s.get(k) for s in runs])
            entry["tail_interval"] = t_interval([s.get("miou_tail") for s in runs])
            present = [split_scores(s) for s in runs]
            entry["miou_present"] = mean_std([p[0] for p in present])
            entry["absent_pixels"] = statistics.mean(p[1] for p in present)
            entry["absent_classes"] = sorted({c for p in present for c in p[2]})
            entry["per_class_iou"] = {c: mean_std([s["per_class_iou"].get(c) for s in runs])[0]
                                      for c in runs[0]["per_class_iou"]}
            table.append(entry)
    ranking = prep["ranking"]
    per_image = ranking["per_image"]
    gate_names = {"reference": "plain", **{c: c for c in prep["candidates"]}}
    correlations = {}
    for metric in (ranking["primary"], "feature_score") if not any(m.split()[0] in gate_names.values()
                                                                    for m in missing) else ():
        for loss in LOSSES:
            miou = {gate_names[c]: [s["miou"] for s in scores_of(w, gate_names[c], loss, args.seeds)]
                    for c in gate_names if c in per_image}
            values = {gate_names[c]: np.asarray(per_image[c][metric], float) for c in gate_names if c in per_image}
            correlations[f"{metric} vs {loss} mIoU"] = spearman_interval(values, miou)
    fused, how = fused_set(ranking)
    mixers = {f"{r['row']} {loss}": m for r in specs if r["group"] == "fused" and r.get("variants")
              for loss in LOSSES if (m := mixer_weights(w, r["row"], loss, args.seeds)) is not None}
    batch_norm = {loss: m for loss in LOSSES if (m := batch_norm_check(w, BN_CHECK_ROW, loss, args.seeds)) is not None}
    return {"table": table, "mixers": mixers, "batch_norm": batch_norm, "missing": missing,
            "curve": learning_curve(w, args.seeds, args.iterations),
            "spearman": correlations, "fused": fused, "fused_how": how, "gate": ranking["ranking"],
            "accepted": ranking["accepted"], "locon": prep["locon"], "timing": timing,
            "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "shard", "summarize_only",
                                                                          "reverse")}}


def fmt(ms: tuple[float, float]) -> str:
    return "–" if ms[0] != ms[0] else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def markdown(res: dict) -> str:
    lines = [f"Fused variants: {', '.join(res['fused'])} ({res['fused_how']}); LoRA with conv layers (LoCon): "
             f"{res['locon']}.", "",
             "| features | loss | mIoU | mIoU, present classes | head | middle | tail | tail 95% interval | "
             "pixels on absent classes |", "|---|---|---|---|---|---|---|---|---|"]
    for e in res["table"]:
        lo, hi = e["tail_interval"]
        absent = f"{e['absent_pixels']:.0f}" + (f" ({', '.join(e['absent_classes'])})" if e["absent_classes"] else "")
        lines.append(f"| {e['row']} | {e['loss']} | {fmt(e['miou'])} | {fmt(e['miou_present'])} | "
                     f"{fmt(e['miou_head'])} | {fmt(e['miou_middle'])} | {fmt(e['miou_tail'])} | "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {absent} |")
    if res.get("missing"):
        lines += ["", f"Not trained (yet): {', '.join(res['missing'])}."]
    if res.get("curve"):
        lines += ["", "Learning curve of the plain CE heads (test split, mean ± std over seeds):", "",
                  "| iteration | mIoU | tail mIoU |", "|---|---|---|"]
        lines += [f"| {c['iteration']} | {fmt(c['miou'])} | {fmt(c['tail'])} |" for c in res["curve"]]
    lines += ["", "| GATE candidate | techniques | PSNR | feature Score | accepted |", "|---|---|---|---|---|"]
    for r in res["gate"]:
        lines.append(f"| {r['candidate']} | {r['techniques']} | {r['psnr']:.2f} [{r['psnr_low']:.2f}, "
                     f"{r['psnr_high']:.2f}] | {r['feature_score']:.3f} [{r['feature_score_low']:.3f}, "
                     f"{r['feature_score_high']:.3f}] | {r['accepted']} |")
    lines += ["", "| Spearman ρ over the candidates | ρ | 95% interval |", "|---|---|---|"]
    for k, (rho, lo, hi) in res["spearman"].items():
        lines.append(f"| {k} | {rho:.2f} | [{lo:.2f}, {hi:.2f}] |")
    names = list(next(iter(res["table"]))["per_class_iou"])
    lines += ["", "Per-class IoU (CE, mean over seeds):", "", "| features | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for e in res["table"]:
        if e["loss"] == "ce":
            lines.append(f"| {e['row']} | " + " | ".join("–" if v != v else f"{100 * v:.0f}"
                                                        for v in e["per_class_iou"].values()) + " |")
    if res.get("mixers"):
        variants = list(next(iter(res["mixers"].values()))[0]["won"])
        lines += ["", f"What the fused heads' variant weights do on {MIXER_IMAGES} test images (per layer; mean over "
                      "seeds and assigners; an even average of the variants has largest weight "
                      f"{1 / len(variants):.2f} and no entry above 0.5):", "",
                  "| fusion | loss | layer | largest weight | entries > 0.5 | "
                  + " | ".join(f"won by {v}" for v in variants) + " |",
                  "|---|---|---|---|---|" + "---|" * len(variants)]
        for key, layers in res["mixers"].items():
            row, loss = key.rsplit(" ", 1)
            for m in layers:
                lines.append(f"| {row} | {loss} | {m['layer']} | {m['largest']:.2f} | {100 * m['chosen']:.0f} % | "
                             + " | ".join(f"{100 * m['won'][v]:.0f} %" for v in variants) + " |")
    if res.get("batch_norm"):
        lines += ["", f"{BN_CHECK_ROW}'s assigners at test time: BatchNorm on its running statistics (as trained and "
                      "reported above) against each variant's statistics in the test batch (as in training):", "",
                  "| loss | mIoU, running statistics | mIoU, batch statistics | tail, running | tail, batch |",
                  "|---|---|---|---|---|"]
        for loss, m in res["batch_norm"].items():
            lines.append(f"| {loss} | {fmt(m['running']['miou'])} | {fmt(m['batch']['miou'])} | "
                         f"{fmt(m['running']['tail'])} | {fmt(m['batch']['tail'])} |")
    t = res["timing"]
    if t is None:  # --summarize-only: this process trained nothing; the heads' times are in the log
        return "\n".join(lines)
    lines += ["", f"Time: {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU (this process and its "
                  f"commands); steps: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t["steps"].items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?", default="runs/content-shift")
    p.add_argument("--scenes", type=int, default=400, help="Shapes-LT scenes in all (80%% train)")
    p.add_argument("--splits", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=None,
                   help="each split's size instead of --scenes at 80/10/10 (e.g. 320 40 400: every class in test)")
    p.add_argument("--prepare-only", action="store_true", help="stop after the data, LoRA, GATE and extraction")
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--assigner-hidden", type=int, default=32,
                   help="hidden width of the weight assigners (the paper's 128 is for SD's 320–1280 channels; mini "
                        "has 32–128)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--curve-every", type=int, default=100, help="the plain CE heads' test scores every N iterations")
    p.add_argument("--no-attention", dest="attention", action="store_false",
                   help="leave out the rows with the attention feature")
    p.add_argument("--shard", default="0/1", help="I/N: train every N-th head from the I-th (parallel processes)")
    p.add_argument("--reverse", action="store_true",
                   help="take each priority's heads from the last (a second process helping the first from the "
                        "other end)")
    p.add_argument("--summarize-only", action="store_true", help="train nothing; tables of what is there")
    args = p.parse_args()
    index, count = (int(v) for v in args.shard.split("/"))
    args.shard = (index, count)
    import torch

    torch.set_num_threads(1)
    w = Path(args.workdir)
    w.mkdir(parents=True, exist_ok=True)
    t0, steps = time.perf_counter(), {}
    prep = prepare(w, args)
    steps["data, LoRA, GATE, extraction"] = time.perf_counter() - t0
    if args.prepare_only:
        return
    specs = rows(w, prep, args.attention)
    t1 = time.perf_counter()
    if not args.summarize_only:
        train_all(w, specs, args)
    extra = tail_rows(w, specs, args.seeds)  # on the best fusion, once every fused row has its seeds
    if extra and not args.summarize_only:
        train_all(w, extra, args)
    specs += extra
    steps["heads"] = time.perf_counter() - t1
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    timing = None if args.summarize_only else {"wall_s": time.perf_counter() - t0,
                                               "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage), "steps": steps}
    res = summarize(w, prep, specs, args, timing)
    (w / "results.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (w / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
