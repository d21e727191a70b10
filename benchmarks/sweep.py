"""What a sweep costs: the whole `difffeat sweep` (every up block × 5 timesteps × {plain, caption}, probes, halving,
report) against extracting only its deepest layer at the same timesteps and variants (`difffeat extract` into a
store), on the same 64 labelled Shapes-LT images, in one run.

- sweep (halving): the default successive halving (16 → 32 → 64 images);
- sweep (no halving): every configuration on all 64 images (`min_images = n`), the price of hooking every layer
  and probing every configuration;
- baseline: `run_extraction` with the deepest swept layer only, same timesteps, variants, seed and batch size.
Model load is not counted (one pipeline serves all three); a small warm-up run touches every code path first.
With `--repeat R` the three run in turn R times and each keeps its fastest time, so that a burst of load on a
shared machine does not land on one contender only.

Run: `OMP_NUM_THREADS=1 python benchmarks/sweep.py [--n 64] [--repeat 2] [--results]`; target (sweep issue):
sweep (halving) ≤ 1.5× the baseline. `--results` appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide the `gate` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from difffeat import load_pipeline  # noqa: E402
from difffeat.data.shapes_lt import synthesize  # noqa: E402
from difffeat.extraction.runner import ExtractRunConfig, run_extraction  # noqa: E402
from gate.sweeping import SweepConfig, sweep  # noqa: E402

VARIANTS = {"plain": [], "caption": ["prompt:caption"]}
TIMESTEPS = [25, 50, 100, 200, 400]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="labelled images (the train split holds exactly these)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="rounds; each contender keeps its fastest")
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        # Shapes-LT splits 80/10/10: n / 0.8 scenes give n train images, all of them labelled.
        root = synthesize(tmp / "shapes", n=round(args.n / 0.8), seed=5, progress=False)
        images = str(root / "train")
        pipe = load_pipeline("mini")
        base = dict(images=images, labels=str(root), layers=["up-blocks"], timesteps=TIMESTEPS, variants=VARIANTS,
                    n=0, batch_size=args.batch_size)
        sweep(config=SweepConfig(**{**base, "n": 8, "min_images": 4, "out": str(tmp / "warm")}), pipe=pipe)

        def timed_sweep(name: str, **extra):
            t0 = time.perf_counter()
            result = sweep(config=SweepConfig(**{**base, **extra, "out": str(tmp / name)}), pipe=pipe, overwrite=True)
            return time.perf_counter() - t0, result

        def timed_extract(layer: str) -> float:
            t0 = time.perf_counter()
            run_extraction(ExtractRunConfig(images=images, out=str(tmp / "store"), layers=[layer], timesteps=TIMESTEPS,
                                            variants=VARIANTS, batch_size=args.batch_size),
                           overwrite=True, progress=False, pipe=pipe)
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"base": [], "halving": [], "full": []}
        for _ in range(args.repeat):
            seconds, halving = timed_sweep("halving")
            times["halving"].append(seconds)
            deepest = list(halving.shapes)[-1]
            times["base"].append(timed_extract(deepest))
            seconds, full = timed_sweep("full", min_images=args.n)
            times["full"].append(seconds)
        base_s, halving_s, full_s = (min(times[k]) for k in ("base", "halving", "full"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"model mini, {len(halving.keys)} labelled images, layers {list(halving.shapes)} × t {TIMESTEPS} × variants "
        f"{list(VARIANTS)} = {len(halving.plan)} configurations, ridge probe on masks, batch {args.batch_size}; "
        f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), load average "
        f"{load:.1f} at the end; fastest of {args.repeat} interleaved round(s)",
        "| run | seconds | × baseline | configurations per rung |",
        "|---|---|---|---|",
        f"| baseline: extract {deepest} only | {base_s:.1f} | 1.00 | — |",
        f"| sweep, successive halving | {halving_s:.1f} | {halving_s / base_s:.2f} | "
        f"{' → '.join(str(r['configurations']) for r in halving.rungs)} |",
        f"| sweep, no halving | {full_s:.1f} | {full_s / base_s:.2f} | {full.rungs[0]['configurations']} |",
        f"- sweep (halving) / baseline: {halving_s / base_s:.2f}× (target ≤ 1.5: "
        f"{'met' if halving_s / base_s <= 1.5 else 'NOT met'}); winner {halving.best()['config']} "
        f"(no halving: {full.best()['config']})",
        f"- inside the last halving sweep ({halving.timings['total']:.1f} s): extraction "
        f"{halving.timings['extract']:.1f} s, probes {halving.timings['probe']:.1f} s, the rest (images, latents, "
        f"report) {halving.timings['total'] - halving.timings['extract'] - halving.timings['probe']:.1f} s",
    ]
    print("\n".join(lines))
    if args.results:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(f"\n## sweep.py ({datetime.date.today()})\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
