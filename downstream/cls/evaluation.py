"""Judging a trained head: accuracy under label shift (`label_shift`'s resampled test sets), NC1–NC4 of the
trained head, the accuracy plot, and eval-cls (a run scored on other features or labels).

Accuracy is reported on every test distribution (forward-LT, uniform, backward-LT, Dirichlet draws), as means
over them, and on the whole test set; for DirMixE per expert, for the equal-weight mean of the experts
("default") and after test-time aggregation on each distribution ("tta").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from difffeat.errors import UserError
from difffeat.spine.run import RunFolder, read_json
from difffeat.store.identity import check_same_features
from downstream.cls.config import ClsTrainConfig, EvalClsConfig
from downstream.cls.data import ClsData, SourceSpec, check_test_classes, load_split
from downstream.cls.dirmixe import EXPERT_NAMES, aggregate, test_time_aggregation
from downstream.cls.label_shift import shifted_test_sets
from downstream.cls.model import ClsModel
from downstream.cls.neural_collapse import neural_collapse_metrics
from downstream.engine import load_trained_weights
from downstream.plots import save_figure

TRAIN_KIND, EVAL_KIND = "train-cls", "eval-cls"
EVAL_FILES = ("metrics.json", "accuracy.png")


def pick_device(name: str) -> torch.device:
    """The device a config names: "auto" (CUDA when present), "cpu" or "cuda"."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device cuda: no CUDA device here")
        return torch.device("cuda")
    return torch.device("cpu")


def as_tensors(data: ClsData, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.as_tensor(b, device=device) for b in data.blocks], torch.as_tensor(data.labels, device=device)


@torch.no_grad()
def nc_metrics(model: ClsModel, blocks: Sequence[torch.Tensor], labels: torch.Tensor, groups: dict[str, list[str]],
               names: Sequence[str]) -> dict:
    """NC1–NC4 (and margins) of the trained head on the training features, per head (per DirMixE expert),
    with NC1/NC2 on the head and tail groups alone; NaN-free (a failing metric is reported as null)."""
    index = {n: i for i, n in enumerate(names)}
    ids = {g: [index[n] for n in members] for g, members in groups.items() if g in ("head", "tail")}
    out = {}
    for name, h, w, b in model.penultimate(blocks):
        if torch.unique(labels).numel() < 2:
            break
        values = neural_collapse_metrics(h.cpu(), labels.cpu(), w.cpu(), None if b is None else b.cpu(), ids)
        out[name] = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
    return out


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean()) if len(labels) else float("nan")


SHOTS = ("many", "medium", "few")


def shot_groups(train_counts, many_above: float = 100, few_below: float = 20) -> dict[str, np.ndarray]:
    """Class ids of the many / medium / few-shot groups: n_c > `many_above`, n_c < `few_below`, the rest (the
    released scripts' rule: CIFAR-100, iNat 100 / 20, CIFAR-10 1000 / 200; the profiles hold each data set's).

    >>> {g: ids.tolist() for g, ids in shot_groups([500, 101, 100, 20, 19]).items()}
    {'many': [0, 1], 'medium': [2, 3], 'few': [4]}
    """
    n = np.asarray(train_counts, dtype=np.float64)
    many, few = n > many_above, n < few_below
    return {"many": np.flatnonzero(many), "medium": np.flatnonzero(~many & ~few), "few": np.flatnonzero(few)}


def shot_accuracy(pred: torch.Tensor, labels: torch.Tensor, groups: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Class-mean accuracy (the mean over the group's classes present in `labels` of each class's accuracy) per
    shot group, as the released evaluation (mean of the confusion matrix's diagonal over the group); None for a
    group with no class present."""
    out = {}
    for g, ids in groups.items():
        accs = [float((pred[labels == c] == c).double().mean()) for c in ids.tolist() if (labels == c).any()]
        out[g] = float(np.mean(accs)) if accs else None
    return out


@torch.no_grad()
def evaluate(model: ClsModel, test: ClsData, train_counts: np.ndarray, config: ClsTrainConfig,
             device: torch.device | None = None, tta: bool = True) -> dict:
    """Accuracy on every label-shift test distribution, their means, and on the whole test set (module doc),
    each also per many / medium / few-shot group (`shot_groups`).

    Test-time aggregation (DirMixE) adapts on each set itself for the SADE protocol's sets, and on the set's
    independent adaptation draw for the Dirichlet sets (`config.tta_adapt` "independent", as released; "scored"
    adapts on the scored set, which is optimistic).
    """
    device = device or next(model.parameters()).device
    model.eval()
    blocks, labels = as_tensors(test, device)
    normed = model.norm(blocks)
    logits = model.forward_normed(normed)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    adapt_on = None
    if logits.ndim == 3:  # experts
        variants["default"] = lambda idx: aggregate(logits[:, idx]).argmax(-1)
        for k, name in enumerate(EXPERT_NAMES):
            variants[name] = lambda idx, k=k: logits[k, idx].argmax(-1)
        if tta:
            flat = torch.cat(normed, 1)
            dims = [b.shape[1] for b in normed]
            agg = config.aggregation

            def adapt_on(rows: np.ndarray) -> torch.Tensor:
                weights, _ = test_time_aggregation(lambda x: model.forward_normed(list(x.split(dims, 1))),
                                                   flat[torch.as_tensor(rows, device=device, dtype=torch.long)], agg,
                                                   seed=config.eval_seed)
                return weights
    else:
        variants["default"] = lambda idx: logits[idx].argmax(-1)
    names = [*variants, *(["tta"] if adapt_on is not None else [])]
    groups = shot_groups(train_counts, config.many_above, config.few_below)
    sets = shifted_test_sets(test.labels, train_counts, num_classes=test.num_classes,
                             forward=config.forward_ratios, backward=config.backward_ratios,
                             dirichlet_draws=config.dirichlet_draws, dirichlet_ratio=config.dirichlet_ratio,
                             dirichlet_concentration=config.dirichlet_concentration, seed=config.eval_seed)
    rows = []
    for s in sets:
        idx = torch.as_tensor(s.indices, device=device, dtype=torch.long)
        preds = {name: fn(idx) for name, fn in variants.items()}
        weights = None
        if adapt_on is not None:
            independent = config.tta_adapt == "independent" and s.adaptation is not None
            weights = adapt_on(s.adaptation if independent else s.indices)
            preds["tta"] = aggregate(logits[:, idx], weights).argmax(-1)
        row = {"name": s.name, "kind": s.kind, "ratio": s.ratio, "images": int(len(s.indices)),
               "counts": s.counts.tolist(), "accuracy": {n: _accuracy(p, labels[idx]) for n, p in preds.items()}}
        if weights is not None:
            row["tta_weights"] = weights.tolist()
            if s.adaptation is not None:
                row["tta_adapted_on"] = "independent draw" if independent else "scored set"
        row["shots"] = {n: shot_accuracy(p, labels[idx], groups) for n, p in preds.items()}
        rows.append(row)

    def mean(chosen_names: list[str]) -> dict[str, float]:
        chosen = [r for r in rows if r["name"] in chosen_names]
        return {v: float(np.mean([r["accuracy"][v] for r in chosen])) for v in names} if chosen else {}

    def mean_shots(chosen_names: list[str]) -> dict[str, dict[str, float | None]]:
        chosen = [r for r in rows if r["name"] in chosen_names]
        out = {}
        for v in names:
            per = {g: [r["shots"][v][g] for r in chosen if r["shots"][v][g] is not None] for g in SHOTS}
            out[v] = {g: float(np.mean(a)) if a else None for g, a in per.items()}
        return out if chosen else {}

    sade = [r["name"] for r in rows if not r["kind"].startswith("dirichlet")]
    dirichlet = [r["name"] for r in rows if r["kind"].startswith("dirichlet")]
    pred_full = variants["default"](torch.arange(len(labels), device=device))
    per_class = [float((pred_full[labels == c] == c).double().mean()) if (labels == c).any() else None
                 for c in range(test.num_classes)]
    present = [a for a in per_class if a is not None]
    return {"images": len(test), "classes": test.names, "distributions": rows,
            "mean_accuracy": mean(sade + dirichlet), "mean_accuracy_sade": mean(sade),
            "mean_accuracy_dirichlet": mean(dirichlet),
            "shots": {"many_above": config.many_above, "few_below": config.few_below,
                      "classes": {g: [test.names[c] for c in ids] for g, ids in groups.items()},
                      "mean": mean_shots(sade + dirichlet), "mean_sade": mean_shots(sade),
                      "mean_dirichlet": mean_shots(dirichlet)},
            "full_test": {"accuracy": _accuracy(pred_full, labels), "class_mean_accuracy": float(np.mean(present)),
                          "per_class_accuracy": dict(zip(test.names, per_class)),
                          "shots": shot_accuracy(pred_full, labels, groups)},
            "report": test.report}


def save_accuracy_png(metrics: dict, path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against test distribution: forward-LT → uniform → backward-LT as lines, Dirichlet draws as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["distributions"]
    sade = [r for r in rows if not r["kind"].startswith("dirichlet")]
    dirichlet = [r for r in rows if r["kind"].startswith("dirichlet")]
    variants = list(rows[0]["accuracy"]) if rows else []
    fig, axes = plt.subplots(1, 2 if dirichlet else 1, figsize=(11 if dirichlet else 7, 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": [11, 9] if dirichlet else [1]})
    for v in variants:
        style = {"lw": 2.2} if v in ("default", "tta") else {"lw": 1, "ls": "--"}
        axes[0, 0].plot(range(len(sade)), [100 * r["accuracy"][v] for r in sade], marker="o", label=v, **style)
        if dirichlet:
            axes[0, 1].plot(range(len(dirichlet)), [100 * r["accuracy"][v] for r in dirichlet], marker="o",
                            ls="none" if v not in ("default", "tta") else "-", label=v)
    axes[0, 0].set_xticks(range(len(sade)), [r["name"].replace("forward-", "F").replace("backward-", "B")
                                             for r in sade], rotation=45)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, 0].set_title(f"{title}  mean {100 * metrics['mean_accuracy'].get('default', float('nan')):.1f}%")
    axes[0, 0].legend(fontsize=7)
    if dirichlet:
        axes[0, 1].set_xticks(range(len(dirichlet)), [r["name"].replace("dirichlet-", "D").replace("forward", "F")
                                                      .replace("backward", "B").replace("uniform", "U")
                                                      for r in dirichlet], rotation=45)
        axes[0, 1].set_title("Dirichlet test priors")
    fig.tight_layout()
    save_figure(fig, path)


def summary_line(metrics: dict) -> str:
    """One line: mean accuracy over the label-shift distributions (per variant) and on the whole test set, with
    its many / medium / few-shot class means."""
    means = "  ".join(f"{k} {100 * v:.1f}" for k, v in metrics["mean_accuracy"].items()
                      if k in ("default", "tta"))
    shots = metrics["full_test"].get("shots") or {}
    by_shot = ", ".join(f"{g} {'-' if shots.get(g) is None else f'{100 * shots[g]:.1f}'}" for g in SHOTS
                        if g in shots)
    return (f"mean accuracy over {len(metrics['distributions'])} test distributions: {means}; "
            f"full test set {100 * metrics['full_test']['accuracy']:.1f} "
            f"(class mean {100 * metrics['full_test']['class_mean_accuracy']:.1f}"
            + (f"; {by_shot}" if by_shot else "") + ")")


# --------------------------------------------------------------------------------------------- eval-cls
def load_run(run: str | os.PathLike) -> tuple[dict, ClsTrainConfig, ClsModel]:
    """(saved config.json, its config, the trained model on the CPU in eval mode) of a train-cls run."""
    run = Path(run)
    file = run / "config.json"
    if not file.is_file():
        raise UserError(f"{run}: not a train-cls run (no config.json)")
    saved = read_json(file, "run config")
    if not isinstance(saved, dict) or saved.get("kind") != TRAIN_KIND:
        raise UserError(f"{file}: not a train-cls run config")
    try:
        config = ClsTrainConfig.from_dict(saved["config"])
        specs = [SourceSpec.from_dict(s) for s in saved["sources"]]
        names = saved["classes"]["names"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file}: unreadable run config ({e})") from None
    model = ClsModel([s.dim for s in specs], len(names), config)
    weights = load_trained_weights(run)
    model.load_state_dict(weights)
    return saved, config, model.eval()


def eval_cls(run: str | os.PathLike, features: Sequence[str], labels: str, *, split: str | None = None,
             out: str | os.PathLike | None = None, tta: bool = True, dirichlet_draws: int | None = None,
             seed: int | None = None, drop_unseen: bool = False, overwrite: bool = False) -> dict:
    """Label-shift scores of a trained run on features and labels; writes metrics.json and accuracy.png to
    `out` (default RUN/eval-<split or labels file stem>). Without `split` the labels CSV's keys are the test set;
    with it, every store key under that prefix (each must be labelled). The same evaluation may be written
    again into its folder; another one there needs `overwrite`."""
    request = EvalClsConfig(run=str(run), features=list(features), labels=str(labels), split=split,
                            out=None if out is None else str(out), tta=tta, dirichlet_draws=dirichlet_draws,
                            seed=seed, drop_unseen=drop_unseen).validate()
    saved, config, model = load_run(run)
    if dirichlet_draws is not None:
        config.dirichlet_draws = dirichlet_draws
    if seed is not None:
        config.eval_seed = seed
    specs = [SourceSpec.from_dict(s) for s in saved["sources"]]
    counts = np.asarray(saved["classes"]["train_counts"])
    test = load_split(features, labels, split=split, explicit=split is None, names=saved["classes"]["names"],
                      layers=config.layers, sources=config.sources, pool_grid=config.pool_grid, specs=specs)
    test = check_test_classes(test, counts, labels, drop_unseen)
    # Features of the run's shapes may still come from another extraction: a head scores only the features it learned.
    check_same_features(saved.get("stores"), request.features, run)
    name = (split or Path(labels).stem).strip("/").replace("/", "-")
    out = Path(out) if out else Path(run) / f"eval-{name}"
    folder = RunFolder(out, EVAL_KIND, request, resume=True, overwrite=overwrite, owned=EVAL_FILES)
    device = pick_device(config.device)
    metrics = evaluate(model.to(device), test, counts, config, device, tta=tta)
    nc_file = Path(run) / "nc.json"
    nc = read_json(nc_file, "NC metrics") if nc_file.is_file() else None
    metrics.update({"run": str(run), "split": split, "labels": str(labels), "features": list(features), "nc": nc})
    folder.create()
    folder.write_json("metrics.json", metrics)
    save_accuracy_png(metrics, folder.file("accuracy.png"), title=f"{config.method} ({Path(run).name})")
    return {**metrics, "out": str(out)}
