"""Running a protocol: the whole chain with the protocol's settings, every step a resumable run folder of its own.

    OUT/data/                 the built-in world in the protocol's layout (`--smoke` only)
    OUT/features-<split>/     feature stores (`difffeat extract`, resumed where they stopped)
    OUT/<method>-seed<s>/     heads (`train-seg` / `train-cls`, resumed) and their scores
    OUT/results.json          our numbers (mean ± std and a 95 % t-interval over seeds) beside the anchors, the
                              settings, what departs from the protocol, library versions and the machine
    OUT/report.html           the same on one page

A run killed anywhere and started again skips what is finished and writes the same results.json: every step is
deterministic and resumes from its own folder. One small runner per task (`TASKS`), no branches on the task.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import platform
from pathlib import Path
from typing import ClassVar

import numpy as np

from difffeat.data.layouts import LAYOUTS, detect_layout, open_data
from difffeat.errors import UserError
from difffeat.spine.run import library_versions, read_json
from difffeat.utils.atomic import write_json_atomic
from downstream.protocols.protocol import Protocol

# two-sided 95 % quantiles of Student's t for 1…10 degrees of freedom (then the normal's 1.96 is close enough)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _synth_layout(root: Path, n: int, writer: str) -> Path:
    from difffeat.data.synth_layouts import synthesize_layout

    return synthesize_layout(root, writer, n=n, seed=0)


def _synth_corr(root: Path, n: int) -> Path:
    from difffeat.data.synth_corr import synthesize_corr

    return synthesize_corr(root, n=n, seed=0)


#: the `data synth` writer of each protocol layout's built-in world (root, n) → root
SMOKE_WORLDS = {
    **{layout: functools.partial(_synth_layout, writer=writer)
       for layout, writer in (("ade20k", "ade20k"), ("cityscapes", "cityscapes"), ("ddpm-seg", "ddpm-seg"),
                              ("imagefolder", "shapes-lt"))},
    "spair": _synth_corr,
}


def summarise(values: list[float]) -> dict:
    """mean, sample std, n, the 95 % t-interval of the mean, and the values themselves."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "ci95": None, "values": []}
    mean = sum(vals) / len(vals)
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    half = (T95[len(vals) - 2] if len(vals) - 1 <= len(T95) else 1.96) * std / math.sqrt(len(vals)) \
        if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "ci95": [mean - half, mean + half], "values": vals}


#: what a protocol's extract section may set (`extract_config` reads these)
EXTRACT_NAMES = ("layers", "timesteps", "ensemble", "seed", "noise", "posterior", "size", "resize", "prompt",
                 "prompt_template")


def extract_config(settings: dict, images: str, out: str, variants: dict):
    """The `ExtractRunConfig` of the protocol's extract section, for the data spec `images`, into `out`."""
    from difffeat.extraction.runner import ExtractRunConfig

    ex = settings["extract"]
    fields = {"images": images, "out": out, "model": settings["model"], "layers": list(ex["layers"]),
              "timesteps": list(ex["timesteps"]), "ensemble": ex.get("ensemble", 1), "seed": ex.get("seed", 0),
              "noise": ex.get("noise", True), "posterior": ex.get("posterior", "mean"),
              "resolution": list(ex["size"]) if ex.get("size") else None, "resize": ex.get("resize", "center-crop"),
              "variants": dict(variants)}
    if "prompt_template" in ex:
        fields.update(prompt_source="label", label_template=ex["prompt_template"].replace("{category}", "{label}"))
    else:
        fields["prompt"] = ex.get("prompt", "")
    return ExtractRunConfig.from_dict(fields)


class TaskRunner:
    """The steps of one task's protocol; subclasses set `task`, the checks of their own sections and `run`."""

    task = ""

    def __init__(self, protocol: Protocol, settings: dict, out: Path, root: Path, progress: bool, variants: dict,
                 pipe=None):
        self.protocol, self.settings, self.out, self.root = protocol, settings, out, root
        self.progress, self.variants, self.pipe = progress, variants, pipe
        self.layout = settings["data"]["layout"]

    # --------------------------------------------------------------------------------------------- checks
    #: the names the plain sections may hold (the task's own sections are its configs': `unknown_settings`)
    sections: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("layout", "train", "test", "label_column"),
        "extract": EXTRACT_NAMES,
    }

    #: the task's own section (head, match), checked by name against its step's config (`own_config`), less the
    #: names the runner reads itself (`own_extra`); `own_help` says where its names are listed
    own_section: ClassVar[str] = ""
    own_extra: ClassVar[tuple[str, ...]] = ()
    own_help: ClassVar[str] = ""

    @classmethod
    def own_config(cls) -> type:
        """The config class of the step that reads the task's own section (imported when asked)."""
        raise NotImplementedError

    @classmethod
    def unknown_settings(cls, settings: dict) -> list[str]:
        """The dotted names in the task's own section that no step takes."""
        if not cls.own_section:
            return []
        own = {k: v for k, v in (settings.get(cls.own_section) or {}).items() if k not in cls.own_extra}
        return [f"{cls.own_section}.{k}" for k in cls.own_config().unknown_names(own)]

    @classmethod
    def task_configs(cls, settings: dict, stores: list[str], out: Path) -> list:
        """The configs of the task's steps after extraction (a head per method and seed, a matching per seed)."""
        return []

    @classmethod
    def check(cls, protocol: Protocol, settings: dict) -> None:
        """Every setting the run will use, checked before anything is read or written, so that a typo in ``--set``
        or a value a step refuses is one line naming it, not an error hours into the run (or, for a name no step
        reads, no error at all)."""
        from difffeat.spine.run import ConfigError

        where = f"protocol {protocol.name}"
        unknown = [f"{section}.{k}" for section, allowed in cls.sections.items()
                   for k in settings.get(section) or {} if k not in allowed] + cls.unknown_settings(settings)
        if unknown:
            section = unknown[0].split(".")[0]
            raise UserError(f"{where}: no setting {unknown[0]} (--set {unknown[0]}=…); the {section} settings are "
                            f"{cls.setting_names(section)}")
        try:
            extract_config(settings, "LAYOUT:ROOT", "OUT", {}).validate()
            for config in cls.task_configs(settings, ["OUT/features"], Path("OUT")):
                config.validate()
        except ConfigError as e:
            raise UserError(f"{where}: {e.field}: {e.reason}") from None

    @classmethod
    def setting_names(cls, section: str) -> str:
        return cls.own_help if section == cls.own_section else ", ".join(cls.sections.get(section, ()))

    # ----------------------------------------------------------------------------------------------- steps
    def extract(self, split: str | None, name: str) -> str:
        """The feature store of `split` (every split: None), made or resumed in OUT/features-<name>."""
        from difffeat.extraction.runner import run_extraction
        from difffeat.store.feature_store import store_exists

        store = self.out / f"features-{name}"
        spec = f"{self.layout}:{self.root}" + (f":{split}" if split else "")
        config = extract_config(self.settings, spec, str(store), self.variants)
        run_extraction(config, resume=store_exists(store), progress=self.progress, pipe=self.pipe)
        return str(store)

    def run(self) -> dict:
        raise NotImplementedError


class SegmentationRunner(TaskRunner):
    """extract train and test → train-seg per seed → eval-seg at the original resolution."""

    task = "segmentation"
    sections = {**TaskRunner.sections, "evaluate": ("resolution", "reduction")}

    own_section, own_help = "head", "train-seg's options (difffeat train-seg --help)"

    @classmethod
    def own_config(cls) -> type:
        from downstream.seg.config import SegTrainConfig

        return SegTrainConfig

    @classmethod
    def task_configs(cls, settings: dict, stores: list[str], out: Path, variants: dict | None = None) -> list:
        """One train-seg config per seed, into OUT/head-seed<s> (variants concatenated unless the head says)."""
        from downstream.seg.config import SegTrainConfig

        head = dict(settings["head"])
        if variants:
            head.setdefault("variants", "concat")
        return [SegTrainConfig.from_dict(dict(features=stores, out=str(out / f"head-seed{seed}"), seed=seed, **head))
                for seed in settings["seeds"]]

    def run(self) -> dict:
        from downstream.seg.evaluate import eval_seg
        from downstream.seg.train import train_seg

        data = self.settings["data"]
        train_store = self.extract(data["train"], "train")
        test_store = self.extract(data["test"], "test")
        reduction = self.settings["evaluate"].get("reduction", "mmseg")
        per_seed, runs = [], []
        for config in self.task_configs(self.settings, [train_store], self.out, self.variants):
            folder = Path(config.out)
            done = (folder / "model.safetensors").is_file()
            run = train_seg(config, resume=folder.is_dir() and not done, progress=self.progress) if not done \
                else folder
            scores = eval_seg(run, [test_store], progress=self.progress,
                              resolution=self.settings["evaluate"].get("resolution", "original"),
                              out=str(folder / "eval-test"))
            per_seed.append(segmentation_numbers(scores, reduction))
            runs.append(str(folder))
        return {"groups": {"head": {k: summarise([s[k] for s in per_seed]) for k in per_seed[0]}}, "runs": runs,
                "stores": [train_store, test_store]}


def segmentation_numbers(scores: dict, reduction: str) -> dict:
    """The protocol's numbers (×100) of one eval-seg: mmseg's nanmean mIoU / mAcc / aAcc, or ddpm-segmentation's
    mIoU where a class absent from both masks and predictions counts 0."""
    pct = {"miou": 100 * scores["miou"], "mean_accuracy": 100 * scores["mean_accuracy"],
           "pixel_accuracy": 100 * scores["pixel_accuracy"]}
    if reduction == "ddpm-seg":
        ious = [0.0 if v is None else v for v in scores["per_class_iou"].values()]
        pct["miou"] = 100 * sum(ious) / len(ious)
    return pct


class ClassificationRunner(TaskRunner):
    """extract every split → key,label tables from the data set's label column → train-cls per method and seed."""

    task = "classification"

    own_section, own_extra = "head", ("methods",)
    own_help = "methods and train-cls's options (difffeat train-cls --help)"

    @classmethod
    def own_config(cls) -> type:
        from downstream.cls.config import ClsTrainConfig

        return ClsTrainConfig

    @classmethod
    def task_configs(cls, settings: dict, stores: list[str], out: Path, labels: tuple[str, str] = ("LABELS",) * 2
                     ) -> list:
        """One train-cls config per method and seed, into OUT/<method>-seed<s>."""
        from downstream.cls.config import ClsTrainConfig

        head = dict(settings["head"])
        methods = head.pop("methods")
        return [ClsTrainConfig.from_dict(dict(features=stores, labels=labels[0], test_labels=labels[1],
                                              out=str(out / f"{method}-seed{seed}"), method=method, seed=seed, **head))
                for method in methods for seed in settings["seeds"]]

    def labels(self, split: str) -> Path:
        layout = open_data(f"{self.layout}:{self.root}:{split}")
        column = self.settings["data"].get("label_column", "label")
        rows = getattr(layout, "rows", {})
        table = self.out / f"labels-{split}.csv"
        missing = [s.key for s in layout.samples if column not in rows.get(s.key, {})]
        if missing:
            raise UserError(f"{self.root}: {len(missing)} images of split {split} have no {column!r} column in their "
                            f"metadata (first: {missing[0]}); the protocol needs image labels")
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "label"])
            writer.writerows((s.key, rows[s.key][column]) for s in layout.samples)
        return table

    def run(self) -> dict:
        from downstream.cls.train import train_cls

        data = self.settings["data"]
        store = self.extract(None, "all")
        labels = str(self.labels(data["train"])), str(self.labels(data["test"]))
        per_method: dict[str, list[dict]] = {}
        runs = []
        for config in self.task_configs(self.settings, [store], self.out, labels):
            folder = Path(config.out)
            if not (folder / "metrics.json").is_file():
                train_cls(config, resume=folder.is_dir(), progress=self.progress)
            per_method.setdefault(config.method, []).append(
                classification_numbers(read_json(folder / "metrics.json", "scores")))
            runs.append(str(folder))
        groups = {method: {k: summarise([s[k] for s in per_seed]) for k in per_seed[0]}
                  for method, per_seed in per_method.items()}
        return {"groups": groups, "runs": runs, "stores": [store]}


def classification_numbers(metrics: dict) -> dict:
    """Accuracy ×100 on the whole test split, class-mean, and on many / medium / few classes."""
    full = metrics["full_test"]
    shots = full.get("shots") or {}
    out = {"accuracy": full["accuracy"], "class_mean_accuracy": full["class_mean_accuracy"],
           "many": shots.get("many"), "medium": shots.get("medium"), "few": shots.get("few")}
    return {k: None if v is None else 100 * v for k, v in out.items()}


class CorrespondenceRunner(TaskRunner):
    """extract the test split's images → eval-corr (nearest neighbour or window soft-argmax) per seed."""

    task = "correspondence"

    own_section, own_extra = "match", ("working_size",)
    own_help = "working_size and eval-corr's options (difffeat eval-corr --help)"

    @classmethod
    def own_config(cls) -> type:
        from downstream.corr.config import CorrEvalConfig

        return CorrEvalConfig

    @classmethod
    def task_configs(cls, settings: dict, stores: list[str], out: Path, data: str | None = None) -> list:
        """One eval-corr config per seed, into OUT/match-seed<s>; ``working_size: image`` matches at each image's
        own size."""
        from downstream.corr.config import CorrEvalConfig

        match = dict(settings["match"])
        working = match.pop("working_size", "image")
        return [CorrEvalConfig.from_dict(dict(features=stores, data=data, out=str(out / f"match-seed{seed}"), seed=seed,
                                              working_size=None if working == "image" else working, **match))
                for seed in settings["seeds"]]

    def run(self) -> dict:
        from downstream.corr.evaluate import eval_corr

        store = self.extract(self.settings["data"]["test"], "test")
        data = f"{self.layout}:{self.root}:{self.settings['data']['test']}"
        per_seed, runs = [], []
        for config in self.task_configs(self.settings, [store], self.out, data):
            results = eval_corr(config.features, config.data, progress=self.progress,
                                **{k: v for k, v in config.to_dict().items() if k not in ("features", "data")})
            per_seed.append(correspondence_numbers(results["summary"], 0.1 if 0.1 in config.alphas
                                                   else config.alphas[0]))
            runs.append(config.out)
        method = "nearest neighbour" if not self.settings["match"].get("soft_argmax") else "soft-argmax"
        return {"groups": {method: {k: summarise([s[k] for s in per_seed]) for k in per_seed[0]}},
                "runs": runs, "stores": [store]}


def correspondence_numbers(summary: dict, alpha: float) -> dict:
    """PCK@α ×100 per image and per point, bounding-box and image normalisation, from eval-corr's summary."""
    def value(key):
        v = summary[key]
        return 100 * (v["value"] if isinstance(v, dict) else v)

    return {"pck_image": value(f"pck@{alpha}_bbox_per_image"), "pck_point": value(f"pck@{alpha}_bbox_per_point"),
            "pck_image_img": value(f"pck@{alpha}_img_per_image"),
            "pck_point_img": value(f"pck@{alpha}_img_per_point")}


TASKS: dict[str, type[TaskRunner]] = {r.task: r for r in (SegmentationRunner, ClassificationRunner,
                                                          CorrespondenceRunner)}


def data_root(protocol: Protocol, settings: dict, data: str | None, out: Path, smoke: bool) -> Path:
    """The data root the run reads: the built-in world written in the protocol's layout (smoke), or the user's,
    checked to hold the protocol's layout and splits (one line naming what was expected)."""
    layout = settings["data"]["layout"]
    if smoke:
        (out / "data").mkdir(parents=True, exist_ok=True)
        return smoke_world(protocol, layout, out / "data", int(settings.get("smoke_n", 30)))
    if data is None:
        raise UserError(f"protocol {protocol.name}: give --data ROOT (a {layout} tree), or --smoke")
    root = Path(data)
    found = detect_layout(root) if root.is_dir() else None
    if found is not None and found != layout and LAYOUTS.get(found) is not LAYOUTS.get(layout):
        raise UserError(f"{root}: holds a {found} tree; protocol {protocol.name} reads the {layout} layout")
    for role in ("train", "test"):
        split = settings["data"].get(role)
        if split:
            try:
                open_data(f"{layout}:{root}:{split}").samples  # noqa: B018 - listing is the check
            except UserError as e:
                raise UserError(f"protocol {protocol.name} expects the {layout} layout with split {split!r}: {e}") \
                    from None
    return root


def smoke_world(protocol: Protocol, layout: str, folder: Path, n: int) -> Path:
    """The built-in world in `layout` (made once; a resumed run finds it)."""
    root = folder / "world"
    if (root / "classes.json").is_file():
        return root
    make = SMOKE_WORLDS.get(layout)
    if make is None:
        raise UserError(f"protocol {protocol.name}: no built-in world in layout {layout} for --smoke")
    return make(root, n)


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_protocol(protocol: Protocol, out: str | os.PathLike, *, data: str | None = None, model: str | None = None,
                 overrides: dict | None = None, variants: dict | None = None, smoke: bool = False,
                 progress: bool = True, pipe=None) -> dict:
    """Run `protocol` into `out` (see the module doc) and return results.json's content; `pipe`, a loaded pipeline
    of the run's model, saves loading it again (tests)."""
    from downstream.protocols.report import write_report

    settings, departures = protocol.resolved(model=model, overrides=overrides, smoke=smoke)
    runner_cls = TASKS.get(protocol.task)
    if runner_cls is None:
        raise UserError(f"protocol {protocol.name}: task {protocol.task!r} cannot run yet (runnable: "
                        f"{', '.join(TASKS)})")
    runner_cls.check(protocol, settings)
    out = Path(out)
    root = data_root(protocol, settings, data, out, smoke)  # a user's data is checked before OUT is made
    out.mkdir(parents=True, exist_ok=True)
    if variants:
        departures.append(f"variants: {', '.join(variants)} (techniques on top of the protocol)")
    outcome = runner_cls(protocol, settings, out, root, progress, variants or {}, pipe).run()
    results = {"protocol": protocol.name, "version": protocol.version, "title": protocol.title,
               "is_protocol": not departures, "departures": departures, "data": str(root), "settings": settings,
               "results": outcome["groups"], "anchors": protocol.anchors, "differences": protocol.differences,
               "report": protocol.report, "runs": outcome["runs"], "stores": outcome["stores"],
               "versions": library_versions(), "machine": machine()}
    write_json_atomic(out / "results.json", results)
    write_report(results, out / "report.html")
    return results
