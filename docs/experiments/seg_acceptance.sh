#!/usr/bin/env bash
# Issue "segmentation heads": the acceptance experiments on Shapes-LT, repeatable end to end.
#   bash docs/experiments/seg_acceptance.sh [WORKDIR]   (about 50 minutes on a 2-core CPU)
# 1) mini-model features vs raw pixels vs a random-weight UNet of the same architecture (CE, same head, budget);
# 2) AUCSeg vs CE on mini features over 3 seeds, then λ and the memory bank;
# 3) the same comparison on the finer 32×32 grid (mini features extracted at 128²): CE, AUCSeg at
#    λ = 0.25 and 0.5, and the memory bank at λ = 0.5 (the better λ there).
# The summary tables (mean ± std over seeds, test split) are printed at the end.
set -euo pipefail
W=${1:-runs/seg-acceptance}
mkdir -p "$W" && cd "$W"
export OMP_NUM_THREADS=1
[ -d shapes ] || difffeat --quiet data synth shapes --n 1000 --seed 0
[ -d feat-mini ] || difffeat --quiet extract shapes --out feat-mini --model mini --layer dift --t 50
[ -d feat-random ] || difffeat --quiet extract shapes --out feat-random --model mini-random --layer dift --t 50
[ -d feat-pixels ] || python -m downstream.seg.pixel_store shapes --out feat-pixels --patch 4
[ -d feat-mini-128 ] || difffeat --quiet extract shapes --out feat-mini-128 --model mini --layer dift --t 50 \
  --size 128 128 --resize stretch
C="--masks shapes --split train --val-split val --head conv --iterations 2000 --batch-size 8"
run() {  # run NAME FEATURES ARGS…: train then evaluate on test
  local name=$1 feat=$2; shift 2
  [ -f "seg/$name/eval-test/metrics.json" ] && return
  difffeat --quiet train-seg --features "$feat" $C "$@" --out "seg/$name" --overwrite > /dev/null
  difffeat --quiet eval-seg --run "seg/$name" --features "$feat" --masks shapes --split test > /dev/null
}
jobs_max=2
for S in 0 1 2; do
  for F in mini random pixels; do run "$F-ce-s$S" "feat-$F" --loss ce --seed "$S" & 
    while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done; done
  run "mini-auc-s$S" feat-mini --loss aucseg --seed "$S" &
  while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done
  run "mini-aucmb-s$S" feat-mini --loss aucseg --memory-bank --seed "$S" &
  while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done
  for L in 0.25 2; do run "mini-auc$L-s$S" feat-mini --loss aucseg --auc-weight "$L" --seed "$S" &
    while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done; done
  run "mini128-ce-s$S" feat-mini-128 --loss ce --seed "$S" &
  while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done
  for L in 0.25 0.5; do run "mini128-auc$L-s$S" feat-mini-128 --loss aucseg --auc-weight "$L" --seed "$S" &
    while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done; done
  run "mini128-aucmb0.5-s$S" feat-mini-128 --loss aucseg --auc-weight 0.5 --memory-bank --seed "$S" &
  while [ "$(jobs -rp | wc -l)" -ge $jobs_max ]; do sleep 1; done
done
wait
python -m downstream.seg.summary seg/* --metrics eval-test/metrics.json --markdown
