#!/usr/bin/env bash
# Issue "difffeat sweep": does the probe's order predict full segmentation training? (docs/experiments/sweep.md)
#   bash docs/experiments/sweep.sh [WORKDIR] [ITERATIONS]   (one thread, one job at a time)
# 1) the sweep on Shapes-LT with the mini model: every up block's output × 5 timesteps × {plain, caption}, on 64
#    labelled train images (ridge probe, successive halving 16 → 32 → 64);
# 2) for the configurations it ranks best, median and worst: features of the whole data set with
#    `difffeat extract --config` (best.json as written; the other two are best.json with the row's layer, t,
#    techniques and noise mode), then `difffeat train-seg` (conv head, CE, 3 seeds, ITERATIONS iterations, default
#    600) on the train split, and `difffeat eval-seg` on the test split.
# Prints the sweep's rows for the three and the test mIoU mean ± std over seeds; writes results.json.
set -euo pipefail
W=${1:-runs/sweep-experiment}
ITER=${2:-600}
mkdir -p "$W" && cd "$W"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
[ -d shapes ] || difffeat --quiet data synth shapes --n 500 --seed 11
printf 'variants:\n  plain: []\n  caption: [prompt:caption]\n' > techniques.yaml
[ -f sweep/ranking.json ] || difffeat --quiet sweep shapes/train --labels shapes --out sweep --layers up-blocks \
  --t 25,50,100,200,400 --techniques techniques.yaml --n 64 --seed 0
python - <<'EOF'
import json, pathlib
rows = json.load(open("sweep/ranking.json"))["ranking"]
variants = json.load(open("sweep/config.json"))["config"]["variants"]
best = json.load(open("sweep/best.json"))
picks = {"best": rows[0], "median": rows[(len(rows) - 1) // 2], "worst": rows[-1]}
pathlib.Path("configs").mkdir(exist_ok=True)
for name, row in picks.items():
    cfg = dict(best, images="shapes", layers=[row["layer"]], timesteps=[row["t"]],
               techniques=variants[row["variant"]], noise=row["noise"] != "clean",
               ensemble=1 if row["noise"] == "clean" else int(row["noise"].removeprefix("noise-x")))
    json.dump(cfg, open(f"configs/{name}.json", "w"), indent=1)
json.dump(picks, open("picks.json", "w"), indent=1)
EOF
for P in best median worst; do
  [ -f "feat-$P/manifest.json" ] || difffeat --quiet extract --config "configs/$P.json" --out "feat-$P" > /dev/null
  for S in 0 1 2; do
    [ -f "seg/$P-s$S/eval-test/metrics.json" ] && continue
    difffeat --quiet train-seg --features "feat-$P" --masks shapes --split train --val-split val --head conv \
      --loss ce --iterations "$ITER" --batch-size 8 --seed "$S" --out "seg/$P-s$S" --overwrite > /dev/null
    difffeat --quiet eval-seg --run "seg/$P-s$S" --features "feat-$P" --masks shapes --split test > /dev/null
  done
done
python - <<'EOF'
import json, statistics
picks = json.load(open("picks.json"))
out = {}
print("| sweep rank | configuration | probe mIoU [95% interval] (images) | train-seg test mIoU, mean ± std (3 seeds) | per seed |")
print("|---|---|---|---|---|")
for name, row in picks.items():
    seeds = [json.load(open(f"seg/{name}-s{s}/eval-test/metrics.json"))["miou"] for s in range(3)]
    mean, std = statistics.mean(seeds), statistics.stdev(seeds)
    out[name] = {"row": row, "test_miou": seeds, "mean": mean, "std": std}
    print(f"| {row['rank']} ({name}) | `{row['config']}` | {row['miou']:.3f} [{row['low']:.3f}, {row['high']:.3f}] "
          f"({row['images']}) | {100 * mean:.1f} ± {100 * std:.1f} | {', '.join(f'{100 * v:.1f}' for v in seeds)} |")
b, m, w = (out[k] for k in ("best", "median", "worst"))
print(f"order agrees (best > median > worst by mean): {b['mean'] > m['mean'] > w['mean']}; "
      f"best within one std of the best run: {max(o['mean'] for o in out.values()) - b['mean'] <= b['std']}; "
      f"worst below best: {w['mean'] < b['mean']}")
json.dump(out, open("results.json", "w"), indent=1)
EOF
