"""`difffeat sweep` / `gate.sweep(...)`: which layer, timestep, technique variant and noise mode give the best
features for a labelled image set, found by a cheap probe, with the winner written as an extraction config.

A *configuration* is (variant, noise mode, t, layer). Every one is scored the same way (`gate.sweep_probe`):
reduced features of a small labelled set, a ridge / logistic / kNN probe fitted on every other image and
scored on the rest, and a bootstrap interval over the scored images.

Cost: the VAE encodes each image once; for each (variant, noise mode) the extractor runs one UNet pass per
(image, t) with hooks on every layer still in the race (early exit after the deepest), and each layer's
maps are reduced as they come, so memory stays flat. **Successive halving** spends the images where they
matter: every configuration is scored on the first `min_images` images (a seeded shuffle), the top `keep`
fraction goes on, the image count doubles, and so on until all `n` images; a configuration dropped at a rung
keeps the score it had there (its row says which rung). The run folder (`difffeat.spine.run.RunFolder`, kind
"sweep") checkpoints after every (rung, variant, noise mode) unit, and a resumed run gives the same ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difffeat.errors import UserError
from difffeat.spine.run import Config, ConfigError, RunFolder, option
from gate.candidates import NAME
from gate.sweep_search import Candidate, Search, kept_count, rung_sizes

KIND = "sweep"
PROMPT_SOURCES = ("fixed", "sidecar", "csv", "label")
# Layer sets only a sweep needs (every block's output); presets and module names work as in `extract`.
LAYER_SETS = {
    "up-blocks": lambda names: [n for n in names if re.fullmatch(r"up_blocks\.\d+", n)],
    "all-blocks": lambda names: [n for n in names if re.fullmatch(r"(down_blocks|up_blocks)\.\d+|mid_block", n)],
}
# Its own files by exact name: a heat map per variant of the saved config, never a glob over `heatmap-*` (a user's
# `heatmap-mine.png` beside them stays; `difffeat.spine.run.RunFolder`).
OWNED = ("ranking.csv", "ranking.json", "heatmap-{variants}.png", "report.html", "best.json", "variants.yaml")
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """'8GB', '512M', '1.5g', '1000000' → bytes (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8GB, 512MB)")
    return int(float(m[1]) * UNITS[m[2].lower()])


def human(nbytes: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


@dataclass
class SweepConfig(Config):
    """Everything that defines a sweep; written to the run folder (`config.json`), and a run repeats from it."""

    location_fields = ("out", "max_memory")  # where it writes and how much it may use: not what it computes

    images: str = option(help="image folder, glob, imagefolder or hf:NAME[:SPLIT]")
    labels: str = option(help="masks (a Shapes-LT / imagefolder root, or a folder of masks named like the images) "
                              "or a key,label CSV")
    out: str | None = option(None, help="run folder (ranking, heat maps, report, best.json)")
    model: str = option("mini", help="model name, folder, single file or Hub id")
    layers: list[str] = option(default_factory=lambda: ["up-blocks"], metavar="LAYER",
                               help="module name, preset (dift, gdf-legacy, hyperfeatures), up-blocks (every up "
                                    "block's output) or all-blocks (every down, mid and up block's output); repeat")
    timesteps: list[int] = option(default_factory=lambda: [25, 50, 100, 200, 400], min=0, flag="--t",
                                  help="timesteps (commas or spaces)")
    variants: dict[str, list[str]] = option(default_factory=lambda: {"plain": []}, cli=False,
                                            help="technique variants: name → technique specs")
    ensemble: list[int] = option(default_factory=lambda: [1], min=1,
                                 help="noise modes: noise draws averaged per image and t (1,4 sweeps both)")
    clean: bool = option(False, help="also sweep the clean mode (no noise: the clean latent at t)")
    n: int = option(64, min=0, help="labelled images drawn (seeded); 0: all")
    seed: int = option(0, help="image draw and order, noise, projections and bootstrap")
    prompt: str = option("", help="base prompt of every image (prompt techniques rewrite it)")
    prompt_source: str = option("fixed", choices=PROMPT_SOURCES, flag="--prompt-from",
                                help="base prompts as in `difffeat extract --prompt-from`")
    caption_column: str = option("fine_caption", help="metadata column of an image's caption")
    probe: str = option("ridge", choices=("ridge", "logistic", "knn"),
                        help="probe: ridge (masks or labels), logistic or knn (labels only)")
    ridge_lambda: float = option(1e-3, above=0, help="L2 strength of ridge / logistic, per row")
    width: int = option(64, min=1, help="channels kept per layer (wider layers are projected to this)")
    reduce: str = option("random", choices=("random", "pca"), help="how wider layers are reduced")
    min_images: int = option(16, min=4, help="images of the first successive-halving rung (≥ n: no halving)")
    keep: float = option(0.5, above=0, max=1, help="fraction of configurations kept at each rung")
    top_k: int = option(3, min=1, help="configurations in the variants file, and kept to the last rung")
    greedy: bool = option(False, help="forward selection of a layer set (concatenated) for the winner")
    n_boot: int = option(1000, min=100, flag="--boot", help="bootstrap resamples")
    level: float = option(0.95, above=0, max=0.999, help="interval level")
    batch_size: int = option(8, min=1, help="images per extraction call (and UNet batch)")
    max_memory: str | None = option(None, metavar="SIZE",
                                    help="refuse a sweep whose memory estimate (the process, its model and the "
                                         "sweep's data) is above this (e.g. 8GB)")

    def check(self) -> None:
        if not self.timesteps or len(set(self.timesteps)) != len(self.timesteps):
            raise ConfigError("timesteps", f"give distinct timesteps, got {self.timesteps}")
        if not self.ensemble or len(set(self.ensemble)) != len(self.ensemble):
            raise ConfigError("ensemble", f"give distinct draw counts, got {self.ensemble}")
        if not self.layers:
            raise ConfigError("layers", "give at least one layer")
        if not isinstance(self.variants, dict) or not self.variants:
            raise ConfigError("variants", "give at least one variant (name → technique specs)")
        for name, specs in self.variants.items():
            if not NAME.match(str(name)):
                raise ConfigError("variants", f"variant name {name!r} must be letters, digits, '_', '-' or '.'")
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise ConfigError("variants", f"variant {name!r} must be a list of technique specs")
        if self.n and self.n < 4:
            raise ConfigError("n", f"the probe needs at least 4 images (2 to fit, 2 to score), got {self.n}")
        if self.max_memory is not None:
            try:
                parse_size(self.max_memory)
            except ValueError as e:
                raise ConfigError("max_memory", str(e)) from None

    @property
    def noise_modes(self) -> list[str]:
        return [f"noise-x{e}" for e in self.ensemble] + (["clean"] if self.clean else [])



def expand_layers(pipe, wanted: list[str], resolution: tuple[int, int]) -> list[str]:
    """Layer names in forward order: the sweep's layer sets, presets and module names (checked)."""
    from difffeat.models.layers import list_layers, resolve_layers

    names = [name for name, _ in list_layers(pipe, *resolution)]
    plain = []
    for layer in wanted:
        plain += LAYER_SETS[layer](names) if layer in LAYER_SETS else [layer]
    if not plain:
        raise ConfigError("layers", f"{', '.join(wanted)} names no layer of this UNet")
    return resolve_layers(pipe, plain, *resolution)


# ---------------------------------------------------------------------------------------- memory
def estimate_memory(cfg: SweepConfig, pipe, shapes: dict[str, tuple[int, int, int]], plan: list[Candidate],
                    n: int, resolution: tuple[int, int], task: str, n_classes: int) -> dict[str, int]:
    """Bytes the sweep will hold at its peak, by part (an estimate: the UNet's own working memory is taken as a
    few of its largest activations). "the process itself" is what this process holds now, before any sweep work
    (Python, torch, the libraries; the model's weights on the host are their own part): a budget below it and the
    weights can never be kept."""
    from difffeat.models.layers import latent_size, list_layers
    from difffeat.utils.measure import rss_bytes

    h_img, w_img = resolution
    lh, lw = latent_size(pipe, h_img, w_img)
    modules = [m for m in (getattr(pipe, a, None) for a in ("unet", "vae", "text_encoder", "text_encoder_2")) if m]
    weights = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    on_host = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.device.type == "cpu")
    process = max(0, rss_bytes() - on_host)
    size = {name: c * h * w for name, (c, h, w) in shapes.items()}
    biggest = max(c * h * w for _, (c, h, w) in list_layers(pipe, h_img, w_img))
    n_t = len(cfg.timesteps)
    batch = cfg.batch_size * (n_t * sum(size.values()) + sum(size.values()) + 6 * biggest) * 4
    data = n * (3 * h_img * w_img * 4 + 4 * lh * lw * 4 + (h_img * w_img * 8 if task == "seg" else 8))
    dims = {name: min(c, cfg.width) for name, (c, _, _) in shapes.items()}

    def state(c: Candidate, images: int) -> int:
        d = dims[c.layer]
        if task == "cls":
            return images * d * 8
        _, h, w = shapes[c.layer]
        return (d * d + d * n_classes + 2 * d + n_classes) * 8 + (images + 1) // 2 * d * h * w * 4

    peak, alive = 0, list(plan)  # the largest rung: every configuration alive there holds its state
    for images in rung_sizes(n, cfg.min_images):
        ordered = sorted(alive, key=lambda c: -state(c, images))  # worst case: the largest ones survive
        peak = max(peak, sum(state(c, images) for c in ordered))
        alive = ordered[: kept_count(len(ordered), cfg.keep, cfg.top_k)]
    greedy = n * sum(dims[c] * shapes[c][1] * shapes[c][2] for c in shapes) * 4 if cfg.greedy else 0
    return {"the process itself": process, "model weights": weights, "images, latents and labels": data,
            "extraction batch": batch,
            "probe state": peak, "greedy features": greedy}


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class SweepInputs:
    """The labelled images in sweep order (a seeded shuffle: every rung is a random subset) and their targets."""

    inputs: Any  # gate.inputs.GateInputs
    targets: Any  # gate.sweep_probe.Targets
    classes: list[str]
    unlabelled: int

    @property
    def roles(self) -> list[str]:
        """Every other image fits the probe, the rest are scored (so each rung is split evenly)."""
        return ["fit" if i % 2 == 0 else "score" for i in range(len(self.inputs))]


def load_sweep_inputs(cfg: SweepConfig, source, labelset, resolution: tuple[int, int], stacks: dict) -> SweepInputs:
    """Images (resized), prompts, fields and targets of the labelled images drawn; bad ones dropped and named."""
    import numpy as np

    from difffeat.extraction.runner import ExtractRunConfig, PromptSource
    from gate.inputs import drop_unusable, read_items, sample_items
    from gate.sweep_labels import IGNORE, load_mask
    from gate.sweep_probe import Targets

    labelled = set(labelset.keys)
    items = sample_items([it for it in source.items if it.key in labelled], cfg.n or None, cfg.seed)
    prompts = PromptSource(ExtractRunConfig(images=cfg.images, out="", prompt=cfg.prompt,
                                            prompt_source=cfg.prompt_source, caption_column=cfg.caption_column),
                           source)

    def target(item):
        return load_mask(labelset.masks[item.key], resolution) if labelset.task == "seg" else \
            labelset.labels[item.key]

    read, values = read_items(source, prompts, items, resolution, target=target)
    inputs = drop_unusable(read, stacks)
    values = [values[read.keys.index(k)] for k in inputs.keys]
    if len(inputs) < 4:
        reasons = "; ".join(f"{d['key']}: {d['reason']}" for d in inputs.dropped[:3])
        raise UserError(f"{cfg.images}: {len(inputs)} usable labelled image(s); the probe needs at least 4 "
                        f"(half to fit, half to score)" + (f" ({len(inputs.dropped)} dropped: {reasons})"
                                                            if inputs.dropped else ""))
    order = np.random.default_rng(cfg.seed).permutation(len(inputs)).tolist()
    inputs = inputs.subset(order)
    values = [values[i] for i in order]
    if labelset.task == "seg":
        present = [int(v[v != IGNORE].max()) for v in values if (v != IGNORE).any()]
        if not present:
            raise UserError(f"{labelset.path}: every mask pixel of the drawn images is 255 (ignore)")
        classes = [str(c) for c in range(max(present) + 1)]
        targets = Targets("seg", values, len(classes))
    else:
        classes = sorted(set(values))
        if len(classes) < 2:
            raise UserError(f"{labelset.path}: the drawn images have one class ({classes[0]!r}); a probe needs two")
        targets = Targets("cls", [classes.index(v) for v in values], len(classes))
    return SweepInputs(inputs, targets, classes, labelset.unlabelled)


# ---------------------------------------------------------------------------------------- the result
@dataclass
class SweepResult:
    """What a sweep found: every configuration's probe score with its interval, the rungs and the winner."""

    config: SweepConfig
    task: str
    metric: str
    keys: list[str]
    dropped: list[dict]
    unlabelled: int
    classes: list[str]
    shapes: dict[str, list[int]]  # layer → [C, h, w]
    plan: list[Candidate]
    rungs: list[dict]
    skipped: list[dict]
    greedy: dict | None = None
    estimate: dict[str, int] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def table(self) -> list[dict]:
        """One row per configuration, best first: survivors of later rungs above those dropped earlier (they beat
        them there), then by score; ties keep the plan's order."""
        last: dict[str, tuple[int, dict]] = {}
        for r in self.rungs:
            for cid, score in r["scores"].items():
                last[cid] = (r["rung"], score)
        order = {c.id: i for i, c in enumerate(self.plan)}
        ids = sorted(last, key=lambda cid: (-last[cid][0], -last[cid][1]["value"], order[cid]))
        final = len(self.rungs) - 1
        rows = []
        for rank, cid in enumerate(ids, 1):
            c = next(p for p in self.plan if p.id == cid)
            rung, s = last[cid]
            ch, h, w = self.shapes[c.layer]
            rows.append({"rank": rank, "config": cid, "variant": c.variant,
                         "techniques": " + ".join(self.config.variants[c.variant]) or "(none)", "noise": c.noise,
                         "t": c.t, "layer": c.layer, "channels": ch, "grid": f"{h}x{w}", self.metric: s["value"],
                         "low": s["low"], "high": s["high"], "width": s["high"] - s["low"], "rung": rung + 1,
                         "images": self.rungs[rung]["images"],
                         "status": "final" if rung == final else f"dropped at rung {rung + 1}"})
        return rows

    def best(self) -> dict:
        return self.table()[0]

    def candidate(self, row: dict) -> Candidate:
        return next(c for c in self.plan if c.id == row["config"])

    def extract_config(self, row: dict | None = None) -> dict:
        """The bare `difffeat extract` config of a row (default the winner, with the greedy layer set when one
        was selected): `difffeat extract --config FILE [IMAGES] --out DIR` runs it as is."""
        from difffeat.extraction.runner import ExtractRunConfig

        row = row or self.best()
        c, cfg = self.candidate(row), self.config
        layers = [c.layer]
        if self.greedy and row["config"] == self.greedy["start"]:
            layers = list(self.greedy["selected"])
        ext = ExtractRunConfig(images=cfg.images, out="", model=cfg.model, layers=layers, timesteps=[c.t],
                               seed=cfg.seed, ensemble=c.ensemble, batch_size=cfg.batch_size,
                               noise=c.noise != "clean", prompt=cfg.prompt, prompt_source=cfg.prompt_source,
                               caption_column=cfg.caption_column, techniques=list(cfg.variants[c.variant]))
        data = dataclasses.asdict(ext)
        data.pop("out")
        return data

    def top_variants(self) -> dict[str, list[str]]:
        """The technique variants of the top_k configurations, best first (what `extract --variants` reads)."""
        names = dict.fromkeys(row["variant"] for row in self.table()[: self.config.top_k])
        return {name: list(self.config.variants[name]) for name in names}

    def to_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "probe": self.config.probe, "images": len(self.keys),
                "keys": self.keys, "dropped": self.dropped, "unlabelled": self.unlabelled, "classes": self.classes,
                "layers": self.shapes, "rungs": [{k: v for k, v in r.items() if k != "scores"} for r in self.rungs],
                "ranking": self.table(), "greedy": self.greedy, "skipped": self.skipped,
                "best": self.extract_config(), "top_variants": self.top_variants(), "estimate": self.estimate,
                "timings": self.timings, "config": self.config.to_dict()}


# ---------------------------------------------------------------------------------------- entry point
def sweep(images: str | None = None, labels: str | None = None, out: str | None = None, *,
          config: SweepConfig | None = None, pipe=None, resume: bool = False, overwrite: bool = False,
          progress: bool = False, stop_after: int | None = None, **fields) -> SweepResult | None:
    """Run a sweep (see the module doc); with `out`, in a resumable run folder that receives the ranking, heat
    maps, report, ``best.json`` and ``variants.yaml``. Field names of `SweepConfig` are keyword arguments.

    Returns None when `stop_after` (units of work of this call) stopped it early; `resume=True` goes on.
    """
    from difffeat.data.sources import ImageSource
    from difffeat.extraction.conditioning import technique_provider, technique_stack
    from difffeat.models.layers import list_layers, native_resolution
    from difffeat.zoo import load_pipeline
    from gate.sweep_labels import match_labels
    from gate.sweep_probe import PROBES, ProbeSpec

    t_start = time.perf_counter()
    if config is None:
        given = {"images": images, "labels": labels, "out": None if out is None else str(out), **fields}
        config = SweepConfig.from_dict({k: v for k, v in given.items() if v is not None or k == "out"})
    cfg = config.validate()
    try:  # one spelling per technique (a plain-only sweep needs no technique package)
        variants = {name: [technique_provider().canonical_spec(s) for s in specs]
                    for name, specs in cfg.variants.items()}
    except UserError as e:
        raise ConfigError("variants", str(e)) from None
    cfg = dataclasses.replace(cfg, variants=variants)
    source = ImageSource(cfg.images)
    if not source.items:
        raise UserError(f"{cfg.images}: no images found")
    labelset = match_labels(cfg.labels, source, cfg.images)
    if cfg.probe not in PROBES[labelset.task]:  # before anything heavy starts
        raise ConfigError("probe", f"{cfg.probe!r} does not score {'masks' if labelset.task == 'seg' else 'labels'};"
                                   f" use {' or '.join(PROBES[labelset.task])}")
    run = RunFolder(cfg.out, KIND, cfg, resume=resume, overwrite=overwrite, owned=OWNED,
                    ignore=SweepConfig.location_fields) if cfg.out else None
    pipe = pipe or load_pipeline(cfg.model)
    n_train = pipe.scheduler.config.num_train_timesteps
    if any(not 0 <= t < n_train for t in cfg.timesteps):
        raise ConfigError("timesteps", f"must be in [0, {n_train}), got {cfg.timesteps}")
    resolution = native_resolution(pipe)
    layers = expand_layers(pipe, cfg.layers, resolution)
    shapes = {name: list(shape) for name, shape in list_layers(pipe, *resolution) if name in layers}
    # Each variant's techniques are bound once (ControlNet / LoRA loads) and shared by all its extractors.
    stacks = {name: technique_stack(pipe, specs) for name, specs in cfg.variants.items()}
    plan, skipped = [], []
    for name in cfg.variants:
        for noise in cfg.noise_modes:
            try:
                stacks[name].check(cfg.timesteps, noise != "clean")
            except UserError as e:
                if noise != "clean":  # a variant that cannot run at the requested timesteps at all
                    raise ConfigError("variants", f"{name}: {e}") from None
                skipped.append({"group": f"{name}/{noise}", "reason": str(e)})
                continue
            plan += [Candidate(name, noise, t, layer) for t in cfg.timesteps for layer in layers]
    if not plan:
        raise UserError("no configuration can run: " + "; ".join(f"{s['group']}: {s['reason']}" for s in skipped))
    n = min(cfg.n or len(labelset.keys), len(labelset.keys))
    estimate = estimate_memory(cfg, pipe, {k: tuple(v) for k, v in shapes.items()}, plan, n, resolution,
                               labelset.task, 256)
    total = sum(estimate.values())
    if cfg.max_memory is not None and total > parse_size(cfg.max_memory):
        parts = ", ".join(f"{k} {human(v)}" for k, v in estimate.items() if v)
        floor = estimate["the process itself"] + estimate["model weights"]
        what = (f"the process and the model alone hold {human(floor)} before any sweep work: give a budget above "
                "that" if parse_size(cfg.max_memory) < floor else "lower n, width, batch size, layers or timesteps")
        raise ConfigError("max_memory", f"the sweep needs about {human(total)} ({parts}), above {cfg.max_memory}; "
                                        f"{what}")
    data = load_sweep_inputs(cfg, source, labelset, resolution, stacks)
    spec = ProbeSpec(labelset.task, len(data.classes), cfg.probe, cfg.ridge_lambda, cfg.n_boot, cfg.level, cfg.seed)
    if run is not None:
        run.create()
    search = Search(cfg, pipe, data, plan, spec, stacks, run, progress)
    search.restore()
    if not search.search(stop_after):
        return None
    if cfg.greedy and len(layers) > 1:
        if search.state["greedy"] is None:
            search.state["greedy"] = search.greedy(layers)
            search.save()
    result = SweepResult(cfg, labelset.task, labelset.metric, list(data.inputs.keys), list(data.inputs.dropped),
                         data.unlabelled, data.classes, shapes, plan, search.state["rungs"], skipped,
                         search.state["greedy"], estimate,
                         {"extract": round(search.seconds["extract"], 3), "probe": round(search.seconds["probe"], 3),
                          "total": round(time.perf_counter() - t_start, 3)})
    if run is not None:
        from gate.sweep_report import write_outputs

        write_outputs(result, run)
    return result


# ---------------------------------------------------------------------------------------- command line
def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _field_help(name: str) -> str:
    """A list field's help with its default written out (the default itself stays in the field)."""
    f = next(f for f in dataclasses.fields(SweepConfig) if f.name == name)
    return f"{f.metadata['help']} (default: {','.join(map(str, f.default_factory()))})"


def add_sweep_command(subparsers) -> None:
    """Add `sweep` to difffeat's sub-commands (flags generated from `SweepConfig`)."""
    from difffeat.spine.config_cli import add_config_arguments

    p = subparsers.add_parser("sweep", help="probe-scored search over layers, timesteps, techniques and noise "
                                            "modes; writes the best extraction config",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p, SweepConfig, positional=("images",), exclude=("timesteps", "ensemble"))
    # Lists of integers take "25,50,100" (the form) as well as "25 50 100".
    # SUPPRESS: an absent flag leaves the field to its own default (`config_from_args` skips it).
    p.add_argument("--t", dest="timesteps", type=_int_list, nargs="+", metavar="T", default=argparse.SUPPRESS,
                   help=_field_help("timesteps"))
    p.add_argument("--ensemble", type=_int_list, nargs="+", metavar="E", default=argparse.SUPPRESS,
                   help=_field_help("ensemble"))
    p.set_defaults(_config_flags={**(p.get_default("_config_flags") or {}), "timesteps": "--t",
                                  "variants": "--techniques / --variant"})
    p.add_argument("--techniques", metavar="FILE.yaml", help="technique variants: a variants file (name → technique "
                                                             "specs, as `extract --variants`); default one plain "
                                                             "variant")
    p.add_argument("--variant", action="append", metavar="NAME=SPEC[+SPEC…]", help="a technique variant; repeat")
    p.add_argument("--config", help="repeat a run: its config.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--stop-after", type=int, help="stop after N units of work (--resume goes on)")
    p.set_defaults(func=_cmd_sweep)


def _variants_from_args(args) -> dict[str, list[str]] | None:
    from difffeat.extraction.conditioning import variants_given

    return variants_given(args.techniques, args.variant or []) or None


def _cmd_sweep(args) -> None:
    from difffeat.spine.config_cli import config_from_args, flag_of
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()
    for name in ("timesteps", "ensemble"):
        if getattr(args, name, None) is not None:
            setattr(args, name, [v for part in getattr(args, name) for v in part])
    try:
        if args.config:
            override = {"out": args.out} | ({"images": args.images} if args.images else {})
            cfg = SweepConfig.from_run(args.config, **override)
        else:
            if not args.images or not args.labels or not args.out:
                raise UserError("give IMAGES, --labels LABELS and --out DIR (or --config DIR/config.json)")
            variants = _variants_from_args(args)
            cfg = config_from_args(SweepConfig, args, **({"variants": variants} if variants else {}))
        result = sweep(config=cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                       stop_after=args.stop_after)
    except ConfigError as e:
        raise UserError(f"{flag_of(args, e.field)}: {e.reason}") from None
    if result is None:
        print(f"stopped after {args.stop_after} unit(s) of work; continue with --resume")
        return
    print_summary(result, sys.stdout)
    print(watch.finish_line(f"sweep: {len(result.plan)} configuration(s) on {len(result.keys)} images, report in "
                            f"{result.config.out}", count=len(result.keys), unit="images"))


def print_summary(result: SweepResult, stream) -> None:
    metric, out = result.metric, Path(result.config.out)
    print(f"sweep of {len(result.plan)} configuration(s) on {len(result.keys)} labelled images "
          f"({result.task}: {metric}, {result.config.probe} probe, {len(result.dropped)} dropped)", file=stream)
    for r in result.rungs:
        print(f"  rung {r['rung'] + 1}: {r['images']} images, {r['configurations']} configurations, "
              f"{len(r['kept'])} kept, {r['dropped']} dropped", file=stream)
    for row in result.table()[:10]:
        print(f"  {row['rank']:>3}. {row['config']:<40} {metric} {row[metric]:.3f} [{row['low']:.3f}, "
              f"{row['high']:.3f}]  ({row['status']})", file=stream)
    if result.greedy:
        print(f"  greedy layer set: {' + '.join(result.greedy['selected'])}", file=stream)
    print(f"best extraction config: {out / 'best.json'} (difffeat extract --config {out / 'best.json'} --out DIR)",
          file=stream)
    print(f"report: {out / 'report.html'}", file=stream)
