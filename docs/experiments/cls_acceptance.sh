#!/usr/bin/env bash
# Issue "classification heads": the acceptance experiments, repeatable end to end.
#   bash docs/experiments/cls_acceptance.sh [WORKDIR]   (about 25 minutes on one CPU core)
# Data: (a) Shapes-LT image labels, imbalance 100 (2,000 training scenes), tested on 700 scenes of a balanced
# Shapes-LT draw (another seed); (b) scikit-learn's digits, 60 test images per class held out, the rest made
# long-tailed (imbalance 10 and 50) for training, as raw 8×8 pixels and as mini features of 64×64 upscales.
# Features: mini model, dift layer (up_blocks.1) at t = 50, globally average-pooled (64-d); for the fusion
# comparison also up_blocks.0 and t = 300 (Shapes) and pixels + mini (digits).
# Runs: CE, LA, TLA+ADRW, DirMixE (± test-time aggregation), each with plain SGD and with SSE-SAM, 3 seeds;
# then concat / weighted / ReconBoost fusion (CE and LA, 3 seeds). Every run is `difffeat train-cls` (digits:
# with --test-labels, so it evaluates at the end) or train-cls then `difffeat eval-cls` (Shapes: the test set
# is another store); they run in one Python process to skip the start-up cost, WORKDIR/commands.txt lists them.
# The tables (mean ± std over seeds of the mean accuracy over the 20 test-agnostic distributions) are printed
# at the end and written to tables.md.
set -euo pipefail
W=${1:-runs/cls-acceptance}
mkdir -p "$W" && cd "$W"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python}

# ---- (a) Shapes-LT
[ -d shapes ] || difffeat --quiet data synth shapes --n 2500 --seed 0 --imbalance 100
[ -d shapes-balanced ] || difffeat --quiet data synth shapes-balanced --n 700 --seed 1 --imbalance 1
for D in shapes shapes-balanced; do
  [ -d "feat-$D" ] || difffeat --quiet extract "$D" --out "feat-$D" --model mini --layer dift --layer up_blocks.0 \
    --t 50 --t 300
done
$PY - <<'EOF'
from downstream.cls.labels import write_labels_csv
write_labels_csv("shapes", "shapes-labels.csv")  # keys train/images/…, val/…, test/…
write_labels_csv("shapes-balanced", "shapes-balanced-labels.csv")
EOF

# ---- (b) digits
$PY - <<'EOF'
"""8×8 digits → 64×64 RGB PNGs; a raw-pixel store; a balanced test CSV and long-tailed training CSVs."""
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from difffeat.store.feature_store import FeatureStoreWriter, store_exists

digits = load_digits()
x, y = digits.images, digits.target
rng = np.random.default_rng(0)
test, pool = [], {}
for c in range(10):  # 60 test images per class; the rest (≥ 114 per class) is the training pool
    idx = rng.permutation(np.flatnonzero(y == c))
    test += idx[:60].tolist()
    pool[c] = idx[60:]
images = Path("digits/images")
if not images.is_dir():
    images.mkdir(parents=True)
    for i in range(len(x)):  # ink 0..16 → 0..255, bright strokes on black like Shapes-LT's objects
        a = np.clip(x[i] * 16, 0, 255).astype(np.uint8)
        Image.fromarray(a, "L").resize((64, 64), Image.BICUBIC).convert("RGB").save(images / f"{i:04d}.png")


def write(name, ids):
    with open(name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label"])
        w.writerows((f"{i:04d}.png", int(y[i])) for i in sorted(ids))


write("digits-test.csv", test)
for imb in (10, 50):  # n_c = 110·imb^(−c/9): digit 0 is the head class, 9 the tail
    counts = [int(110 * imb ** (-c / 9)) for c in range(10)]
    write(f"digits-train-if{imb}.csv", [i for c in range(10) for i in pool[c][:counts[c]]])
    print(f"digits imbalance {imb}: training counts {counts}")
if not store_exists("feat-digits-pixels"):
    with FeatureStoreWriter("feat-digits-pixels", {"model": "pixels-8x8", "layers": ["pixels"]}) as w:
        for i in range(len(x)):  # the 64 pixel values as channels of a 1×1 map: pooling keeps all of them
            w.add(f"{i:04d}.png", {"pixels": (x[i].reshape(64, 1, 1) / 16.0).astype(np.float32)})
EOF
[ -d feat-digits-mini ] || difffeat --quiet extract digits/images --out feat-digits-mini --model mini --layer dift --t 50

# ---- runs
$PY - <<'EOF'
import contextlib
import io
import json
import shlex
import time
import warnings
from pathlib import Path

import numpy as np

from difffeat.cli import main

warnings.filterwarnings("ignore")
SEEDS = (0, 1, 2)
DATA = {  # name: (training arguments, evaluation arguments)
    "shapes-mini": (["--features", "feat-shapes", "--layer", "up_blocks.1@50", "--labels", "shapes-labels.csv",
                     "--split", "train/"],
                    ["--features", "feat-shapes-balanced", "--labels", "shapes-balanced-labels.csv"]),
}
for imb in (10, 50):  # one store holds train and test images: the labels CSVs split them, train-cls evaluates
    for src in ("pixels", "mini"):
        DATA[f"digits{imb}-{src}"] = (["--features", f"feat-digits-{src}", "--labels", f"digits-train-if{imb}.csv",
                                       "--test-labels", "digits-test.csv"], None)
METHODS = {"ce": ["--method", "ce"], "la": ["--method", "la"], "tla-adrw": ["--method", "tla-adrw"],
           "dirmixe": ["--method", "dirmixe"]}
OPTIMS = {"sgd": [], "ssesam": ["--optim", "ssesam"]}
FUSION = {  # several sources: Shapes' 2 layers × 2 timesteps, digits' pixels + mini
    "shapes-4src": (["--features", "feat-shapes", "--sources", "layer", "--labels", "shapes-labels.csv",
                     "--split", "train/"], DATA["shapes-mini"][1]),
    "digits10-pix+mini": (["--features", "feat-digits-pixels", "--features", "feat-digits-mini", "--labels",
                           "digits-train-if10.csv", "--test-labels", "digits-test.csv"], None),
}
log = open("commands.txt", "a")


def metrics_file(run_dir):
    """eval-cls writes RUN/eval/metrics.json; train-cls with --test-labels writes RUN/metrics.json."""
    return run_dir / "eval" / "metrics.json" if (run_dir / "eval").is_dir() else run_dir / "metrics.json"


def run(name, train_args, eval_args):
    out = Path("runs") / name
    if (out / "eval" / "metrics.json").is_file() or (eval_args is None and (out / "metrics.json").is_file()):
        return
    t0 = time.time()
    commands = [["train-cls", *train_args, "--out", str(out), "--overwrite"]]
    if eval_args is not None:
        commands.append(["eval-cls", "--run", str(out), *eval_args, "--out", str(out / "eval")])
    for argv in commands:
        print("difffeat --quiet " + shlex.join(argv), file=log, flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            if main(["--quiet", *argv]) != 0:
                raise SystemExit(f"failed: {argv}")
    m = json.loads(metrics_file(out).read_text())["mean_accuracy"]
    print(f"{name:45s} {time.time() - t0:5.1f}s  " + "  ".join(f"{k} {100 * v:.1f}" for k, v in m.items()
                                                                if k in ("default", "tta")), flush=True)


for data, (train_args, eval_args) in DATA.items():
    for method, margs in METHODS.items():
        for optim, oargs in OPTIMS.items():
            for seed in SEEDS:
                run(f"{data}/{method}-{optim}-s{seed}", [*train_args, *margs, *oargs, "--seed", str(seed)],
                    eval_args)
for data, (train_args, eval_args) in FUSION.items():
    for fusion in ("concat", "weighted", "reconboost"):
        for method in ("ce", "la"):
            for seed in SEEDS:
                run(f"{data}/{fusion}-{method}-s{seed}", [*train_args, "--fusion", fusion, "--method", method,
                                                          "--seed", str(seed)], eval_args)


# ---- tables
def cell(runs, variant="default", key="mean_accuracy"):
    values = [100 * json.loads(metrics_file(r).read_text())[key][variant] for r in runs]
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


lines = ["Mean accuracy (%) over the 20 test-agnostic distributions (forward-LT 50…2, uniform, backward-LT 2…50, "
         "9 Dirichlet draws), mean ± std over seeds " + ", ".join(map(str, SEEDS)) + ".", "",
         "| data | optimizer | CE | LA | TLA+ADRW | DirMixE | DirMixE + TTA |", "|---|---|---|---|---|---|---|"]
for data in DATA:
    for optim in OPTIMS:
        runs = {m: [Path("runs") / data / f"{m}-{optim}-s{s}" for s in SEEDS] for m in METHODS}
        lines.append(f"| {data} | {'SSE-SAM' if optim == 'ssesam' else 'SGD'} | "
                     + " | ".join(cell(runs[m]) for m in METHODS) + f" | {cell(runs['dirmixe'], 'tta')} |")
lines += ["", "Same runs, accuracy on the uniform (balanced) test set and on backward-LT 50:", "",
          "| data | optimizer | CE | LA | TLA+ADRW | DirMixE | DirMixE + TTA |", "|---|---|---|---|---|---|---|"]


def dist(runs, name, variant="default"):
    values = []
    for r in runs:
        rows = json.loads(metrics_file(r).read_text())["distributions"]
        values.append(100 * next(x["accuracy"][variant] for x in rows if x["name"] == name))
    return f"{np.mean(values):.1f}"


for data in DATA:
    for optim in OPTIMS:
        runs = {m: [Path("runs") / data / f"{m}-{optim}-s{s}" for s in SEEDS] for m in METHODS}
        cells = [f"{dist(runs[m], 'uniform')} / {dist(runs[m], 'backward-50')}" for m in METHODS]
        cells.append(f"{dist(runs['dirmixe'], 'uniform', 'tta')} / {dist(runs['dirmixe'], 'backward-50', 'tta')}")
        lines.append(f"| {data} | {'SSE-SAM' if optim == 'ssesam' else 'SGD'} | " + " | ".join(cells) + " |")
lines += ["", "Fusion of several feature sources (mean accuracy over the 20 distributions, mean ± std over seeds):",
          "", "| sources | method | concat | weighted sum | ReconBoost |", "|---|---|---|---|---|"]
for data in FUSION:
    for method in ("ce", "la"):
        lines.append(f"| {data} | {method.upper()} | " + " | ".join(
            cell([Path("runs") / data / f"{f}-{method}-s{s}" for s in SEEDS]) for f in ("concat", "weighted",
                                                                                       "reconboost")) + " |")
text = "\n".join(lines) + "\n"
Path("tables.md").write_text(text)
print(text)
EOF
