"""tests/cuda and what it imports run on a bare GPU node: python3 with torch, triton, numpy, safetensors and pytest
only (bench/gpu_check.sh). No module on that path may import mlx, transformers or huggingface_hub."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORBIDDEN = ("mlx", "mlx_lm", "transformers", "huggingface_hub", "tokenizers")


def test_kernel_tests_import_no_mlx_transformers_or_hub():
    modules = ["runtime_cuda", "bench.gpu_kernels"] + [
        f"tests.cuda.{p.stem}" for p in sorted((ROOT / "tests" / "cuda").glob("*.py")) if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"imported on the GPU-node path: {out.stdout.strip()}"
