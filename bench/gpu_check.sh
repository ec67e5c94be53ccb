#!/usr/bin/env bash
# One call on a GPU machine: the Triton kernel tests natively, then every kernel timed (bench/gpu_kernels.py).
# Results go to $OUT (default bench/results): gpu_tests.txt, gpu_kernels.json, gpu_kernels.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_tests.txt"
uv run pytest tests/cuda -q -x --durations=10 2>&1 | tail -40 | tee -a "$OUT/gpu_tests.txt"
uv run python -m bench.gpu_kernels --out "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_kernels.txt"
