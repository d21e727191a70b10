"""`--probe LABELS`: does GATE's ranking predict downstream benefit? (The paper never measured it.)

For every candidate, features of a small labelled set are extracted with its techniques (same timestep,
layers and seeds as the GATE run), and a ridge-regression linear probe is fitted on one half and scored on
the other: segmentation mIoU from masks (Shapes-LT / imagefolder `mask_file_name`), or accuracy from image
labels. The Spearman correlation across candidates between each GATE score and probe quality says how well
GATE predicts it. A closed-form ridge probe is deterministic and takes well under a second here.

Both get bootstrap intervals: probe quality by resampling the scored images (mIoU from the summed confusion
matrices of the resampled images), and ρ by resampling, in each draw, the GATE images (each candidate's score
recomputed on them) and the scored probe images together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difffeat.errors import UserError
from gate.score import HIGHER_IS_BETTER
from gate.stats import resample, spearman

IGNORE = 255


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression of one-hot targets y [N, K] on features x [N, D]: standardise x, add a bias, and solve
    ``W = (XᵀX + λ·N·I)⁻¹ XᵀY`` (λ scaled by N so that it means the same for any number of rows).
    Returns (W [D + 1, K], mean, std) for `ridge_predict`."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    gram = xs.T @ xs + lam * len(x) * np.eye(xs.shape[1])
    return np.linalg.solve(gram, xs.T @ y), mean, std


def ridge_predict(model, x: np.ndarray) -> np.ndarray:
    w, mean, std = model
    return (np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1) @ w).argmax(1)


def mean_iou(pred: np.ndarray, target: np.ndarray, ignore: int = IGNORE) -> float:
    """mIoU over the classes present in `target`: ``IoU_c = TP / (TP + FP + FN)``; `ignore` pixels left out."""
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    ious = []
    for c in np.unique(target):
        tp = np.sum((pred == c) & (target == c))
        ious.append(tp / (np.sum(pred == c) + np.sum(target == c) - tp))
    return float(np.mean(ious)) if ious else float("nan")


def confusions(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """Per image, the confusion matrix [K, K] (rows: true class) of `pred` against `target` ([n, …] each)."""
    out = np.zeros((len(target), n_classes, n_classes), np.int64)
    for i, (p, t) in enumerate(zip(pred.reshape(len(target), -1), target.reshape(len(target), -1))):
        keep = t != ignore
        np.add.at(out[i], (t[keep], np.clip(p[keep], 0, n_classes - 1)), 1)
    return out


def miou_of(confusion: np.ndarray) -> float:
    """mIoU over the classes present (rows with pixels) of a confusion matrix: TP / (TP + FP + FN); equals
    `mean_iou` of the pixels it counts."""
    tp = np.diag(confusion).astype(np.float64)
    true, predicted = confusion.sum(1), confusion.sum(0)
    present = true > 0
    return float(np.mean(tp[present] / (true + predicted - tp)[present])) if present.any() else float("nan")


def gate_statistic(result, name: str, metric: str, idx: np.ndarray) -> np.ndarray:
    """A candidate's GATE score on resampled images idx [k, n]: a mean over images, or for the feature Score
    Eq. 2 on sums of diffs (as the ranking computes it)."""
    ev = result.evaluations[name]
    if metric != "feature_score":
        return np.asarray(ev.per_image[metric], np.float64)[idx].mean(1)
    anchor = result.evaluations["reference"].diffs
    return np.mean([1 - ev.diffs[layer][idx].sum(1) / np.maximum(anchor[layer][idx].sum(1), 1e-12)
                    for layer in ev.diffs], axis=0)


def probe_intervals(result, quality_draws: dict[str, np.ndarray], level: float = 0.95,
                    seed: int = 0) -> tuple[dict, dict]:
    """(probe quality interval per candidate, Spearman ρ interval per GATE score) from `quality_draws`
    (candidate → quality on each of the n_boot probe resamples) and as many paired resamples of the GATE images."""
    names = list(quality_draws)
    n_boot = len(next(iter(quality_draws.values())))
    tail = (1 - level) / 2 * 100
    quality = {c: [float(v) for v in np.nanpercentile(q, [tail, 100 - tail])] for c, q in quality_draws.items()}
    gate_idx = resample(len(result.keys), n_boot, seed + 1)
    rho = {}
    for m in result.metrics:
        sign = 1 if HIGHER_IS_BETTER[m] else -1
        scores = np.stack([sign * gate_statistic(result, c, m, gate_idx) for c in names])  # [candidates, n_boot]
        qualities = np.stack([quality_draws[c] for c in names])
        draws = np.array([spearman(scores[:, b], qualities[:, b]) for b in range(n_boot)])
        draws = draws[np.isfinite(draws)]
        rho[m] = [float(v) for v in np.percentile(draws, [tail, 100 - tail])] if len(draws) else [None, None]
    return quality, rho


def _mask_path(item, row: dict) -> Path:
    # mask_file_name is relative to the metadata.csv's folder, which is file_name's parts above the image.
    root = Path(item.path).parents[len(Path(row["file_name"]).parts) - 1]
    return root / row["mask_file_name"]


def _load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageOps

    from difffeat.data.images import BadImageError

    try:
        with Image.open(path) as im:
            im.load()
            mask = im if im.size == (size[1], size[0]) else \
                ImageOps.fit(im, (size[1], size[0]), method=Image.Resampling.NEAREST)
            arr = np.asarray(mask)
    except (OSError, ValueError) as e:
        raise BadImageError(path, f"cannot read mask ({e})") from None
    if arr.ndim != 2:
        raise BadImageError(path, f"mask must be one channel of class ids, got shape {arr.shape}")
    return arr.astype(np.int64)


def _pixels(features: dict[str, torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """Features of every layer upsampled (bilinear) to the mask size, as rows [B·H·W, ΣC]."""
    maps = [F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in features.values()]
    x = torch.cat(maps, 1)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy().astype(np.float64)


def _pooled(features: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([f.float().mean((2, 3)) for f in features.values()], 1).numpy().astype(np.float64)


def run_probe(pipe, result, progress: bool = False) -> dict:
    """Probe quality per candidate of `result` on `result.config.probe`, and its Spearman correlation with
    each GATE score across candidates (positive: the better-scored candidates probe better)."""
    from tqdm.auto import tqdm

    from difffeat.data.images import BadImageError
    from difffeat.models.layers import native_resolution
    from gate.inputs import drop_unusable, load_inputs
    from gate.reconstruct import Reconstructor

    cfg = result.config
    size = native_resolution(pipe)
    inputs, source, _ = load_inputs(cfg.probe, size, n=cfg.probe_n, seed=cfg.seed, prompt=cfg.prompt,
                                    prompt_source=cfg.prompt_source, caption_column=cfg.caption_column)
    items = {it.key: it for it in source.items}
    rows = {k: source.row(items[k]) or {} for k in inputs.keys}
    task = cfg.probe_task
    if task == "auto":
        task = "seg" if rows and all(r.get("mask_file_name") for r in rows.values()) else "cls"
    targets, keep = [], []
    for i, key in enumerate(inputs.keys):
        try:
            if task == "seg":
                if not rows[key].get("mask_file_name"):
                    raise BadImageError(key, "no mask_file_name in its metadata")
                targets.append(_load_mask(_mask_path(items[key], rows[key]), size))
            else:
                if rows[key].get("label") in (None, ""):
                    raise BadImageError(key, "no label in its metadata")
                targets.append(str(rows[key]["label"]))
            keep.append(i)
        except BadImageError as e:
            inputs.dropped.append({"key": key, "reason": e.reason})
    inputs = inputs.subset(keep)
    from pipelines.stack import TechniqueStack

    usable = drop_unusable(inputs, {n: TechniqueStack(pipe, s) for n, s in result.candidates.items()})
    targets = [targets[inputs.keys.index(k)] for k in usable.keys]
    if len(usable) < 4:
        raise UserError(f"--probe {cfg.probe}: {len(usable)} usable labelled image(s); the probe needs at least 4 "
                        f"(half to fit, half to score)")
    train, test = list(range(0, len(usable), 2)), list(range(1, len(usable), 2))
    recon = Reconstructor(pipe, usable, seed=cfg.seed, layers=cfg.layers, batch_size=cfg.batch_size, reuse=cfg.reuse)
    quality: dict[str, float] = {}
    draws: dict[str, np.ndarray] = {}  # candidate → quality on each bootstrap resample of the scored images
    probe_idx = resample(len(test), cfg.n_boot, cfg.seed)
    if task == "seg":
        y = np.stack(targets)
        n_classes = int(y[y != IGNORE].max()) + 1
    else:
        names = sorted(set(targets))
        y = np.array([names.index(t) for t in targets])
        n_classes = len(names)
    for name, specs in tqdm(result.candidates.items(), desc="probe", unit="candidate", disable=not progress):
        feats = recon.features(specs, cfg.t)
        if task == "seg":
            x_tr = _pixels({k: v[train] for k, v in feats.items()}, size)
            x_te = _pixels({k: v[test] for k, v in feats.items()}, size)
            ytr, yte = y[train].reshape(-1), y[test].reshape(-1)
            fit = ytr != IGNORE
            model = ridge_fit(x_tr[fit], np.eye(n_classes)[ytr[fit]])
            pred = ridge_predict(model, x_te)
            quality[name] = mean_iou(pred, yte)
            conf = confusions(pred, y[test], n_classes)
            draws[name] = np.array([miou_of(conf[rows].sum(0)) for rows in probe_idx])
        else:
            x = _pooled(feats)
            model = ridge_fit(x[train], np.eye(n_classes)[y[train]])
            correct = (ridge_predict(model, x[test]) == y[test]).astype(np.float64)
            quality[name] = float(np.mean(correct))
            draws[name] = correct[probe_idx].mean(1)
    names = list(quality)
    correlation = {}
    for m in result.metrics:
        sign = 1 if HIGHER_IS_BETTER[m] else -1  # so that a positive ρ always means "GATE agrees"
        correlation[m] = spearman([sign * result.scores[c][m].value for c in names], [quality[c] for c in names])
    quality_interval, spearman_interval = probe_intervals(result, draws, cfg.level, cfg.seed)
    return {"labels": cfg.probe, "task": task, "metric": "miou" if task == "seg" else "accuracy",
            "images": len(usable), "train": len(train), "test": len(test), "classes": n_classes,
            "quality": quality, "quality_interval": quality_interval, "spearman": correlation,
            "spearman_interval": spearman_interval, "primary_spearman": correlation[cfg.primary],
            "dropped": usable.dropped}
