#!/usr/bin/env bash
# The field's protocols on real weights and real data, on a GPU machine (docs/protocols.md).
#
#   DATA=/data OUT=runs/protocols bash benchmarks/protocols_gpu.sh
#       runs every protocol whose data root exists under $DATA:
#       $DATA/ADEChallengeData2016, $DATA/cityscapes, $DATA/SPair-71k, $DATA/ddpm-segmentation/<set>,
#       $DATA/longtail (an imagefolder with a label column); models by Hub id from the local cache, or MODEL_SD15 /
#       MODEL_SD21 as local folders (then marked "--set model=…" in results.json).
#   SMOKE=1 OUT=/tmp/p bash benchmarks/protocols_gpu.sh
#       the same loop at toy scale on the built-in world (what CI checks; any machine).
#   PROTOCOLS="ade20k spair" limits the loop.
set -euo pipefail
OUT=${OUT:-runs/protocols}
DATA=${DATA:-data}
ALL=$(difffeat protocol list | awk '{print $1}')
PROTOCOLS=${PROTOCOLS:-$ALL}
declare -A ROOT=([ade20k]=ADEChallengeData2016 [cityscapes]=cityscapes [spair]=SPair-71k [longtail-probe]=longtail)
for name in $PROTOCOLS; do
  out="$OUT/${name//\//_}"
  if [[ -n "${SMOKE:-}" ]]; then
    difffeat --quiet protocol run "$name" --smoke --out "$out"
    continue
  fi
  case "$name" in
    ddpm-seg/*) root="$DATA/ddpm-segmentation/${name#ddpm-seg/}" ;;
    *) root="$DATA/${ROOT[$name]}" ;;
  esac
  [[ -d "$root" ]] || { echo "skip $name: no $root"; continue; }
  model=()
  case "$name" in
    spair) [[ -n "${MODEL_SD21:-}" ]] && model=(--set "model=$MODEL_SD21") ;;
    *) [[ -n "${MODEL_SD15:-}" ]] && model=(--set "model=$MODEL_SD15") ;;
  esac
  difffeat protocol run "$name" --data "$root" --out "$out" "${model[@]}"
done
echo "results: $OUT/*/results.json and report.html"
