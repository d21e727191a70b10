"""Shapes-LT generation speed on one core: images (with mask, caption sidecar and CSV row) per second.

Baseline in the same run: rendering alone (no file writes), so the ratio shows what disk I/O costs.
Run: `OMP_NUM_THREADS=1 python benchmarks/shapes_lt.py [--n 2000]`.
"""

import argparse
import os
import tempfile
import time

from difffeat.data.shapes_lt import iter_scenes, synthesize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    t = time.perf_counter()
    for _ in iter_scenes("train", args.n, seed=0):
        pass
    render = args.n / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        synthesize(os.path.join(tmp, "out"), n=args.n, seed=0)
        full = args.n / (time.perf_counter() - t)
    print(f"render only: {render:.0f} img/s; synthesize to disk: {full:.0f} img/s "
          f"(ratio {full / render:.2f}); target ≥ 500 img/s on one core")


if __name__ == "__main__":
    main()
