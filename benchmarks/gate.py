"""GATE run time on mini: 16 held-out Shapes-LT images × 5 candidates (reference, canny ControlNet, own caption,
another image's caption, quality tags), the whole `rank` + report, against the same run without reuse.

- reuse: one VAE encode of the images and one text-embedding cache shared by every candidate (the default);
- no reuse: encodes and embeddings recomputed for each candidate's img2img and feature passes (the baseline).
Both runs use the same images, seeds and steps and must give the same scores (checked).

Run: `OMP_NUM_THREADS=1 python benchmarks/gate.py [--n 16] [--steps 25] [--controlnet canny|PATH]`; target
(GATE issue): under 2 minutes on the project's 2-core CPU machine.
"""

from __future__ import annotations

import argparse
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
from gate.ranking import rank  # noqa: E402
from gate.report import write_report  # noqa: E402


def timed_run(pipe, images: str, candidates: dict, out: Path, **cfg) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = rank(pipe, images, candidates, **cfg)
    write_report(result, out)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--controlnet", default="canny", help="canny (the shipped mini one) or a ControlNet folder")
    parser.add_argument("--seed", type=int, default=11, help="Shapes-LT seed of the held-out images")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    candidates = {"canny": [f"controlnet:{args.controlnet}"], "caption": ["prompt:caption"],
                  "other-caption": ["prompt:other-caption"], "fine": ["prompt:fine"]}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        root = synthesize(tmp / "shapes", n=max(160, args.n * 10), seed=args.seed, progress=False)
        t0 = time.perf_counter()
        pipe = load_pipeline("mini")
        load_s = time.perf_counter() - t0
        cfg = {"n": args.n, "steps": args.steps, "strength": args.strength, "seed": 0}
        # Warm-up: loads the ControlNet and touches every code path once, so neither timed run pays for it.
        rank(pipe, str(root / "test"), candidates, **{**cfg, "n": 2, "steps": 2})
        reuse_s, reused = timed_run(pipe, str(root / "test"), candidates, tmp / "reuse", **cfg)
        plain_s, plain = timed_run(pipe, str(root / "test"), candidates, tmp / "plain", reuse=False, **cfg)
    same = all(abs(reused.scores[c][m].value - plain.scores[c][m].value) < 1e-4
               for c in reused.scores for m in reused.metrics)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {load:.1f}")
    print(f"GATE on mini: {len(reused.keys)} images × {len(reused.candidates)} candidates, {args.steps} DDIM steps "
          f"at strength {args.strength} ({int(args.steps * args.strength)} run), features at t = 50; model load "
          f"{load_s:.1f} s (not counted)")
    print(f"  with reuse    {reuse_s:6.1f} s  (" + ", ".join(f"{k} {v:.1f} s" for k, v in reused.timings.items())
          + ")")
    print(f"  without reuse {plain_s:6.1f} s")
    print(f"  ratio (without / with) {plain_s / reuse_s:.2f}×; same scores: {same}; target < 120 s: "
          f"{'met' if reuse_s < 120 else 'NOT met'}")
    for row in reused.table():
        print(f"    {row['rank']}. {row['candidate']:<14} psnr {row['psnr']:.2f} [{row['psnr_low']:.2f}, "
              f"{row['psnr_high']:.2f}]" + ("  accepted" if row["accepted"] else ""))


if __name__ == "__main__":
    main()
