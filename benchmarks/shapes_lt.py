"""Shapes-LT generation speed on one core: images (with mask, caption sidecar and CSV row) per second.

Baseline in the same run: rendering alone (no file writes), so the ratio shows what disk I/O costs.
Run: `OMP_NUM_THREADS=1 python benchmarks/shapes_lt.py [--n 2000] [--dir DIR]`. Files are written under
DIR (default: the current folder), because file creation costs differ between file systems: on this
project's machine /tmp (an overlay) creates files 2× slower than the project's own disk.
"""

import argparse
import os
import tempfile
import time

from difffeat.data.shapes_lt import iter_scenes, synthesize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dir", default=".", help="where to write the temporary data set")
    parser.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    t = time.perf_counter()
    for _ in iter_scenes("train", args.n, seed=0):
        pass
    render = args.n / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        synthesize(os.path.join(tmp, "out"), n=args.n, seed=0)
        full = args.n / (time.perf_counter() - t)
    text = (f"render only: {render:.0f} img/s; synthesize to disk ({os.path.abspath(args.dir)}): {full:.0f} img/s "
            f"(ratio {full / render:.2f}); target ≥ 500 img/s on one core")
    print(text)
    if args.results:
        with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
            f.write(f"\n## shapes_lt.py ({time.strftime('%Y-%m-%d')})\n\n{args.n} scenes, one thread: {text}\n")


if __name__ == "__main__":
    main()
