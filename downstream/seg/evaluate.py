"""Scores of a segmentation model: `evaluate` (a model on a dataset, over every process of a launch),
`eval_seg` (a trained run on features and masks, `difffeat eval-seg`), `load_run` and `group_summary`.

Two resolutions: "frame" scores in the frame the features were extracted at (masks brought to it, as training
sees them); "original" scores as mmsegmentation does, at each mask's own size: frame logits (bilinear) have the
extraction's padding stripped and are resized to the mask's H × W (`difffeat.data.geometry.to_original`), then
argmax (`difffeat.data.original_labels`: the same ids without resizing every map); intersections and unions
are summed over the whole split. It streams: one image's mask at a time.

`eval_seg` refuses stores whose features were extracted otherwise than the run's training stores (another model,
timestep, technique …; `difffeat.store.identity`); another split of the same data extracted the same way is the
normal case. An evaluation writes ``metrics.json`` (scores, confusion matrix, what was evaluated, the identity of the
stores scored) and ``confusion.png`` into its own folder, ``RUN/eval-<split>`` by default, with its config; running
it again replaces them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from difffeat.data.original_labels import labels_at_original
from difffeat.errors import UserError
from difffeat.spine.run import RunFolder, read_json
from difffeat.store.feature_store import FeatureStore
from difffeat.store.identity import check_same_features, store_record
from downstream.engine import load_trained_weights, make_accelerator
from downstream.plots import save_confusion_png
from downstream.seg.classes import SegClasses
from downstream.seg.config import SegEvalConfig, SegTrainConfig
from downstream.seg.data import FeatureSpec, SegDataset, collate
from downstream.seg.metrics import SegMetrics
from downstream.seg.model import SegModel, vote
from downstream.seg.profile import listed_tail_scores

EVAL_FILES = ("metrics.json", "confusion.png")


@torch.no_grad()
def evaluate(model: SegModel, dataset: SegDataset, accelerator=None, batch_size: int = 16,
             progress: bool = False, resolution: str = "frame") -> tuple[dict, torch.Tensor]:
    """Scores of `model` on `dataset` (see `downstream.seg.metrics`) and the confusion matrix, over all processes,
    at the `resolution` of the module doc."""
    from tqdm.auto import tqdm

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(range(rank, len(dataset), world))  # each image once: no padding to equal shards
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         collate_fn=collate)
    metrics = SegMetrics(dataset.classes, device=device)
    was_training = model.training
    model.eval()
    uncovered = torch.zeros((), dtype=torch.long, device=device)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress or rank != 0, leave=False):
        feats = [f.to(device) for f in batch["features"]]
        if resolution == "frame":
            metrics.update(model.predict(feats, dataset.mask_size), batch["mask"].to(device))
            continue
        members = model(feats)  # each [B, K, h, w] on the head's grid
        for row, index in enumerate(batch["index"].tolist()):
            mask, place = dataset.original(index)
            mask = mask.to(device)
            votes = []
            for logits in members:  # the frame's and the image's resize of the classes that can win (same ids)
                labels, covered = labels_at_original(logits[row : row + 1], dataset.mask_size, place)
                votes.append(labels)
            if covered is not None:  # what a centre crop never showed the model is not scored (counted)
                uncovered += ((~covered) & (mask != dataset.classes.ignore_index)).sum()
                mask = torch.where(covered, mask, torch.full_like(mask, dataset.classes.ignore_index))
            metrics.update(vote(votes), mask)
    model.train(was_training)
    if world > 1:
        metrics.matrix = accelerator.reduce(metrics.matrix, reduction="sum")
        uncovered = accelerator.reduce(uncovered, reduction="sum")
    scores = metrics.compute()
    scores["resolution"] = resolution
    if resolution == "original":
        scores["uncovered_pixels"] = int(uncovered)
    return scores, metrics.matrix.cpu()


def write_scores(folder: RunFolder, scores: dict, matrix: torch.Tensor, classes: SegClasses, info: dict) -> None:
    """metrics.json (scores, confusion matrix, `info`) and confusion.png into `folder`."""
    folder.write_json("metrics.json", {**scores, "confusion_matrix": matrix.tolist(), **info})
    save_confusion_png(matrix, classes.names, folder.file("confusion.png"))


def load_run(run: str | os.PathLike) -> tuple[dict, SegModel, SegClasses]:
    """(saved config.json, the trained model on the CPU in eval mode, classes) of a train-seg run folder;
    the final weights, or the latest checkpoint's while the run is unfinished."""
    run = Path(run)
    file = run / "config.json"
    if not file.is_file():
        raise UserError(f"{run}: not a train-seg run (no config.json)")
    saved = read_json(file, "run config")
    if not isinstance(saved, dict) or saved.get("kind", "train-seg") != "train-seg":
        raise UserError(f"{run}: not a train-seg run")
    try:
        cfg = SegTrainConfig.from_dict(saved["config"])
        classes = SegClasses.from_dict(saved["classes"])
        specs = [FeatureSpec.from_dict(s) for s in saved["specs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file}: unreadable run config ({e!r})") from None
    model = SegModel(specs, classes.num_classes, cfg.head)
    weights = load_trained_weights(run)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{run}: weights do not fit the run's model ({str(e).splitlines()[0]})") from None
    return saved, model.eval(), classes


def eval_seg(run: str | os.PathLike, features: list[str], masks: str | None = None, *, accelerator=None,
             progress: bool = True, **options) -> dict:
    """Scores of a trained run on features and masks (mIoU overall / head / middle / tail, per-class IoU, pixel and
    mean accuracy); writes metrics.json and confusion.png to `out` (default RUN/eval-<split or all>).
    `masks` is a mask root or a data spec (None: `data`, else the data set the store was extracted from);
    `options` are `SegEvalConfig`'s: data, split, resolution, out, mask_size, batch_size."""
    given = {k: v for k, v in options.items() if v is not None}  # None: the config's default
    config = SegEvalConfig.from_dict({"run": str(run), "features": [str(f) for f in features],
                                      "masks": None if masks is None else str(masks), **given})
    saved, model, classes = load_run(config.run)
    trained = saved["config"]
    # A head scores only the features it learned: the stores given must be extracted as the training stores were.
    check_same_features(saved.get("stores"), config.features, config.run)
    store_data = FeatureStore(config.features[0]).manifest.get("config", {}).get("data") or {}
    split = config.split or store_data.get("split")  # a store of one split: its eval folder is named by it
    out = Path(config.out) if config.out else Path(run) / f"eval-{(split or 'all').strip('/').replace('/', '-')}"
    # An evaluation replaces its own earlier scores, and nothing it did not write.
    folder = RunFolder(out, "eval-seg", config, overwrite=True, owned=EVAL_FILES)
    # the masks: as given; else the store's own data set; else the data set the run was trained on
    source = config.data or config.masks or (None if store_data else trained.get("data") or trained.get("masks"))
    dataset = SegDataset(config.features, source, classes, split=config.split, layers=trained.get("layers"),
                         mask_size=config.mask_size or trained.get("mask_size", "resize"),
                         read_masks=config.resolution == "frame",
                         cache_bytes=0)  # one pass reads each image once: a cache would only hold all of them
    want = [FeatureSpec.from_dict(s) for s in saved["specs"]]
    if dataset.specs != want:
        got = [(s.variant, s.layer, s.shape) for s in dataset.specs]
        raise UserError(f"{', '.join(config.features)}: features differ from the run's (run: "
                        f"{[(s.variant, s.layer, s.shape) for s in want]}, given: {got})")
    accelerator = accelerator or make_accelerator()
    model = model.to(accelerator.device)
    scores, matrix = evaluate(model, dataset, accelerator, config.batch_size, progress, config.resolution)
    # the run's listed tail classes (a profile's released list), when it has one
    scores.update(listed_tail_scores(scores, classes.names, trained.get("tail_classes"),
                                     (trained.get("extra") or {}).get("profile")))
    report = dataset.report  # a listed mask file that is missing counts as a missing mask here (details: report)
    skipped = {"missing_masks": len(report["missing_masks"]) + len(report["missing_mask_files"]),
               "missing_features": len(report["missing_features"])}
    info = {"run": str(run), "split": split, "features": config.features, "masks": source or
            dataset.targets.describe, "images": len(dataset), "skipped": skipped,
            "stores": [store_record(s.path) for s in dataset.stores]}  # what was scored, for `report`
    if accelerator.is_main_process:
        folder.create()
        write_scores(folder, scores, matrix, classes, info)
    accelerator.wait_for_everyone()
    return {**scores, "out": str(out), **info}


def group_summary(scores: dict) -> str:
    """One line: overall / head / middle / tail mIoU and pixel accuracy."""
    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    return (f"mIoU {pct(scores.get('miou'))}  head {pct(scores.get('miou_head'))}  middle "
            f"{pct(scores.get('miou_middle'))}  tail {pct(scores.get('miou_tail'))}  pixel acc "
            f"{pct(scores.get('pixel_accuracy'))}")
