#!/usr/bin/env bash
# One call on a GPU node: the versions found, the Triton kernel tests compiled natively, then every kernel timed
# (bench/gpu_kernels.py), without and with the torch.compile column.
#
#   bench/gpu_check.sh                              # the node's python3 with torch, triton, numpy, pytest
#   PYTHON="uv run python" bench/gpu_check.sh       # where uv and this repo's lock are available
#   OUT=/some/dir TESTS_TIMEOUT=400 bench/gpu_check.sh
#
# Runs as it is on a bare cluster node: no uv, no network, no package downloads; the repository goes on
# PYTHONPATH. Needs torch, triton, numpy, safetensors and pytest (pytest-xdist is used when present); never mlx,
# transformers or huggingface_hub (tests/cuda/test_imports.py). Verified: the kernel tests pass under triton
# 3.6.0 and 3.9.0 (interpreter, torch 2.13/2.15), and every kernel compiles for sm_90 with both
# (bench/triton_compile.py). Each phase has its own timeout (seconds, overridable), so that one stuck phase cannot
# eat the budget: with the defaults the whole script ends within 12 minutes on one Hopper GPU.
# Results in $OUT (default bench/results): gpu_check.txt (versions and every phase's exit status),
# gpu_tests.txt, gpu_kernels.{json,txt}, gpu_kernels_compiled.{json,txt}, dsfs_bench_<op>.json (`dsfs bench` of every
# op spec, forward and backward). Exit status: the tests' status.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-bench/results}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-300}"
KERNELS_TIMEOUT="${KERNELS_TIMEOUT:-100}"
COMPILED_TIMEOUT="${COMPILED_TIMEOUT:-150}"
DSFS_BENCH_TIMEOUT="${DSFS_BENCH_TIMEOUT:-150}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# phase NAME SECONDS LOGFILE COMMAND...: run COMMAND under `timeout`, its output to the terminal and LOGFILE
phase() {
    local name=$1 limit=$2 log=$3
    shift 3
    say "== $name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && say "!! $name: stopped by its ${limit}s timeout"
    say "== $name: exit $rc after $((SECONDS - start))s"
    return "$rc"
}

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, PYTHON=$PYTHON"
# shellcheck disable=SC2086  # PYTHON may be a command with arguments ("uv run python")
$PYTHON - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
for name in ("torch", "triton", "numpy", "pytest", "safetensors", "xdist"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except ImportError as e:
        print(f"{name} MISSING ({e})")
import torch
print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB,"
          f" {torch.cuda.device_count()} device(s)")
else:
    print("GPU none visible to torch: the tests would run under Triton's CPU interpreter, and nothing is timed")
need = {"torch": (2, 9), "triton": (3, 6)}
for name, want in need.items():
    try:
        have = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in
                     importlib.import_module(name).__version__.split(".")[:2])
    except ImportError:
        continue
    if have < want:
        print(f"WARNING {name} {'.'.join(map(str, have))} is older than {'.'.join(map(str, want))}, the oldest"
              f" this project's kernels and tests were checked with")
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
else
    say "nvidia-smi not found"
fi

XDIST=()
# shellcheck disable=SC2086
if $PYTHON -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi  # Triton compiles kernels on 4 CPU cores at once
# shellcheck disable=SC2086
phase tests "$TESTS_TIMEOUT" "$OUT/gpu_tests.txt" \
    $PYTHON -m pytest tests/cuda -q -x -p no:cacheprovider --durations=10 "${XDIST[@]}"
tests_rc=$?
# shellcheck disable=SC2086
phase kernels "$KERNELS_TIMEOUT" "$OUT/gpu_kernels.txt" \
    $PYTHON -m bench.gpu_kernels --no-compile --out "$OUT/gpu_kernels.json"
# shellcheck disable=SC2086
phase kernels-compiled "$COMPILED_TIMEOUT" "$OUT/gpu_kernels_compiled.txt" \
    $PYTHON -m bench.gpu_kernels --out "$OUT/gpu_kernels_compiled.json"
# `dsfs bench` of every op spec, forward and backward: reference, torch.compile, our Triton kernel, the built-in
# shellcheck disable=SC2086
phase dsfs-bench "$DSFS_BENCH_TIMEOUT" "$OUT/dsfs_bench.txt" \
    $PYTHON -c '
import subprocess, sys
from reference.testing import all_specs
for op in all_specs():
    with open(f"{sys.argv[1]}/dsfs_bench_{op}.json", "w") as f:
        r = subprocess.run([sys.executable, "-m", "dsfs.cli", "bench", op, "--device", "cuda", "--mode", "both",
                            "--repeat", "5", "--json"], stdout=f)
    print(f"dsfs bench {op}: exit {r.returncode}", flush=True)
' "$OUT"
exit "$tests_rc"
