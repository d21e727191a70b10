"""`difffeat demo [--out DIR] [--minutes 5]`: the whole used-by chain on the built-in world, in a few minutes.

    data synth → gate --greedy --emit → extract --variants → train-seg (plain | GATE-chosen) → eval-seg → report

Every step is an ordinary `difffeat` command, run through the CLI entry point (`difffeat.cli.main`) and printed
before it runs, so the demo is also a list of commands to copy. It imports none of the packages behind `gate`,
`train-seg` or `eval-seg`: it only calls their commands; and the core does not import it (an application over the
chain, registered as a command like every package's). `--minutes` sets the time budget on a laptop
CPU; it scales the world, GATE and training together (1 is the smallest, about a minute here).

The demo folder is a run folder of kind ``demo``: its ``config.json`` marks it, every step writes below it, and
``--resume`` skips the steps that finished.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import Config, RunFolder, option

LAYER = "dift"  # the up-block the DIFT paper uses; mini's `up_blocks.1`
SUB_RUNS = ("shapes", "candidates.yaml", "variants.yaml", "gate", "features", "seg-plain", "seg-gate",
            "report.html", "demo.json")


@dataclass
class DemoConfig(Config):
    """What a demo run does; the sizes follow from `minutes` (see `plan`)."""

    out: str = option("runs/demo", help="the demo folder (a difffeat run folder of kind demo)")
    minutes: float = option(5.0, min=1, max=60, help="time budget on a laptop CPU; scales the world, GATE and "
                                                    "training (1: the smallest, about a minute)")
    seed: int = option(0, help="seed of the world, GATE's draw and noise, and the heads")


@dataclass(frozen=True)
class Plan:
    """The sizes of one demo, chosen from its time budget."""

    images: int  # Shapes-LT scenes in all (80/10/10 train/val/test)
    gate_images: int  # test images GATE ranks the candidates on
    gate_steps: int  # img2img DDIM steps
    boot: int  # bootstrap resamples
    candidates: dict[str, list[str]]
    iterations: int  # per segmentation head

    def seconds(self) -> dict[str, float]:
        """Expected seconds per step on one free core (measured on the mini model), the start of the ETA; the
        ETA then follows the pace this machine shows."""
        train = 1 + 0.1 * self.iterations
        return {"synth": 0.5 + 0.015 * self.images,
                "gate": 6 + 0.15 * (len(self.candidates) + 1) * self.gate_images * self.gate_steps,
                "extract": 2 + 0.12 * self.images, "train-seg plain": train, "eval-seg plain": 1,
                "train-seg gate": train, "eval-seg gate": 1, "report": 2}


def plan(minutes: float) -> Plan:
    """Sizes for a budget of `minutes`: everything grows linearly from the smallest world (1 minute)."""
    m = max(1.0, float(minutes))
    candidates = {"canny": ["controlnet:canny"], "caption": ["prompt:caption"]}
    if m >= 2:  # a deliberately harmful candidate: another image's caption (GATE should reject it)
        candidates["other-caption"] = ["prompt:other-caption"]
    return Plan(images=int(round(60 * m, -1)), gate_images=min(16, 4 + 2 * round(m - 1)),
                gate_steps=10 if m < 2 else 20 if m < 4 else 25, boot=200 if m < 2 else 1000,
                candidates=candidates, iterations=int(round(60 * m, -1)))


class Steps:
    """Runs the steps through the CLI, printing each command, its time, and the time left (ETA)."""

    def __init__(self, expected: dict[str, float], quiet: bool):
        from difffeat.utils.progress import Stopwatch

        self.expected, self.quiet = expected, quiet
        self.watch = Stopwatch()
        self.done: dict[str, float] = {}
        self.skipped: set[str] = set()

    def eta(self) -> str:
        from difffeat.utils.progress import human_seconds

        ran = [k for k in self.done if k not in self.skipped]  # a skipped step says nothing about the pace
        planned_done = sum(self.expected[k] for k in ran) or 1.0
        actual_done = sum(self.done[k] for k in ran)
        left = sum(v for k, v in self.expected.items() if k not in self.done)
        pace = actual_done / planned_done if actual_done > 0 else 1.0  # how this machine compares to the plan
        return f"{human_seconds(self.watch.seconds)} so far, about {human_seconds(left * pace)} left"

    def run(self, name: str, what: str, argv: list[str], skip: bool = False, restart: list[str] = ()) -> None:
        """Run one step (`restart`: the flags that replace a step a resumed demo left unfinished)."""
        from difffeat.utils.progress import Stopwatch, human_seconds

        number = list(self.expected).index(name) + 1
        argv = argv if skip else [*argv, *restart]
        print(f"\n[{number}/{len(self.expected)}] {what}\n  $ difffeat {shlex.join(argv)}", flush=True)
        if skip:
            print("  done before (--resume): skipped", flush=True)
            self.done[name] = 0.0
            self.skipped.add(name)
            return
        watch = Stopwatch()
        code = _cli([*(["--quiet"] if self.quiet else []), *argv])
        self.done[name] = watch.seconds
        if code != 0:
            raise UserError(f"demo step {number} ({name}) failed with exit status {code}; its message is above")
        print(f"  ✓ {name} in {human_seconds(self.done[name])} · {self.eta()}", flush=True)

    def skip(self, name: str, why: str) -> None:
        number = list(self.expected).index(name) + 1
        print(f"\n[{number}/{len(self.expected)}] {name}: skipped ({why})", flush=True)
        self.done[name] = 0.0
        self.skipped.add(name)


def _cli(argv: list[str]) -> int:
    from difffeat.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse rejected the arguments (a command whose flags changed)
        return e.code if isinstance(e.code, int) else 2


def _variant_layers(store: Path) -> tuple[list[str], list[str]]:
    """(plain layers, GATE-chosen layers) of the demo's store: `plain/...` and every variant with techniques."""
    manifest = json.loads((store / "manifest.json").read_text())
    config = manifest.get("config") or {}
    variants = config.get("variants") or {}
    layers = [f"{name}/{layer}" for name in variants for layer in _store_layers(config)]
    plain = [x for x in layers if x.startswith("plain/")]
    chosen = [x for x in layers if x.split("/", 1)[0] != "plain" and variants.get(x.split("/", 1)[0])]
    return plain, chosen


def _store_layers(config: dict) -> list[str]:
    """Layer names as the store keys them within a variant (with ``@t`` when several timesteps)."""
    timesteps = config.get("timesteps") or [50]
    layers = config.get("layers") or []
    return layers if len(timesteps) == 1 else [f"{layer}@{t}" for t in timesteps for layer in layers]


def _write_candidates(path: Path, candidates: dict[str, list[str]]) -> None:
    from difffeat.utils.atomic import write_atomic

    lines = ["# GATE candidates of the difffeat demo: technique lists ranked against `reference` (none)"]
    lines += [f"{name}: [{', '.join(specs)}]" for name, specs in candidates.items()]
    write_atomic(path, "\n".join(lines) + "\n")


def _scores(metrics: Path) -> dict | None:
    try:
        return json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pct(value) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{100 * value:.1f}"


def run_demo(cfg: DemoConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> Path:
    """Run the chain into `cfg.out`; returns the report's path."""
    from difffeat.utils.progress import Stopwatch

    sizes = plan(cfg.minutes)
    folder = RunFolder(cfg.out, "demo", cfg, resume=resume, overwrite=overwrite, owned=SUB_RUNS,
                       extra={"plan": sizes.__dict__})
    folder.create()
    out = folder.path
    watch = Stopwatch()
    steps = Steps(sizes.seconds(), quiet)
    print(f"difffeat demo in {out}: {sizes.images} Shapes-LT scenes; GATE ranks {', '.join(sizes.candidates)} on "
          f"{sizes.gate_images} test images; two segmentation heads of {sizes.iterations} iterations (plain vs "
          "GATE-chosen features); one report.", flush=True)

    def again(path: Path) -> list[str]:  # a step that started before (resumed demo) starts over
        return ["--overwrite"] if path.exists() else []

    shapes, gate, store = out / "shapes", out / "gate", out / "features"
    steps.run("synth", "make the data: Shapes-LT scenes with masks and captions",
              ["data", "synth", str(shapes), "--n", str(sizes.images), "--seed", str(cfg.seed)],
              skip=(shapes / "classes.json").is_file(), restart=again(shapes))
    candidates, variants = out / "candidates.yaml", out / "variants.yaml"
    _write_candidates(candidates, sizes.candidates)
    steps.run("gate", "GATE: img2img with and without each technique; keep those that stay closer to the input",
              ["gate", str(shapes / "test"), "--candidates", str(candidates), "--out", str(gate),
               "--n", str(sizes.gate_images), "--steps", str(sizes.gate_steps), "--boot", str(sizes.boot),
               "--seed", str(cfg.seed), "--greedy", "--emit", str(variants)],
              skip=variants.is_file() and (gate / "ranking.json").is_file(),
              restart=["--overwrite"] if gate.exists() or variants.exists() else [])
    steps.run("extract", "features of every scene: plain and under GATE's choice (one store, one variant each)",
              ["extract", str(shapes), "--out", str(store), "--layer", LAYER, "--t", "50", "--seed", str(cfg.seed),
               "--variants", str(variants), "--variant", "plain="],
              skip=(store / "report.json").is_file(), restart=again(store))
    plain, chosen = _variant_layers(store)
    heads = {"plain": plain, "gate": chosen}
    label = {"plain": "plain", "gate": f"GATE-chosen ({', '.join(sorted({x.split('/')[0] for x in chosen}))})"}
    for name, layers in heads.items():
        run = out / f"seg-{name}"
        if not layers:
            steps.skip(f"train-seg {name}", "GATE accepted no technique: there are only plain features")
            steps.skip(f"eval-seg {name}", "no head")
            continue
        steps.run(f"train-seg {name}", f"segmentation head on the {label[name]} features",
                  ["train-seg", "--features", str(store), "--masks", str(shapes), "--split", "train", "--val-split",
                   "val", *[a for layer in layers for a in ("--layer", layer)], "--iterations", str(sizes.iterations),
                   "--seed", str(cfg.seed), "--out", str(run)],
                  skip=(run / "metrics.json").is_file(), restart=again(run))
        steps.run(f"eval-seg {name}", "mIoU on the held-out test scenes (overall, head, middle, tail classes)",
                  ["eval-seg", "--run", str(run), "--features", str(store), "--masks", str(shapes), "--split", "test"],
                  skip=(run / "eval-test" / "metrics.json").is_file())
    report = out / "report.html"
    steps.run("report", "one page for the whole chain", ["report", str(out), "--out", str(report), "--title",
                                                        "difffeat demo", "--overwrite"])
    results = {name: _scores(out / f"seg-{name}" / "eval-test" / "metrics.json") for name in heads}
    folder.write_json("demo.json", {"plan": sizes.__dict__, "seconds": {k: round(v, 2) for k, v in steps.done.items()},
                                    "test_miou": {k: (v or {}).get("miou") for k, v in results.items()}})
    print()
    for name, scores in results.items():
        if scores:
            groups = "  ".join(f"{g} {_pct(scores.get(f'miou_{g}'))}" for g in ("head", "middle", "tail"))
            print(f"  test mIoU on {label[name]} features: {_pct(scores.get('miou'))}  ({groups})")
    print(watch.finish_line(f"demo done: {out}"), flush=True)
    print(f"report: {report}", flush=True)
    return report


def _cmd_demo(args) -> None:
    from difffeat.spine.config_cli import config_from_args

    cfg = config_from_args(DemoConfig, args)
    run_demo(cfg, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)


def add_commands(subparsers) -> None:
    """Add `demo` to difffeat's sub-commands (entry point ``difffeat.commands``: demo)."""
    from difffeat.spine.config_cli import add_config_arguments

    p = subparsers.add_parser("demo", help="the whole chain on the built-in world in a few minutes, ending in a report",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p, DemoConfig)
    p.add_argument("--resume", action="store_true", help="continue a demo in --out, skipping the finished steps")
    p.add_argument("--overwrite", action="store_true", help="replace the demo in --out")
    p.set_defaults(func=_cmd_demo)


if __name__ == "__main__":  # python -m apps.demo …: the same as `difffeat demo …`
    from difffeat.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
