#!/usr/bin/env bash
# CI smoke run of the asv suites (bench/README.md): `asv check` (every suite imports, every benchmark's signature
# matches its parameters), then one sample of a small subset, one cheap parameter set per suite on every
# backend, in the current environment without saving results. Exits non-zero if any benchmark fails; a backend
# that cannot run here is skipped, not failed. About 1-2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."

SUBSET=(
  "attention\.Prefill\.time_forward\(.*, 'mla_naive', 128\)"
  "attention\.Decode\.time_decode\(.*, 'dsa', 128\)"
  "attention\.KVCacheSize"
  "moe\.FFN\.time_forward_backward\(.*, 'deepseek_8', 256\)"
  "moe\.Router\.time_router\(.*, 'deepseek_64', 256\)"
  "ops\.rms_norm_grad\.time_forward_backward\(.*, 'V2-Lite hidden, 1 tokens'\)"
  "ops\.weight_dequant\.time_forward\(.*, 'V3 671B expert gate_proj"
  "ops\.preference_memory\.track_peak_mib_forward_backward\(.*, '2x2 sequences of 128 tokens"
  "model\.DecodeStep\.track_tokens_per_s\(.*, 128\)"
  "speculative\.Decode\.track_tokens_per_s\(.*, 1\)"
  "speculative\.Acceptance\.track_acceptance\(.*, 1\)"
  "v4\.Decode\.time_decode\(.*, 'csa', 1024\)"
  "v4\.KVCache"
)
BENCH=()
for regex in "${SUBSET[@]}"; do BENCH+=(--bench "$regex"); done

uv run asv check --python=same
# asv run needs this machine described (~/.asv-machine.json); --yes takes its defaults on a fresh machine.
uv run asv machine --yes >/dev/null
# asv run exits 2 when a benchmark failed; --dry-run keeps .asv/results untouched.
uv run asv run --python=same --quick --dry-run --show-stderr "${BENCH[@]}"
