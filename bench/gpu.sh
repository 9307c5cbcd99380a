#!/usr/bin/env bash
# Prepared GPU benchmark, one call of at most 8 minutes on one large GPU (H200): the paper recipe's model (ViT-B/14
# reg4, 518 px) training images/s in fp32, bf16 and bf16 + torch.compile, inference images/s, peak memory, and the data
# pipeline's images/s per CPU core against what the GPU consumes. Writes $OUT/gpu_bench.json and $OUT/gpu_bench.md
# (./ without $OUT); `python bench/run_all.py --gpu_json gpu_bench.json` puts them into BENCHMARKS.md.
#   bash bench/gpu.sh                                                          # on the GPU machine
#   bash bench/gpu.sh --device cpu --tiny --batch 2 --steps 1 --warmup 1 --compile_backend aot_eager   # CPU check
# Needs torch, torchvision, timm, transformers (the GPU image has them); the project is used from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
OUT_FILE="${OUT:-.}/gpu_bench.json"
timeout 470 "$PY" bench/bench_gpu.py --json "$OUT_FILE" "$@"
echo "wrote $OUT_FILE and ${OUT_FILE%.json}.md"
