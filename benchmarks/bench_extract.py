"""CPU acceptance of the throughput issue (17), every ratio from one run:

1. `difffeat bench` on mini at batch 32: difffeat vs bare compute (target ≤ 1.05×) vs the naive per-image
   loop (target ≥ 3×), contenders alternated `--repeats` times, each keeping its best;
2. the fast paths one by one (background writes, decoding thread, workers 1/2, padded batches, channels-last),
   alternated the same way, which is what the defaults of `extract` are chosen from;
3. peak RSS of a `difffeat extract` process over `--rss SMALL LARGE` images (target: flat, ≤ 1.1×).

The machine is shared: run it with OMP_NUM_THREADS=1; the load average is printed before and after.
`python benchmarks/bench_extract.py [--n 256] [--batch-size 32] [--repeats 3] [--rss 250 4000] [--results]`
appends the tables to benchmarks/RESULTS.md with --results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def peak_rss_mib(images: Path, n: int, out: Path, batch: int) -> float:
    """Peak RSS (MiB) of a fresh `difffeat extract` process over the first n images (and its workers, if any)."""
    sub = out.parent / f"subset{n}"
    sub.mkdir()
    for p in sorted(images.glob("*.png"))[:n]:
        os.symlink(p, sub / p.name)
    code = ("import resource, sys; from difffeat.cli import main; rc = main(sys.argv[1:]); "
            "print('RSS', max(resource.getrusage(w).ru_maxrss "
            "for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)));"
            " sys.exit(rc)")
    args = ["--quiet", "extract", str(sub), "--out", str(out), "--model", "mini", "--layer", "dift",
            "--batch-size", str(batch)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(proc.stdout.split("RSS")[-1].split()[0]) / 1024


def ablations(images: Path, batch: int, repeats: int, tmp: Path) -> dict[str, float]:
    """images/s of `extract` (model loaded once) per fast-path setting, alternated, best of `repeats`."""
    from difffeat import load_pipeline
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    pipe = load_pipeline("mini")
    n = len(list(images.glob("*.png")))
    settings = {
        "defaults (background write, decoding thread)": {},
        "no background write": {"background_write": False},
        "no decoding thread": {"background_decode": False},
        "1 decoding worker": {"workers": 1},
        "2 decoding workers": {"workers": 2},
        "padded batches": {"pad_batches": True},
        "channels-last": {"channels_last": True},
    }
    best: dict[str, tuple[float, float]] = {}  # name → (images/s, images per CPU-second), each the best
    run = 0
    for _ in range(repeats):
        for name, fields in settings.items():
            run += 1
            cfg = ExtractRunConfig(images=str(images), out=str(tmp / f"abl{run}"), model="mini", layers=["dift"],
                                   batch_size=batch, **fields)
            t0, c0 = time.perf_counter(), cpu_seconds()
            run_extraction(cfg, progress=False, pipe=pipe)
            wall, cpu = n / (time.perf_counter() - t0), n / (cpu_seconds() - c0)
            old = best.get(name, (0.0, 0.0))
            best[name] = (max(old[0], wall), max(old[1], cpu))
            shutil.rmtree(tmp / f"abl{run}")
    return best


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (decoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--naive-n", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss", nargs=2, type=int, default=[250, 4000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["bench", "ablations", "rss"])
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    from difffeat.extraction.bench import BenchConfig, bench, synthetic_images, table

    lines = [f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/bench_extract.py "
             f"--n {args.n} --naive-n {args.naive_n} --batch-size {args.batch_size} --repeats {args.repeats} "
             f"--rss {args.rss[0]} {args.rss[1]}`; load average at the start {load()}", ""]
    with tempfile.TemporaryDirectory(prefix="difffeat-bench-") as tmp:  # never inside the repository
        tmp = Path(tmp)
        images = synthetic_images(tmp / "images", max(args.n, *args.rss), (64, 64))
        first = tmp / "first"
        first.mkdir()
        for p in sorted(images.glob("*.png"))[: args.n]:
            os.symlink(p, first / p.name)
        if "bench" not in args.skip:
            result = bench(BenchConfig(model="mini", layers=["dift"], batch_size=args.batch_size, n=args.n,
                                       naive_n=args.naive_n, compare=["bare", "naive"], repeats=args.repeats,
                                       images=str(first), tmp_dir=str(tmp)))
            lines += [table(result), ""]
            r = result["ratios"]
            for tag, what in (("", "wall time"), ("_cpu", "CPU time")):
                over, under = r["bare_over_difffeat" + tag], r["difffeat_over_naive" + tag]
                lines.append(f"- acceptance by {what}: bare / difffeat {over:.3f}× (target ≤ 1.05: "
                             f"{'met' if over <= 1.05 else 'not met'}); difffeat / naive {under:.2f}× (target ≥ 3: "
                             f"{'met' if under >= 3 else 'not met'})")
            lines += [f"- load average after the contenders: {load()}", ""]
            print(json.dumps(result["contenders"], indent=1))
        if "ablations" not in args.skip:
            speeds = ablations(first, args.batch_size, args.repeats, tmp)
            base = speeds["defaults (background write, decoding thread)"]
            lines += [f"| fast path (extract, mini, batch {args.batch_size}) | images/s | vs defaults | images/CPU-s | "
                      "vs defaults |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {v[0]:.1f} | {v[0] / base[0]:.3f}× | {v[1]:.1f} | {v[1] / base[1]:.3f}× |"
                      for name, v in speeds.items()]
            lines += ["", f"- load average after the fast paths: {load()}", ""]
        if "rss" not in args.skip:
            rss = {n: peak_rss_mib(images, n, tmp / f"rss{n}", args.batch_size) for n in args.rss}
            small, large = args.rss
            lines += [f"- peak RSS of `difffeat extract` (batch {args.batch_size}): "
                      f"{small} images {rss[small]:.0f} MiB, "
                      f"{large} images {rss[large]:.0f} MiB: ratio {rss[large] / rss[small]:.3f} (target ≤ 1.1: "
                      f"{'met' if rss[large] / rss[small] <= 1.1 else 'not met'}); load average after: {load()}"]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n## bench_extract.py ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
