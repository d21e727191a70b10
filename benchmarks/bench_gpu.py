"""The GPU check of the throughput issue (run by benchmarks/gpu.sh): SD-1.5 architecture at 512² (random
weights: the same cost), `gdf-legacy` layers, fp16, `--batch-size auto`:

1. difffeat vs a batch-1 GDF-style loop (naive) vs bare compute, SDPA, compile off;
2. the same with xformers (when it cannot run here, the reason is recorded and the row says SDPA);
3. compile on (inductor), difffeat and bare; then channels-last with compile; then CUDA graphs (compile mode
   reduce-overhead) for the fixed batch shape.

It loads the model once, measures each configuration with `difffeat.extraction.bench`, prints the tables and appends
them to benchmarks/RESULTS.md (or --results FILE) with the device name, the target verdicts (≥ 150 images/s
on an H100-class GPU; ≥ 2× the batch-1 loop) and the JSON beside it.

``--tiny`` (or DIFFFEAT_BENCH_TINY=1) runs the same script on a CPU in a few minutes: mini-random at 64², fp32,
batch auto, 8 images, the eager compile backend (dynamo without a C compiler); the tests use it so that the script
is known to work before a GPU runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def configurations(tiny: bool, n: int, naive_n: int) -> list[tuple[str, dict]]:
    base = dict(model="sd15-random", resolution=[512, 512], layers=["gdf-legacy"], dtype="fp16", batch_size="auto",
                n=n, naive_n=naive_n, store_dtype="float16", tmp_dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    if tiny:
        # fp32: half precision runs the same code, but on a CPU it is 10× slower than fp32
        base.update(model="mini-random", resolution=[64, 64], n=8, naive_n=4, compile_backend="eager", dtype="fp32")
    return [
        ("SDPA, compile off", {**base, "attention": "sdpa", "compare": ["bare", "naive"]}),
        ("xformers, compile off", {**base, "attention": "xformers", "compare": ["bare"]}),
        ("SDPA, compile on", {**base, "attention": "sdpa", "compile": True, "compare": ["bare"]}),
        ("SDPA, compile on, channels-last", {**base, "attention": "sdpa", "compile": True, "channels_last": True}),
        # CUDA graphs for the fixed batch shape (compile mode reduce-overhead): kept if they help
        ("SDPA, compile reduce-overhead (CUDA graphs)", {**base, "attention": "sdpa", "compile": True,
                                                         "compile_mode": "reduce-overhead"}),
    ]


def verdicts(results: list[tuple[str, dict]]) -> list[str]:
    first = results[0][1]
    ips = first["contenders"]["difffeat"]["images_per_second"]
    best_name, best = max(((name, r["contenders"]["difffeat"]["images_per_second"]) for name, r in results),
                          key=lambda x: x[1])
    lines = [f"- best difffeat: {best:.1f} images/s ({best_name}); target ≥ 150 on an H100-class GPU: "
             f"{'met' if best >= 150 else 'not met'} on this device"]
    if "difffeat_over_naive" in first["ratios"]:
        ratio = first["ratios"]["difffeat_over_naive"]
        lines.append(f"- difffeat / batch-1 loop ({results[0][0]}): {ratio:.2f}× (target ≥ 2: "
                     f"{'met' if ratio >= 2 else 'not met'}); difffeat alone {ips:.1f} images/s")
    for name, r in results:
        if "bare_over_difffeat" in r["ratios"]:
            lines.append(f"- bare / difffeat ({name}): {r['ratios']['bare_over_difffeat']:.2f}×")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", default=os.environ.get("DIFFFEAT_BENCH_TINY") == "1")
    ap.add_argument("--n", type=int, default=768, help="images per contender")
    ap.add_argument("--naive-n", type=int, default=96, help="images for the batch-1 loop")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="Markdown file to append to")
    ap.add_argument("--only", type=int, nargs="*", help="run these configurations only (0-based)")
    args = ap.parse_args(argv)

    import torch

    from difffeat.extraction.bench import BenchConfig, bench, table
    from difffeat.zoo import load_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("no CUDA device: run with --tiny (DIFFFEAT_BENCH_TINY=1) to check the script on a CPU", file=sys.stderr)
        return 2
    configs = configurations(args.tiny, args.n, args.naive_n)
    if args.only is not None:
        configs = [configs[i] for i in args.only]
    notes: list[str] = []
    pipe = load_pipeline(configs[0][1]["model"], device=device, dtype=configs[0][1]["dtype"])
    results = []
    for name, fields in configs:
        t0 = time.perf_counter()
        result = bench(BenchConfig.from_dict(fields), warn=lambda m, name=name: notes.append(f"{name}: {m}"), pipe=pipe)
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results.append((name, result))
        print(f"\n### {name} ({result['wall_seconds']} s, warm-up {result['warmup']['seconds']} s)\n")
        print(table(result), flush=True)
    device_name = results[0][1]["machine"]["device_name"]
    lines = [f"\n## gpu.sh ({time.strftime('%Y-%m-%d')}) on {device_name}" + (" — tiny CPU check" if args.tiny else ""),
             "", f"`bash benchmarks/gpu.sh{' --tiny' if args.tiny else ''}`; "
             f"versions {json.dumps(results[0][1]['machine']['versions'])}", ""]
    for name, result in results:
        lines += [f"### {name} (warm-up {result['warmup']['seconds']} s)", "", table(result), ""]
    lines += verdicts(results)
    lines += [f"- note: {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)
    json_file = Path(args.results).with_name("gpu-results.json" if not args.tiny else "gpu-results-tiny.json")
    json_file.write_text(json.dumps([{"name": n, **r} for n, r in results], indent=1) + "\n")
    print(f"appended to {args.results}; JSON in {json_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
