"""Shared setup of the asv suites: backends, checkpoints, models, inputs; synchronisation and backward passes come
from `dsfs.bench` (``dsfs bench`` uses the same).

Every suite but ``ops.py`` (which adds ``compiled`` and the built-ins: see its docstring) is parametrized by
``backend``, one of `BACKENDS`:

- ``reference``: the plain-PyTorch model of `reference/` (the definition of correct), on CUDA when there is a
  GPU, else on the CPU;
- ``cuda``: `runtime_cuda` (Triton kernels); needs a CUDA device, otherwise skipped (the Triton interpreter is
  never used for timing);
- ``mlx``: `runtime_mlx` (MLX; Metal kernels on Apple Silicon, pure MLX elsewhere);
- ``transformers`` and ``mlx_lm``: the peers, ``transformers.models.deepseek_v3`` / ``deepseek_v32`` and
  ``mlx_lm.models.deepseek_v3`` / ``deepseek_v32``.

All backends of one benchmark run the same shapes with the same weights: the reference model is built with
seeded weights and written as a Hugging Face checkpoint directory (`checkpoint`), which every backend loads
through its own loader (`load_model`), as in ``tests/test_oracle.py``. A backend that cannot run here raises
``NotImplementedError`` from the suite's ``setup``; asv records the benchmark as skipped (shown as n/a).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile

import numpy as np

# The device synchronization and forward+backward step of every suite, shared with `dsfs bench` (one copy, in
# dsfs/bench.py): ``sync(backend, *outs)``, ``forward_backward(backend, fn, module=None)``, ``no_grad(backend)``,
# ``total(out)``; a backend name of `MLX_BACKENDS` means mx arrays, any other torch tensors.
from dsfs.bench import MLX_NAMES, forward_backward, no_grad, sync, total  # noqa: F401 (re-exported for the suites)

BACKENDS = ["reference", "cuda", "mlx", "transformers", "mlx_lm"]
OURS = ("reference", "cuda", "mlx")
PEERS = ("transformers", "mlx_lm")
MLX_BACKENDS = MLX_NAMES  # backends whose inputs are mx arrays

# A small DeepSeek-V3 block (hidden 256, 4 heads, MLA, 8 experts), one decoder layer; suites override fields.
BASE_CONFIG = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, q_lora_rank=None, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    first_k_dense_replace=0, max_position_embeddings=4096, index_n_heads=4, index_head_dim=64, index_topk=128,
)


# Imported once by asv's forkserver (asv.conf.json: "launch_method": "forkserver") before it forks a process per
# benchmark and parameter set, so that each of them does not import torch, transformers and mlx again (seconds
# each on 2 cores). Linux only: forking after macOS's GPU frameworks are loaded is unsafe. Liger's chunked losses
# (the ops.py peer) import torch._dynamo, about 5 s here, which every ``compiled`` benchmark needs too.
HEAVY_MODULES = ("torch", "reference", "transformers", "transformers.models.deepseek_v3.modeling_deepseek_v3",
                 "transformers.models.deepseek_v32.modeling_deepseek_v32", "mlx.core", "mlx.nn", "mlx_lm.utils",
                 "mlx_lm.models.deepseek_v3", "mlx_lm.models.deepseek_v32", "liger_kernel.chunked_loss",
                 "transformers.models.deepseek_v4.modeling_deepseek_v4")


def preimport() -> None:
    """Import `HEAVY_MODULES` (those that are installed) when running under asv on Linux."""
    if sys.platform != "linux" or not os.environ.get("ASV"):
        return
    for name in HEAVY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


preimport()


class Suite:
    """Base of every benchmark class: asv timing attributes sized for a 2-core CPU (one round, at most five
    samples of at most ~2 s in all per benchmark and parameter set)."""

    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0.1
    sample_time = 0.02
    timeout = 300


def skip(reason: str):
    """Raise the ``NotImplementedError`` that asv records as 'skipped'."""
    raise NotImplementedError(reason)


MIB = 1 << 20


def peak_mib(where: str, fn) -> float:
    """MiB by which the memory in use peaks above its level just before, while ``fn()`` runs: the memory a call
    needs beyond its inputs (what it allocates, frees or keeps). ``where`` names the arrays ``fn`` works on, as in
    `dsfs.bench.sync` (a device of ``dsfs.bench.DEVICES`` or an asv backend name).

    - MLX (``mlx``, ``mlx_lm``): ``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``, minus
      ``mx.get_active_memory()`` before (MLX's allocator: arrays only, its buffer cache not counted).
    - CUDA (``cuda``, and the asv backends when torch sees a GPU): ``torch.cuda.max_memory_allocated()`` after
      ``torch.cuda.reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` before (tensors only, not
      the caching allocator's reserve).
    - CPU (``cpu``, and the asv backends without a GPU), Linux only: the process's resident set. Unreachable
      objects are collected and glibc's free heap memory is given back (``malloc_trim(0)``) so that reusing it
      counts; then the kernel's high-water mark is reset to the current RSS (``"5"`` written to
      ``/proc/self/clear_refs``), and the result is ``VmHWM`` after the call minus ``VmRSS`` before (from
      ``/proc/self/status``, KiB). This counts everything the process touches (allocator slack, libraries loaded on
      a first call), so warm ``fn`` up first. Elsewhere, or where the kernel does not reset the mark, it raises
      ``NotImplementedError`` (asv: skipped); so does ``mps``.
    """
    from dsfs.bench import is_mlx

    if is_mlx(where):
        import mlx.core as mx

        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        fn()
        mx.synchronize()
        return (mx.get_peak_memory() - before) / MIB
    if where == "mps":
        skip("peak memory: no peak counter for mps")
    import torch

    if where != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    return _rss_peak_mib(fn)


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    skip(f"peak memory: /proc/self/status has no {field}")


def _rss_peak_mib(fn) -> float:
    """`peak_mib` on the CPU: the rise of the resident set's high-water mark over the RSS before ``fn()``."""
    if not sys.platform.startswith("linux"):
        skip(f"peak memory on the CPU needs Linux's /proc/self/clear_refs (this is {sys.platform})")
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: return the heap's free pages, so reusing them counts
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux 4.0+)
    except OSError as e:
        skip(f"peak memory: cannot reset the peak RSS ({e})")
    before = _status_kib("VmRSS")
    if _status_kib("VmHWM") > before + 1024:
        skip("peak memory: writing 5 to /proc/self/clear_refs did not reset VmHWM here")
    fn()
    return max(0, _status_kib("VmHWM") - before) / 1024


def torch_device():
    """The device the torch backends (reference, transformers) run on: CUDA when present, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require(backend: str) -> None:
    """Raise ``NotImplementedError`` when ``backend`` cannot run on this machine (missing package or device)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "cuda":
        if sys.platform == "darwin":
            skip("cuda: no CUDA on macOS")
        import torch

        if not torch.cuda.is_available():
            skip("cuda: no CUDA device on this machine")
        import_or_skip("runtime_cuda", "Model")
    elif backend == "mlx":
        import_or_skip("runtime_mlx", "Model")
    elif backend == "transformers":
        import_or_skip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    elif backend == "mlx_lm":
        import_or_skip("mlx_lm.models.deepseek_v3")


def import_or_skip(module: str, attr: str | None = None):
    """Import ``module`` (and check it has ``attr``), or raise ``NotImplementedError`` saying why."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        skip(f"{module} is not importable here: {e}")
    if attr is not None and not hasattr(mod, attr):
        skip(f"{module} has no {attr} yet")
    return mod


def config(**overrides):
    """A `reference.ModelConfig` of `BASE_CONFIG` updated with ``overrides``."""
    from reference import ModelConfig

    return ModelConfig(**{**BASE_CONFIG, **overrides})


def reference_model(cfg, seed: int = 0):
    """The reference `Model` of ``cfg`` with its own seeded initialisation (``init_weights``: matrices
    N(0, initializer_range), norm gains 1), float32 on the CPU, eval mode."""
    import torch

    from reference import Model

    torch.manual_seed(seed)
    return Model(cfg).eval()


def checkpoint(cfg, seed: int = 0) -> str:
    """Write `reference_model` of ``cfg`` as a Hugging Face checkpoint directory and return its path (a fresh
    temporary directory, removed when the process exits)."""
    tmp = tempfile.TemporaryDirectory(prefix="dsfs-bench-")
    _TEMP_DIRS.append(tmp)
    path = os.path.join(tmp.name, "model")
    reference_model(cfg, seed).save_pretrained(path)
    return path


_TEMP_DIRS: list = []


def load_model(backend: str, path: str, train: bool = False):
    """Load the checkpoint directory ``path`` with ``backend``'s own loader. Torch models come in float32 on
    `torch_device`, in eval mode unless ``train``. Raises ``NotImplementedError`` where the backend cannot."""
    require(backend)
    if backend in ("reference", "cuda", "transformers"):
        import torch

        if backend == "reference":
            from reference import Model

            model = Model.from_pretrained(path)
        elif backend == "cuda":
            model = import_or_skip("runtime_cuda", "Model").Model.from_pretrained(path)
        else:
            import transformers

            logging.getLogger("transformers").setLevel(logging.ERROR)
            transformers.utils.logging.disable_progress_bar()
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.to(torch_device()).train(train)
    if backend == "mlx":
        model = import_or_skip("runtime_mlx", "Model").Model.from_pretrained(path)
    else:
        import pathlib

        from mlx_lm.utils import load_model as mlx_lm_load

        model, _ = mlx_lm_load(pathlib.Path(path))
    model.train(train)
    return model


def array(backend: str, shape, seed: int = 0, kind: str = "normal", high: int | None = None):
    """A seeded random input for ``backend``: float32 N(0, 1) (``kind='normal'``) or int64 tokens in
    ``[0, high)`` (``kind='tokens'``), as a torch tensor on `torch_device` or an ``mx.array``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape, dtype=np.float32) if kind == "normal" else rng.integers(0, high, shape)
    if backend in MLX_BACKENDS:
        import mlx.core as mx

        return mx.array(a.astype(np.int32) if kind == "tokens" else a)
    import torch

    return torch.from_numpy(a).to(torch_device())


def first(out):
    """The output tensor of a module call that may return a tuple (transformers' attention does)."""
    return out[0] if isinstance(out, tuple) else out
