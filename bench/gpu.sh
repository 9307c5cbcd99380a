#!/usr/bin/env bash
# Prepared GPU benchmark (one call of the device tool, <= 8 minutes): prints the device, then IVPT ViT-B/14 reg4 at
# 518 px throughput and peak memory (inference, full training step; fp32 and bf16; batch 16 and the largest that fits;
# bare backbone alongside). Results: $OUT/gpu_bench.json (or ./gpu_bench.json without $OUT).
#   bash bench/gpu.sh                      # on the GPU machine
#   bash bench/gpu.sh --device cpu --tiny  # check of the script on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
OUT_FILE="${OUT:-.}/gpu_bench.json"
timeout 470 "$PY" bench/bench_gpu.py --json "$OUT_FILE" "$@"
echo "wrote $OUT_FILE"
