"""`--batch-size auto` against every fixed batch that fits (issue #17: within 10 % of the best), in one run.

The CPU has no memory limit worth the name, so the test's fake one is used: 100 MiB per image under an 850 MiB
limit, which leaves batches 1–8. The probe keeps its real timings. Each contender is an end-to-end
`run_extraction` on the same images, alternated `--repeats` times, each keeping its best.

    OMP_NUM_THREADS=1 python benchmarks/auto_batch.py [--n 96] [--repeats 3] [--results]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT, PER_IMAGE = 850 * 2**20, 100 * 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    from difffeat.extraction import autobatch
    from difffeat.extraction.bench import synthetic_images
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    real = autobatch.extraction_probe

    def probe(ext, dev, measure_memory=True):  # real time, fake memory
        timed = real(ext, dev, False)
        return lambda b: (timed(b)[0], b * PER_IMAGE)

    autobatch.extraction_probe = probe
    autobatch.memory_limit = lambda *a, **k: LIMIT
    start_load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="difffeat-autobatch-") as tmp:
        tmp = Path(tmp)
        os.environ["DIFFFEAT_CACHE"] = str(tmp / "cache")  # a fresh probe, not this user's cached choice
        images = synthetic_images(tmp / "images", args.n, (64, 64))

        def run(batch) -> dict:
            cfg = ExtractRunConfig(images=str(images), out=str(tmp / f"out-{batch}"), model="mini", layers=["dift"],
                                   batch_size=batch)
            return run_extraction(cfg, overwrite=True, progress=False)

        auto = run("auto")
        chosen = auto["batch_size"]
        speed: dict[str, float] = {}
        for _ in range(args.repeats):
            for b in ("auto", 1, 2, 4, 8):
                speed[str(b)] = max(speed.get(str(b), 0.0), run(b)["images_per_second"])
    best = max((b for b in speed if b != "auto"), key=speed.get)
    ratio = speed["auto"] / speed[best]
    sizing = auto["batch_sizing"]
    lines = [f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/auto_batch.py "
             f"--n {args.n} --repeats {args.repeats}`: mini, `dift`, 64², fake limit 850 MiB at 100 MiB per image; "
             f"load average {start_load} at the start", "",
             "| batch | images/s |", "|---|---|",
             *[f"| {b}{f' (auto chose {chosen})' if b == 'auto' else ''} | {v:.1f} |" for b, v in speed.items()], "",
             f"- auto ({chosen}) / best fixed ({best}): {ratio:.3f} "
             f"(target ≥ 0.9: {'met' if ratio >= 0.9 else 'not met'}); "
             f"probe tried batches {', '.join(sizing.get('tried', {}))}, stopped: {sizing.get('stopped')}"]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n## auto_batch.py ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
