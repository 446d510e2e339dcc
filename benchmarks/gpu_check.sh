#!/usr/bin/env bash
# Every GPU check of reciprune in one command, for a lent GPU machine whose Python has torch,
# transformers, accelerate and peft but not reciprune's other dependencies: run
# `bash scripts/gpu_wheels.sh` here first and carry `.whl` (see shared/GPU.md). Results go to
# $OUT (or ./gpu_results). Usage on the machine, from the repository root:
#     bash benchmarks/gpu_check.sh [quick]
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_large_models.py 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/oneshot_gpu.py --layers 4 --json "$OUT/oneshot_4.json" 2>&1 | tail -8 | tee "$OUT/oneshot_4.txt"
python3 benchmarks/solve_bench.py --repeats 3 2>&1 | tail -8 | tee "$OUT/solve.txt"
if [ "${1:-}" != quick ]; then
  python3 benchmarks/oneshot_gpu.py --layers 32 --methods sparsegpt --work /tmp/oneshot32 \
    --json "$OUT/oneshot_32.json" 2>&1 | tail -6 | tee "$OUT/oneshot_32.txt"
fi
if [ -f benchmarks/finetune_gpu.py ]; then
  python3 benchmarks/finetune_gpu.py --json "$OUT/finetune.json" 2>&1 | tail -12 | tee "$OUT/finetune.txt"
fi
