#!/usr/bin/env bash
# The GPU check of the throughput issue, as one prepared script (about 10 minutes on an H100-class GPU):
# SD-1.5 architecture at 512² (random weights), gdf-legacy layers, fp16, --batch-size auto; difffeat vs a
# batch-1 GDF-style loop vs bare compute, SDPA vs xformers, compile on/off. Appends the tables, with the
# device name, to benchmarks/RESULTS.md (or $DIFFFEAT_RESULTS) and writes benchmarks/gpu-results.json.
#
#   bash benchmarks/gpu.sh            # on a CUDA machine, from the repository root, venv active
#   bash benchmarks/gpu.sh --tiny     # the same on a CPU with a tiny configuration (DIFFFEAT_BENCH_TINY=1)
#
# Extra arguments go to benchmarks/bench_gpu.py (--n, --naive-n, --only, --results).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
# A compile cache that survives this shell (inductor reuses kernels across runs where it can).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/difffeat/inductor}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
try:
    import xformers
    print(f"xformers {xformers.__version__}")
except ImportError as e:
    print(f"xformers not installed ({e}); the xformers rows will say why and use SDPA")
EOF
exec python benchmarks/bench_gpu.py --results "${DIFFFEAT_RESULTS:-benchmarks/RESULTS.md}" "$@"
