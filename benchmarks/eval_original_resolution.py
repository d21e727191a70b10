"""Scoring at the original resolution (`difffeat eval-seg --resolution original`) on ADE20K-size images: flat memory
and its price per image against scoring at the extraction size (`--resolution frame`), measured in one run.

Acceptance (segmentation issue): eval-seg at original resolution on 2,000 images of ADE20K size (synthetic) —
peak RSS at 2,000 vs 250 images ≤ 1.1×; time per image ≤ 1.5× scoring at the extraction size.

What it does, everything under ``--work`` (default /tmp/difffeat-bench-eval) and reused by later runs:

1. data: an ADE20K-layout folder (``images/{training,validation}/ADE_*.jpg``, ``annotations/…/ADE_*.png``, ADE's
   raw encoding c + 1, 0 = not scored) of ``--n`` validation and ``--train`` training images at ADE20K sizes after
   mmsegmentation's resize (short side 512: (H, W) cycling over 512×683, 683×512, 512×512, 512×768): Shapes-LT
   scenes upscaled (image bicubic, JPEG quality 90; mask nearest, its class boundaries set to 0 as ADE's
   "other" lines, PNG compress level 1). Two roots share these files: ``ade150`` (no classes.json: ADE20K's own
   150 classes, what a real ADE head predicts) and ``world13`` (the Shapes-LT classes.json: 13 classes); and
   ``…-small`` twins list only the first ``--small`` validation images (symlinks), which is how the small run
   keeps the same store: ``--data ade20k:ROOT-small:validation`` pairs only those keys.
2. features: ``difffeat extract ade20k:ade150 --layer dift --t 50 --clean --size 64 64 --resize stretch`` with
   the mini model (every image pixel is predicted), one store for every run;
3. heads: ``difffeat train-seg`` on the training split, ``--iterations`` steps per class set (quality does not
   matter: this measures scoring);
4. contenders, each a fresh ``difffeat eval-seg`` process (peak RSS = that process's VmHWM): original on the
   small root, original on all ``--n``, frame on all ``--n`` (the baseline); ``--repeat`` interleaved rounds,
   each contender keeps its fastest time and its highest peak. Time is `difffeat.cli.main` in the process,
   with Python, torch and the evaluation modules already imported (start-up is the same for every contender
   and not scoring); the whole process's wall time is printed too.
5. a breakdown in this process over ``--breakdown`` validation images: where an image's time goes in each mode.

Run: ``python benchmarks/eval_original_resolution.py [--n 2000] [--small 250] [--threads 2] [--results]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import TYPE_CHECKING

# Run as a script, this file's folder comes first on sys.path and its name would hide the `gate` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
SIZES = ((512, 683), (683, 512), (512, 512), (512, 768))  # (H, W): ADE20K after mmseg's resize, short side 512
FRAME = (64, 64)
RSS_GOAL, TIME_GOAL = 1.1, 1.5

# Runs in a fresh interpreter: imports first (not timed), then the command, then its own peak RSS. `evaluate` and
# `write_scores` are wrapped (not changed) to note the time and VmHWM where scoring ends and the file writing starts.
WRAPPER = r"""
import json, os, resource, sys, time
t_start = time.perf_counter()
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
import torchmetrics.functional.classification  # noqa: F401
from difffeat.cli import main
import downstream.seg.cli, downstream.seg.evaluate as ev  # noqa: F401

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
marks = {}
evaluate, write_scores = ev.evaluate, ev.write_scores

def timed_evaluate(*a, **k):
    marks["evaluate_start"] = time.perf_counter()
    out = evaluate(*a, **k)
    marks["evaluate_end"], marks["hwm_scored"] = time.perf_counter(), status("VmHWM")
    marks["anon"], marks["file"] = status("RssAnon"), status("RssFile")
    return out

def timed_write(*a, **k):
    t = time.perf_counter()
    write_scores(*a, **k)
    marks["write"] = time.perf_counter() - t
ev.evaluate, ev.write_scores = timed_evaluate, timed_write
t0 = time.perf_counter()
rss_imports = status("VmRSS")
rc = main(sys.argv[1:])
seconds = time.perf_counter() - t0
print("BENCH " + json.dumps({"rc": rc, "seconds": seconds, "imports": t0 - t_start, "rss_imports": rss_imports,
                             "setup": marks["evaluate_start"] - t0,
                             "evaluate": marks["evaluate_end"] - marks["evaluate_start"],
                             "scoring": marks["evaluate_end"] - t0, "write": marks["write"],
                             "hwm_scored": marks["hwm_scored"], "hwm": status("VmHWM"),
                             "rss_anon_scored": marks["anon"], "rss_file_scored": marks["file"],
                             "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
sys.exit(rc)
"""

# ---------------------------------------------------------------------------------------------------- data
def _write_one(job: tuple[str, str, int, int, str]) -> None:
    """One image and its mask: a Shapes-LT scene upscaled to an ADE20K size."""
    from PIL import Image

    from difffeat.data.shapes_lt import generate_scene
    from difffeat.data.synth_layouts import boundary_ignore

    root, split, index, seed, stem = job
    scene = generate_scene(seed, "val" if split == "validation" else "train", index)
    h, w = SIZES[index % len(SIZES)]
    image = Image.fromarray(scene.image, "RGB").resize((w, h), Image.BICUBIC)
    image.save(Path(root) / "images" / split / f"{stem}.jpg", format="JPEG", quality=90)
    mask = boundary_ignore(np.asarray(Image.fromarray(scene.mask, "L").resize((w, h), Image.NEAREST)))
    raw = np.where(mask == 255, 0, mask.astype(np.int64) + 1).astype(np.uint8)  # ADE: c + 1, 0 = not scored
    Image.fromarray(raw, "L").save(Path(root) / "annotations" / split / f"{stem}.png", format="PNG",
                                   compress_level=1)


def _stems(split: str, count: int) -> list[str]:
    prefix = "ADE_val" if split == "validation" else "ADE_train"
    return [f"{prefix}_{i + 1:08d}" for i in range(count)]


def world_classes() -> dict:
    from difffeat.data.shapes_lt import CLASS_NAMES, IGNORE_INDEX, STUFF_CLASSES, THING_CLASSES

    names = list(CLASS_NAMES)
    third = -(-len(names) // 3)
    return {"names": names, "stuff": list(STUFF_CLASSES), "things": list(THING_CLASSES), "ignore_index": IGNORE_INDEX,
            "groups": {"head": names[:third], "middle": names[third:-third], "tail": names[-third:]}}


def make_data(work: Path, n: int, train: int, small: int, seed: int) -> dict[str, Path]:
    """The roots of step 1 (module doc); written once per (n, train, small, seed)."""
    data = work / "data"
    config = {"n": n, "train": train, "small": small, "seed": seed, "sizes": SIZES, "version": 1}
    done = data / "done.json"
    roots = {"ade150": data / "ade150", "world13": data / "world13", "ade150-small": data / "ade150-small",
             "world13-small": data / "world13-small"}
    if done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(config)):
        print(f"data: reusing {data}")
        return roots
    shutil.rmtree(data, ignore_errors=True)
    base = roots["ade150"]
    jobs = []
    for split, count in (("training", train), ("validation", n)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        jobs += [(str(base), split, i, seed, stem) for i, stem in enumerate(_stems(split, count))]
    t0 = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
            pass
    print(f"data: {len(jobs)} images in {time.perf_counter() - t0:.1f} s to {base}")
    world = roots["world13"]
    world.mkdir()
    for name in ("images", "annotations"):
        (world / name).symlink_to(base / name)
    (world / "classes.json").write_text(json.dumps(world_classes(), indent=1))
    keep = _stems("validation", small)
    sub = roots["ade150-small"]
    for name, suffix in (("images", ".jpg"), ("annotations", ".png")):
        (sub / name / "validation").mkdir(parents=True)
        for stem in keep:
            (sub / name / "validation" / f"{stem}{suffix}").symlink_to(base / name / "validation" / f"{stem}{suffix}")
    sub13 = roots["world13-small"]
    sub13.mkdir()
    for name in ("images", "annotations"):
        (sub13 / name).symlink_to(sub / name)
    (sub13 / "classes.json").write_text(json.dumps(world_classes(), indent=1))
    done.write_text(json.dumps(config))
    return roots


# ---------------------------------------------------------------------------------------------- commands
def cli(args: list[str], threads: int, log: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    code = (f"import sys, torch; torch.set_num_threads({threads}); from difffeat.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--quiet", *args], capture_output=True, text=True, env=env)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"difffeat {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def extract(work: Path, root: Path, expected: int, threads: int, batch: int) -> Path:
    store = work / "store"
    done = work / "store.done"
    if done.is_file() and done.read_text() == str(expected):
        print(f"features: reusing {store}")
        return store
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    cli(["extract", f"ade20k:{root}", "--out", str(store), "--model", "mini", "--layer", "dift", "--t", "50",
         "--clean", "--size", str(FRAME[0]), str(FRAME[1]), "--resize", "stretch", "--batch-size", str(batch)],
        threads, work / "extract.log")
    from difffeat.store.feature_store import FeatureStore

    got = len(FeatureStore(store))
    if got != expected:
        raise SystemExit(f"{store}: {got} images, expected {expected}")
    done.write_text(str(expected))
    print(f"features: {got} images in {time.perf_counter() - t0:.1f} s to {store}")
    return store


def train(work: Path, store: Path, root: Path, name: str, iterations: int, threads: int) -> Path:
    run = work / f"run-{name}"
    done = work / f"run-{name}.done"
    if done.is_file() and done.read_text() == str(iterations):
        print(f"head {name}: reusing {run}")
        return run
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    cli(["train-seg", "--features", str(store), "--data", f"ade20k:{root}", "--split", "training", "--out", str(run),
         "--iterations", str(iterations), "--batch-size", "8"], threads, work / f"train-{name}.log")
    done.write_text(str(iterations))
    print(f"head {name}: {iterations} iterations in {time.perf_counter() - t0:.1f} s")
    return run


def measure(work: Path, run: Path, store: Path, root: Path, resolution: str, threads: int, batch: int,
            tag: str) -> dict:
    """One `difffeat eval-seg` in a fresh process: its time, peak RSS and scores."""
    out = work / "evals" / tag
    args = ["--quiet", "eval-seg", "--run", str(run), "--features", str(store), "--data", f"ade20k:{root}:validation",
            "--split", "validation", "--resolution", resolution, "--out", str(out), "--batch-size", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"eval-seg {tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stats = json.loads(proc.stdout.split("BENCH ")[-1].splitlines()[0])
    metrics = json.loads((out / "metrics.json").read_text())
    return {**stats, "wall": wall, "images": metrics["images"], "miou": metrics["miou"],
            "pixels": metrics["pixels"]}


# --------------------------------------------------------------------------------------------- breakdown
STEPS = ("dataset", "features + head", "read mask", "labels", "confusion")


def _time_original(model, ds, classes, batch: int, prune: bool, confusion: str
                   ) -> tuple[dict[str, float], torch.Tensor, float]:
    """One scoring pass at the original resolution over `ds`, each step timed: ms per image, the confusion matrix and
    the mean number of classes resized per image. `prune` is `labels_at_original`'s (False: every class resized, the
    earlier path); `confusion` is "library" (`SegMetrics`, what eval-seg uses) or "torchmetrics" (its multiclass
    confusion matrix, the earlier one)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    from difffeat.data.original_labels import candidate_classes, labels_at_original
    from downstream.seg.data import collate
    from downstream.seg.metrics import SegMetrics
    from downstream.seg.model import vote

    steps = dict.fromkeys(STEPS, 0.0)
    k, ignore = classes.num_classes, classes.ignore_index
    metrics, resized = SegMetrics(classes), 0
    for s in range(0, len(ds), batch):
        t = time.perf_counter()
        b = collate([ds[i] for i in range(s, min(s + batch, len(ds)))])
        members = model(b["features"])
        steps["features + head"] += time.perf_counter() - t
        for row, index in enumerate(b["index"].tolist()):
            t = time.perf_counter()
            mask, place = ds.original(index)
            t1 = time.perf_counter()
            pred = vote([labels_at_original(z[row : row + 1], ds.mask_size, place, prune=prune)[0] for z in members])
            t2 = time.perf_counter()
            if confusion == "library":
                metrics.update(pred, mask)
            else:
                metrics.matrix += multiclass_confusion_matrix(pred.reshape(-1), mask.reshape(-1), k,
                                                              ignore_index=ignore, validate_args=False).long()
            t3 = time.perf_counter()
            steps["read mask"] += t1 - t
            steps["labels"] += t2 - t1
            steps["confusion"] += t3 - t2
            resized += len(candidate_classes(members[0][row], ds.mask_size)) if prune else k
    return {key: 1000 * v / len(ds) for key, v in steps.items()}, metrics.matrix.clone(), resized / len(ds)


def breakdown(run: Path, store: Path, root: Path, count: int, batch: int) -> dict[str, dict[str, float]]:
    """ms per image of each step of `downstream.seg.evaluate.evaluate`, both modes, over the first `count`
    validation images (this process; the same calls the library makes, timed one by one), and of the earlier
    original-resolution loop, each with whether it scores every pixel as the library does."""
    import torch
    import torch.nn.functional as F

    from difffeat.store.feature_store import FeatureStore
    from downstream.seg.data import SegDataset, collate
    from downstream.seg.evaluate import load_run
    from downstream.seg.metrics import SegMetrics
    from downstream.seg.model import vote

    saved, model, classes = load_run(run)
    keys = [k for k in FeatureStore(store).keys() if "/validation/" in k][:count]
    spec = f"ade20k:{root}:validation"
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        t = time.perf_counter()
        ds = SegDataset([store], spec, classes, split="validation", keys=keys, read_masks=False, cache_bytes=0)
        setup = time.perf_counter() - t
        steps, library, resized = _time_original(model, ds, classes, batch, True, "library")
        out[f"original ({resized:.1f} of {classes.num_classes} classes resized per image)"] = {
            **steps, "dataset": 1000 * setup / len(ds)}
        variants = (("every class resized", False, "library"),
                    ("every class resized + torchmetrics confusion, the earlier path", False, "torchmetrics"))
        for name, prune, confusion in variants:
            steps, matrix, _ = _time_original(model, ds, classes, batch, prune, confusion)
            differ = int((matrix - library).abs().sum()) // 2
            same = "same confusion matrix" if differ == 0 else f"{differ} pixels scored differently"
            out[f"original, {name} ({same})"] = {**steps, "dataset": 1000 * setup / len(ds)}

        t = time.perf_counter()
        ds = SegDataset([store], spec, classes, split="validation", keys=keys, read_masks=True, cache_bytes=0)
        steps = dict.fromkeys(STEPS, 0.0)
        steps["dataset"] = time.perf_counter() - t  # reads every mask once and brings it to the frame
        metrics = SegMetrics(classes)
        for s in range(0, len(ds), batch):
            t = time.perf_counter()
            b = collate([ds[i] for i in range(s, min(s + batch, len(ds)))])
            members = model(b["features"])
            t1 = time.perf_counter()
            # SegModel.predict's steps (what evaluate() does in frame mode), the head's run timed apart
            pred = vote([F.interpolate(z, size=ds.mask_size, mode="bilinear", align_corners=False).argmax(1)
                         for z in members])
            t2 = time.perf_counter()
            metrics.update(pred, b["mask"])
            steps["features + head"] += t1 - t
            steps["labels"] += t2 - t1
            steps["confusion"] += time.perf_counter() - t2
        out["frame"] = {k: 1000 * v / len(ds) for k, v in steps.items()}
    return out


# -------------------------------------------------------------------------------------------------- main
def machine(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}; torch {torch.__version__}, "
            f"{threads} torch threads")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/difffeat-bench-eval", help="data, store and heads (kept for reruns)")
    ap.add_argument("--n", type=int, default=2000, help="validation images (the large run)")
    ap.add_argument("--small", type=int, default=250, help="validation images of the small run")
    ap.add_argument("--train", type=int, default=64, help="training images for the head")
    ap.add_argument("--iterations", type=int, default=300,
                    help="head training iterations (a head that learned its classes: after 20 its logits are flat and "
                         "every class can win anywhere, which no trained head scored at full size does)")
    ap.add_argument("--classes", nargs="+", default=["ade150", "world13"], choices=["ade150", "world13"],
                    help="class sets: ade150 = ADE20K's 150 classes (real ADE heads), world13 = the 13 Shapes-LT ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="eval-seg batch size")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; fastest time, highest peak kept")
    ap.add_argument("--breakdown", type=int, default=200, help="images of the per-step breakdown (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prepare-only", action="store_true", help="make the data, features and heads, then stop")
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start_load = load()
    roots = make_data(work, args.n, args.train, args.small, args.seed)
    store = extract(work, roots["ade150"], args.n + args.train, args.threads, 32)
    runs = {k: train(work, store, roots[k], k, args.iterations, args.threads) for k in args.classes}

    if args.prepare_only:
        return
    contenders = [("original", "small"), ("original", "large"), ("frame", "large")]
    timings = ("seconds", "wall", "setup", "evaluate", "scoring", "write")
    best: dict[tuple[str, str, str], dict] = {}
    for r in range(args.repeat):
        for k in args.classes:
            for resolution, size in contenders:
                root = roots[f"{k}-small"] if size == "small" else roots[k]
                got = measure(work, runs[k], store, root, resolution, args.threads, args.batch_size,
                              f"{k}-{resolution}-{size}")
                key = (k, resolution, size)
                print(f"round {r + 1} {k} {resolution:8s} {got['images']:5d} images: scoring {got['scoring']:7.2f} s "
                      f"({1000 * got['scoring'] / got['images']:.2f} ms/img), command {got['seconds']:.2f} s, "
                      f"peak RSS scoring {got['hwm_scored']:.0f} MiB / command {got['hwm']:.0f} MiB, "
                      f"mIoU {100 * (got['miou'] or 0):.1f}; load {load()}", flush=True)
                if key not in best:
                    best[key] = dict(got)
                else:
                    for field in timings:
                        best[key][field] = min(best[key][field], got[field])
                    for field in ("hwm", "hwm_scored", "maxrss"):
                        best[key][field] = max(best[key][field], got[field])
    end_load = load()

    lines = [f"{args.n} validation images of ADE20K size ({', '.join(f'{h}×{w}' for h, w in SIZES)}), mini `dift` "
             f"features at {FRAME[0]}×{FRAME[1]} (stretch), conv head, eval batch {args.batch_size}; "
             f"{machine(args.threads)}; each eval-seg a fresh process, fastest time and highest peak of "
             f"{args.repeat} interleaved round(s); load average {start_load} at the start, {end_load} at the end", "",
             "Scoring = `difffeat.cli.main` from its start to the end of `evaluate` (run, dataset, the scoring loop); "
             "writing = metrics.json + confusion.png; command = all of `main` (Python start-up and imports not "
             "counted). Peak RSS: the process's VmHWM when scoring ends / when the command ends.", "",
             "| classes | resolution | images | scoring s | ms / image | of it: setup s | loop s | writing s | "
             "command s | ms / image | peak RSS scoring MiB | peak RSS command MiB | RSS after imports MiB | "
             "RSS anon / file at scoring end MiB | mIoU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []

    def verdict(x: float, goal: float) -> str:
        return f"{x:.3f}× (goal ≤ {goal}: {'PASS' if x <= goal else 'FAIL'})"

    for k in args.classes:
        for resolution, size in contenders:
            b = best[(k, resolution, size)]
            lines.append(f"| {k} | {resolution} | {b['images']} | {b['scoring']:.1f} | "
                         f"{1000 * b['scoring'] / b['images']:.2f} | {b['setup']:.1f} | {b['evaluate']:.1f} | "
                         f"{b['write']:.1f} | {b['seconds']:.1f} | {1000 * b['seconds'] / b['images']:.2f} | "
                         f"{b['hwm_scored']:.0f} | {b['hwm']:.0f} | {b['rss_imports']:.0f} | "
                         f"{b['rss_anon_scored']:.0f} / {b['rss_file_scored']:.0f} | "
                         f"{100 * (b['miou'] or 0):.1f} |")
        small, large, frame = (best[(k, r, s)] for r, s in contenders)
        n_small, n_large = small["images"], large["images"]
        verdicts += [
            f"- {k}, peak RSS of original {n_large} / {n_small} images: scoring "
            f"{verdict(large['hwm_scored'] / small['hwm_scored'], RSS_GOAL)}; whole command "
            f"{verdict(large['hwm'] / small['hwm'], RSS_GOAL)}",
            f"- {k}, time per image original / frame at {n_large} images: scoring "
            f"{verdict(large['scoring'] / frame['scoring'], TIME_GOAL)}; whole command "
            f"{verdict(large['seconds'] / frame['seconds'], TIME_GOAL)}"]
    text = "\n".join(lines + [""] + verdicts)
    print()
    print(text)

    steps_text = ""
    if args.breakdown:
        rows = ["", f"Per-image steps (ms, this process, first {args.breakdown} validation images, batch "
                    f"{args.batch_size}; 'dataset' is building the SegDataset, which in frame mode reads every mask):",
                "", "| classes | resolution | dataset | features + head | read mask | labels (resize + argmax) | "
                    "confusion | sum |", "|---|---|---|---|---|---|---|---|"]
        for k in args.classes:
            for resolution, steps in breakdown(runs[k], store, roots[k], args.breakdown, args.batch_size).items():
                rows.append(f"| {k} | {resolution} | " + " | ".join(f"{v:.2f}" for v in steps.values())
                            + f" | {sum(steps.values()):.2f} |")
        steps_text = "\n".join(rows)
        print(steps_text)

    if args.results:
        command = "python benchmarks/eval_original_resolution.py " + " ".join(sys.argv[1:])
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n## eval_original_resolution.py ({datetime.date.today().isoformat()})\n\n`{command.strip()}`\n\n"
                    f"{text}\n{steps_text}\n")


if __name__ == "__main__":
    main()
