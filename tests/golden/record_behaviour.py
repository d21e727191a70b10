"""Record what the public CLI produces on a tiny fixed-seed world, or check it against a recorded file.

    python tests/golden/record_behaviour.py --workdir DIR --out behaviour.json      # record
    python tests/golden/record_behaviour.py --workdir DIR --check behaviour.json    # record again and compare

Every step is a `python -m difffeat …` subprocess of the interpreter running this script, with the
environment and working directory it was started with (so PYTHONPATH / the current directory decide which
difffeat is exercised; its location is printed), plus HF_HUB_OFFLINE=1, one CPU thread for torch / OpenMP /
BLAS, no visible CUDA device and a fixed PYTHONHASHSEED, so that the numbers are bit-for-bit repeatable.

Steps: `data synth` (60 Shapes-LT scenes), `extract` of the train images (plain and canny variants) and of
the whole set (for the split-aware trainers), `gate` on 4 test images with 3 candidates, `train-seg`
(conv head, AUCSeg, 20 iterations, validation split) and `eval-seg` on the test split, `train-cls` with
LA and with DirMixE (a few epochs, evaluated on val+test via --test-labels).

What is recorded (one JSON): sha256 of every synthesized file (JSON files: their content); for each store
its key list, layer list and, per key and layer, dtype, shape and sha256 of the array; for GATE the
ranking rows and per-image scores of ranking.json; for train-seg / eval-seg / train-cls the numbers of
their metrics JSON files (metrics.json, history.json, nc.json). Timings, dates, versions and file paths
are dropped (see VOLATILE_KEYS and `_clean`). --check compares every value exactly (floats by repr, so
NaN equals NaN and 0.0 differs from -0.0), prints each difference and exits 1 if there is any; a command
that fails exits 2.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARKER = ".record_behaviour"  # a workdir holding this file was made by this script and may be wiped

# Keys whose values change from run to run (or machine to machine) and say nothing about the maths.
VOLATILE_KEYS = {"seconds", "elapsed", "elapsed_s", "duration", "time", "wall", "wall_s", "created", "date",
                 "timestamp", "versions", "version", "python", "torch", "host", "hostname", "pid",
                 "images_per_second", "img_per_s", "throughput",
                 # a digest of shard checksums, which cover the input files' modification times (stamps)
                 "shards_digest"}
# The run spine's bookkeeping in a run's marker file (difffeat/spine/run.py): not results.
MARKER_KEYS = {"format", "kind", "config_hash"}
VOLATILE_PATTERN = re.compile(r"(seconds|elapsed|created|timestamp|version|per_s(ec)?$|throughput)")

CANDIDATES = "caption: [prompt:caption]\nfine: [prompt:fine]\ncanny: [controlnet:canny]\n"

# The probe run once at the start: which difffeat the subprocesses import, and that torch uses one thread.
PROBE = ("import json, difffeat, torch; print(json.dumps({'difffeat': difffeat.__file__, "
         "'torch_threads': torch.get_num_threads()}))")

# Reads a store through the public API (`difffeat.FeatureStore`): store[key] -> {layer: array}.
HASH_STORE = r"""
import hashlib, json, sys
import numpy as np
from difffeat import FeatureStore
store = FeatureStore(sys.argv[1])
keys = list(store.keys())
arrays = {}
for key in sorted(keys):
    arrays[key] = {}
    for layer, a in sorted(store[key].items()):
        a = np.ascontiguousarray(a)
        arrays[key][layer] = f"{a.dtype.str} {list(a.shape)} {hashlib.sha256(a.tobytes()).hexdigest()}"
print(json.dumps({"keys": keys, "layers": list(store.layers), "arrays": arrays,
                  "failures": sorted(f["key"] for f in store.failures)}))
"""


class CommandFailed(Exception):
    pass


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return env


def _run(argv: list[str], log: list) -> str:
    """Run one subprocess of this interpreter; returns its stdout; raises CommandFailed with its output."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, *argv], env=_env(), capture_output=True, text=True)
    log.append((argv, time.time() - t0))
    if proc.returncode != 0:
        raise CommandFailed(f"exit {proc.returncode}: {' '.join(argv)}\n--- stdout\n{proc.stdout[-4000:]}"
                            f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def _difffeat(args: list[str], log: list) -> None:
    _run(["-m", "difffeat", "--quiet", *args], log)


def _clean(value, w: Path):
    """The JSON value without volatile keys and without strings that name files (paths under the workdir
    or absolute paths); dicts keep their keys, lists their order."""
    if isinstance(value, dict):
        out = {}
        marker = str(value.get("format", "")).startswith("difffeat-run/")
        for k, v in value.items():
            if k in VOLATILE_KEYS or VOLATILE_PATTERN.search(k) or (marker and k in MARKER_KEYS):
                continue
            v = _clean(v, w)
            if v is not _DROP:
                out[k] = v
        return out
    if isinstance(value, list):
        return [v for v in (_clean(v, w) for v in value) if v is not _DROP]
    if isinstance(value, str) and (str(w) in value or value.startswith("/")):
        return _DROP
    return value


_DROP = object()


def _json(path: Path, w: Path):
    return _clean(json.loads(path.read_text()), w)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _labels_csv(shapes: Path, splits: list[str], out: Path) -> None:
    """key,label rows for the whole-set store (keys SPLIT/images/ID.png) from each split's metadata.csv."""
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label"])
        for split in splits:
            with open(shapes / split / "metadata.csv", newline="") as m:
                for row in csv.DictReader(m):
                    writer.writerow([f"{split}/{row['file_name']}", row["label"]])


def _prepare(workdir: Path) -> Path:
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            sys.exit(f"{workdir} is not empty and was not made by this script; give an empty or new folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by tests/golden/record_behaviour.py; wiped on its next run\n")
    return workdir.resolve()


def record(workdir: Path) -> tuple[dict, list]:
    w = _prepare(workdir)
    log: list = []
    probe = json.loads(_run(["-c", PROBE], log).strip().splitlines()[-1])
    print(f"difffeat imported from {probe['difffeat']} (torch threads: {probe['torch_threads']})", file=sys.stderr)
    if probe["torch_threads"] != 1:
        raise CommandFailed(f"torch runs {probe['torch_threads']} threads, not 1: numbers would not be repeatable")
    shapes = w / "shapes"
    rec: dict = {"format": "difffeat-behaviour/1", "commands": []}

    def cli(*args):
        args = [str(a) for a in args]
        rec["commands"].append(" ".join(["difffeat", *(a.replace(str(w), "W") for a in args)]))
        _difffeat(args, log)

    # ---- data synth: every file's sha256 (JSON files: their content)
    cli("data", "synth", shapes, "--n", 60, "--seed", 3)
    rec["synth"] = {p.relative_to(shapes).as_posix(): (_json(p, w) if p.suffix == ".json" else _sha(p))
                    for p in sorted(shapes.rglob("*")) if p.is_file()}

    # ---- extract: the train images (the store of the acceptance rule), and the whole set with its split
    # folders in the keys, which train-seg (--split / --val-split), eval-seg and train-cls read.
    variants = ["--layer", "dift", "--t", 50, "--prompt-from", "sidecar", "--variant", "plain=",
                "--variant", "canny=controlnet:canny", "--seed", 0]
    cli("extract", shapes / "train" / "images", "--out", w / "store", *variants)
    cli("extract", shapes, "--out", w / "store-all", *variants)
    for name in ("store", "store-all"):
        out = _run(["-c", "# hash the store\n" + HASH_STORE, str(w / name)], log)
        rec[f"extract:{name}"] = json.loads(out.strip().splitlines()[-1])

    # ---- GATE: 4 of the 6 test images (seeded draw), 3 candidates + reference, few steps and resamples
    (w / "candidates.yaml").write_text(CANDIDATES)
    cli("gate", shapes / "test", "--candidates", w / "candidates.yaml", "--n", 4, "--steps", 4, "--boot", 200,
        "--seed", 0, "--out", w / "gate")
    ranking = _json(w / "gate" / "ranking.json", w)
    rec["gate"] = {k: ranking.get(k) for k in ("primary", "images", "keys", "dropped", "ranking", "accepted",
                                               "greedy", "per_image")}

    # ---- train-seg (conv head, AUCSeg, validation split) and eval-seg on the test split
    seg = w / "seg"
    cli("train-seg", "--features", w / "store-all", "--masks", shapes, "--split", "train", "--val-split", "val",
        "--head", "conv", "--loss", "aucseg", "--iterations", 20, "--batch-size", 8, "--seed", 0, "--out", seg)
    cli("eval-seg", "--run", seg, "--features", w / "store-all", "--masks", shapes, "--split", "test")
    rec["train-seg"] = {"metrics": _json(seg / "metrics.json", w), "history": _json(seg / "history.json", w)}
    rec["eval-seg"] = {"metrics": _json(seg / "eval-test" / "metrics.json", w)}

    # ---- train-cls: image labels of Shapes-LT; train on train/, evaluate on val/ + test/ (12 images)
    _labels_csv(shapes, ["train"], w / "train-labels.csv")
    _labels_csv(shapes, ["val", "test"], w / "test-labels.csv")
    small = {"la": [], "dirmixe": ["--trials", 10, "--tta-epochs", 1, "--tta-steps", 5]}
    for method, extra in small.items():
        run = w / f"cls-{method}"
        cli("train-cls", "--features", w / "store-all", "--labels", w / "train-labels.csv", "--test-labels",
            w / "test-labels.csv", "--method", method, "--epochs", 5, "--seed", 0, "--device", "cpu", *extra,
            "--out", run)
        rec[f"train-cls:{method}"] = {name: _json(run / f"{name}.json", w) for name in ("metrics", "history", "nc")}
    return rec, log


def _flatten(value, prefix: str = "") -> dict[str, str]:
    """path → canonical JSON of each leaf (an empty dict / list is a leaf)."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: json.dumps(value, sort_keys=True)}


def compare(expected: dict, got: dict) -> list[str]:
    a, b = _flatten(expected), _flatten(got)
    diffs = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            diffs.append(f"missing now:  {path} (was {a[path]})")
        elif path not in a:
            diffs.append(f"new:          {path} = {b[path]}")
        elif a[path] != b[path]:
            diffs.append(f"differs:      {path}: was {a[path]}, now {b[path]}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, type=Path, help="scratch folder (wiped if made by this script)")
    p.add_argument("--out", type=Path, help="write the record here")
    p.add_argument("--check", type=Path, help="compare the record with this file; exit 1 on any difference")
    args = p.parse_args(argv)
    if not args.out and not args.check:
        p.error("give --out, --check or both")
    expected = json.loads(args.check.read_text()) if args.check else None
    t0 = time.time()
    try:
        rec, log = record(args.workdir)
    except CommandFailed as e:
        print(f"record_behaviour: a command failed, {e}", file=sys.stderr)
        return 2
    for argv_, seconds in log:
        shown = " ".join(a.strip().splitlines()[0] if "\n" in a.strip() else a for a in argv_)
        print(f"{seconds:6.1f}s  {shown[:150]}", file=sys.stderr)
    print(f"recorded in {time.time() - t0:.1f}s", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if expected is not None:
        diffs = compare(expected, rec)
        for line in diffs:
            print(line)
        if diffs:
            print(f"{len(diffs)} difference(s) from {args.check}")
            return 1
        print(f"identical to {args.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
