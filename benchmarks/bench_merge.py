"""`difffeat store merge` against the issue's target: 4 stores of 250 images merge into a store equal to one
1,000-image store key for key (arrays identical), in ≤ 2 s, without copying arrays.

The four stores are shard jobs (`--shard-index i --num-shards 4`), the reference one job over all 1,000
images; all on mini (`dift`, batch 32). Every job pads its last batch (`--pad-batches`), so no image's
features depend on which images shared its batch; a run without padding is compared too (rounding only).
Timed: the library call, and the whole `difffeat store merge` command (a fresh Python process: imports
included). `python benchmarks/bench_merge.py [--n 1000] [--shards 4] [--results]`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def max_difference(a, b) -> float:
    assert a.keys() == b.keys(), "the same keys"
    worst = 0.0
    for key in a.keys():
        fa, fb = a[key], b[key]
        assert fa.keys() == fb.keys()
        for layer in fa:
            worst = max(worst, float(np.abs(fa[layer].astype(np.float64) - fb[layer]).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--results", action="store_true")
    args = ap.parse_args()
    from difffeat import load_pipeline
    from difffeat.extraction.bench import synthetic_images
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction
    from difffeat.store.feature_store import FeatureStore
    from difffeat.store.merge import merge_stores

    start_load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    pipe = load_pipeline("mini")
    lines = []
    with tempfile.TemporaryDirectory(prefix="difffeat-bench-") as tmp:  # never inside the repository
        tmp = Path(tmp)
        images = synthetic_images(tmp / "images", args.n, (64, 64))

        def extract(out: Path, pad: bool, **shard) -> float:
            t0 = time.perf_counter()
            run_extraction(ExtractRunConfig(images=str(images), out=str(out), model="mini", layers=["dift"],
                                            batch_size=args.batch_size, pad_batches=pad, **shard),
                           progress=False, pipe=pipe)
            return time.perf_counter() - t0

        rows = []
        for pad in (True, False):
            tag = "padded" if pad else "plain"
            one = tmp / f"one-{tag}"
            extract(one, pad)
            parts = [tmp / f"part{i}-{tag}" for i in range(args.shards)]
            for i, part in enumerate(parts):
                extract(part, pad, shard_index=i, num_shards=args.shards)
            merged = tmp / f"merged-{tag}"
            t0 = time.perf_counter()
            report = merge_stores(merged, parts)
            call = time.perf_counter() - t0
            cli_out = tmp / f"merged-cli-{tag}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "difffeat", "store", "merge", str(cli_out), *map(str, parts)],
                           check=True, capture_output=True)
            cli = time.perf_counter() - t0
            a, b = FeatureStore(merged), FeatureStore(one)
            same_config = a.manifest["config_hash"] == b.manifest["config_hash"]
            diff = max_difference(a, b)
            source_bytes = sum(f.stat().st_size for p in parts for f in (p / "shards").glob("*"))
            linked = all(f.stat().st_nlink >= 3 for f in (merged / "shards").glob("*"))  # source, merged, merged-cli
            rows.append(f"| {tag} | {len(a)} | {report['links']} | {linked} | {source_bytes / 2**20:.1f} MiB | "
                        f"{call:.3f} s | {cli:.2f} s | {same_config} | {diff:.3g} |")
    lines = [f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/bench_merge.py "
             f"--n {args.n} --shards {args.shards} --batch-size {args.batch_size}`: mini, dift; "
             f"{args.shards} shard jobs "
             f"of {args.n // args.shards} images merged, against one job over all {args.n}; load average "
             f"{start_load} at the start, {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end", "",
             "| batches | images | links | every shard a hard link (no copy) | shard bytes linked | merge (library) "
             "| `store merge` command (with Python start-up) | config hash = one job's | max abs difference |",
             "|---|---|---|---|---|---|---|---|---|", *rows, "",
             "- target: equal key for key, arrays identical, ≤ 2 s: identical with padded batches (difference 0); "
             "without padding the last batches differ in size, which changes float rounding only"]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n## bench_merge.py ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
