"""Every op of the kernel inventory, from its spec (`reference.testing`): forward and forward+backward on the spec's
bench shapes (realistic slices of DeepSeek-V3/V3.2 and V2-Lite: ``dsfs bench --list`` prints them).

One class per op, named like it (``ops.rms_norm.time_forward``), and for differentiable ops one more with the
suffix ``_grad`` (``ops.rms_norm_grad.time_forward_backward``), each parametrized by ``backend`` and ``shape`` (the
bench shape's name). Seconds per call. Inputs and timed calls come from `dsfs.bench.build`, the function ``dsfs
bench`` times: the same inputs (the spec's seeded samples, cast as the battery casts them), the same fixed random
cotangent on the outputs that carry gradients, gradients of the op's ``grads`` inputs.

The losses fused with the LM head (`MEMORY_OPS`: ``preference``, ``distill``, ``grpo``) get a third class,
``_memory`` (``ops.preference_memory.track_peak_mib_forward_backward``): peak memory of forward and of
forward+backward, asv's ``peakmem_`` (the process's peak RSS, bytes, baseline included) and ``track_peak_mib_`` (MiB
above the memory in use before the call: `common.peak_mib`), see `_Memory`.

Backends (`BACKENDS`): ``reference`` (the spec's reference), ``compiled`` (``torch.compile`` of it), ``cuda``
(our Triton kernel, ``spec.ours['cuda']``; CUDA only, never under the interpreter), ``mlx`` (ours in MLX),
``torch_builtin`` / ``mlx_builtin`` (the spec's built-ins; for the losses, the unfused PyTorch loss), and the peers
``transformers``, ``mlx_lm`` and ``liger`` (Liger-Kernel's chunked losses for ``preference``, ``distill`` and
``grpo``): their functions for the op, wrapped to its signature (`PEERS`). Torch backends run on CUDA when there is
a GPU, else on the CPU; MLX ones on MLX's default device. The dtype is one per machine, so that every ratio compares
like with like: bfloat16 where there is a GPU (CUDA or Metal), else float32, unless the shape is specified for other
dtypes only (`dtype`). A backend that cannot run here is skipped (``NotImplementedError`` in ``setup``), and so is, on a
CPU, a shape that would take more than `CPU_MAX_SECONDS` per call (the V3 LM head: minutes; the memory suites have
their own limit, `MEMORY_CPU_MAX_SECONDS`).
"""

from __future__ import annotations

import functools
import inspect
import sys
from types import SimpleNamespace

from dsfs import bench as dsfs_bench

from . import common
from .common import Suite, skip

BACKENDS = ["reference", "compiled", "cuda", "mlx", "torch_builtin", "mlx_builtin", "transformers", "mlx_lm",
            "liger"]
# On a CPU, a shape whose forward would take more than CPU_MAX_SECONDS at these rates (FLOP/s: torch's fp32 matmul
# on a few cores; MLX's Linux wheel with its bundled reference BLAS, bench/README.md) is skipped: the V3 LM head is
# minutes per call, and asv calls it several times.
CPU_FLOPS = {"cpu": 1e11, "mlx": 4e9}
CPU_MAX_SECONDS = 5.0
# The memory suites (`_Memory`) make two calls per benchmark (one to warm up, one measured) and skip no realistic
# loss shape: on a CPU they have their own, larger limit, on forward+backward (counted as BACKWARD_FACTOR forwards)
# whatever the method. The realistic distillation shape is estimated at 24 s per forward+backward (30-60 s measured
# on 2 shared cores) and is measured; on MLX's Linux CPU wheel (4 GFLOP/s) the realistic shapes are skipped.
MEMORY_CPU_MAX_SECONDS = 60.0
BACKWARD_FACTOR = 3.0
# Ops whose peak memory is measured (a ``<op>_memory`` class each): the losses fused with the LM head, whose point
# is memory. They must be differentiable.
MEMORY_OPS = ("preference", "distill", "grpo")


# ----------------------------------------------------------------------------- peers
# transformers' and mlx-lm's own functions for an op, wrapped to the op's signature. Each factory takes the spec
# and returns the function, or raises NotImplementedError. Arguments are taken by the op's parameter names, so a
# peer applies only to a spec whose signature names what it needs.


def _named(spec, *names):
    """A function ``args -> [values of names]`` over the op's positional arguments (the reference's defaults for
    those a sample leaves out); skips when the op has no parameter of one of those names."""
    missing = [n for n in names if n not in spec.params]
    if missing:
        skip(f"the peer needs {', '.join(names)}; {spec.signature} has no {', '.join(missing)}")
    sig = inspect.signature(spec.reference).parameters
    idx = [spec.params.index(n) for n in names]

    def get(args):
        return [args[i] if i < len(args) else sig[n].default for i, n in zip(idx, names, strict=True)]

    return get


def _hf_rms_norm(spec):
    """transformers' DeepseekV3RMSNorm.forward with the op's weight and eps."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    get = _named(spec, "x", "weight", "eps")

    def rms_norm(*args):
        x, w, eps = get(args)
        return DeepseekV3RMSNorm.forward(SimpleNamespace(weight=w, variance_epsilon=eps), x)

    return rms_norm


def _hf_rope(spec):
    """transformers' ``apply_rotary_pos_emb_interleave`` (DeepSeek-V3's pairing) or ``apply_rotary_pos_emb``
    (NeoX), on the op's tables repeated over both halves as transformers lays them out (the interleaved form
    returns its output de-interleaved, as transformers does); the key it also rotates is one row of ``x``."""
    import torch
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    get = _named(spec, "x", "cos", "sin", "interleaved", "offset")

    def rope(*args):
        x, cos, sin, interleaved, offset = get(args)
        t, d = x.shape[-2:]
        cos, sin = cos[offset:offset + t].to(x.dtype), sin[offset:offset + t].to(x.dtype)
        cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
        x4 = x.reshape(-1, 1, t, d)
        apply = hf.apply_rotary_pos_emb_interleave if interleaved else hf.apply_rotary_pos_emb
        q, _ = apply(x4, x4[:1], cos, sin)
        return q.reshape(x.shape)

    return rope


def _hf_swiglu(spec):
    """``ACT2FN['silu'](gate) * up``, transformers' DeepseekV3MLP."""
    from transformers.activations import ACT2FN

    get, act = _named(spec, "gate", "up"), ACT2FN["silu"]

    def swiglu(*args):
        gate, up = get(args)
        return act(gate) * up

    return swiglu


def _hf_linear_cross_entropy(spec):
    """transformers' ``fixed_cross_entropy`` of ``hidden @ weight.T`` (the logits materialized; mean over tokens)."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    get = _named(spec, "hidden", "weight", "targets", "ignore_index")

    def linear_cross_entropy(*args):
        h, w, t, ignore = get(args)
        return fixed_cross_entropy(h @ w.T, t, ignore_index=ignore)

    return linear_cross_entropy


def _hf_weight_dequant(spec):
    """transformers' ``finegrained_fp8._dequantize_fp8_weight`` (its pure-torch path)."""
    import torch
    from transformers.integrations import finegrained_fp8

    get = _named(spec, "w_fp8", "scale_inv", "block_size", "dtype")

    def weight_dequant(*args):
        w, s, bs, dtype = get(args)
        return finegrained_fp8._dequantize_fp8_weight(w, s, [bs, bs], dtype or torch.float32)

    return weight_dequant


def _hf_fp8_gemm(spec):
    """transformers' ``fp8_linear`` (its Triton kernel; CUDA only): it takes bfloat16 activations and quantizes them
    itself, so it gets the op's activations dequantized once, outside the timed call."""
    import torch

    if not torch.cuda.is_available():
        skip("transformers' fp8_linear needs CUDA")
    from transformers.integrations import finegrained_fp8

    from reference.fp8 import act_dequant

    get = _named(spec, "a", "a_s", "b", "b_s", "block_size")
    dequantized = {}

    def fp8_gemm(*args):
        a, a_s, b, b_s, bs = get(args)
        if id(a) not in dequantized:
            dequantized[id(a)] = act_dequant(a, a_s, bs).to(torch.bfloat16)
        return finegrained_fp8.fp8_linear(dequantized[id(a)], b, b_s, [bs, bs], allow_deepgemm=False)

    return fp8_gemm


def _mlx_lm_rms_norm(spec):
    """``mx.fast.rms_norm``, what mlx-lm's ``nn.RMSNorm`` calls."""
    import mlx.core as mx

    get = _named(spec, "x", "weight", "eps")

    def rms_norm(*args):
        x, w, eps = get(args)
        return mx.fast.rms_norm(x, w, eps)

    return rms_norm


def _mlx_lm_rope(spec):
    """mlx-lm's ``nn.RoPE`` (``mx.fast.rope``, base 10000): it computes its angles from the positions instead of
    reading the op's tables."""
    import mlx.nn as nn

    get = _named(spec, "x", "interleaved", "offset")
    ropes = {}

    def rope(*args):
        x, interleaved, offset = get(args)
        key = (x.shape[-1], bool(interleaved))
        if key not in ropes:
            ropes[key] = nn.RoPE(x.shape[-1], traditional=bool(interleaved), base=10000.0)
        return ropes[key](x, offset=offset)

    return rope


def _mlx_lm_swiglu(spec):
    """mlx-lm's ``activations.swiglu`` (a shapeless ``mx.compile`` of ``silu(gate) * x``)."""
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    get = _named(spec, "gate", "up")

    def swiglu(*args):
        return mlx_lm_swiglu(*get(args))

    return swiglu


def _mlx_lm_linear_cross_entropy(spec):
    """``nn.losses.cross_entropy`` of ``hidden @ weight.T``, averaged over the tokens (mlx-lm's training loss)."""
    import mlx.nn as nn

    get = _named(spec, "hidden", "weight", "targets")

    def linear_cross_entropy(*args):
        h, w, t = get(args)
        return nn.losses.cross_entropy(h @ w.T, t).mean()

    return linear_cross_entropy


def _mlx_lm_weight_dequant(spec):
    """mlx-lm's DeepSeek-V3 ``sanitize``, which dequantizes each FP8 weight (uint8 bits) once at load, to bfloat16
    in 128x128 blocks whatever the op's block size and dtype."""
    from mlx_lm.models import deepseek_v3

    get = _named(spec, "w_fp8", "scale_inv")
    model = deepseek_v3.Model(deepseek_v3.ModelArgs(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
        qk_nope_head_dim=8))

    def weight_dequant(*args):
        w, s = get(args)
        return model.sanitize({"w.weight": w, "w.weight_scale_inv": s})["w.weight"]

    return weight_dequant


def _liger_compiled() -> bool:
    """Whether Liger's chunked losses run their per-chunk step under ``torch.compile``: on CUDA yes (Liger's
    default, what TRL's trainers use), on the CPU no (Liger targets GPUs; ``compiled=False`` is its eager path, the
    one tests/test_preference.py and tests/test_distill.py check against ours)."""
    return common.torch_device().type == "cuda"


def _liger_preference(spec):
    """Liger-Kernel's ``LigerFusedLinearDPOLoss`` (chunked over pairs, ``chunk_size=1``, its default; `_liger_compiled`)
    with ``use_ref_model=False``, wrapped to ``(loss, chosen_logps, rejected_logps)``.

    The closest honest equivalent of ours: Liger takes the reference model's hidden states and head
    (``ref_input``, ``ref_weight``) and runs that model's head itself, chunk by chunk, while ours takes the reference
    log-probs precomputed (an input, as TRL's ``precompute_ref_log_probs`` gives them). Without its reference model
    Liger does the same work as ours (the policy's head, log-softmax, the targets' log-probs summed per sequence and
    the loss, its gradients formed during forward) but computes the loss against reference log-probs of 0, so its
    loss value differs while its cost does not. Its log-prob outputs carry no gradient (its backward scales the
    loss's only), so they are returned tied to the loss with weight 0: the benchmark's cotangents on them add
    nothing, and the backward timed is Liger's. Liger has no ``ipo`` and its ``sigmoid`` has no label smoothing
    (ours is cDPO there): such samples are skipped."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    get = _named(spec, "hidden", "weight", "targets", "beta", "loss_type", "label_smoothing", "ignore_index")
    modules = {}

    def preference(*args):
        hidden, weight, targets, beta, loss_type, label_smoothing, ignore_index = get(args)
        if loss_type not in ("sigmoid", "hinge") or label_smoothing:
            skip(f"Liger's DPO has no {loss_type} with label_smoothing {label_smoothing} as ours")
        key = (beta, loss_type, ignore_index)
        if key not in modules:
            modules[key] = LigerFusedLinearDPOLoss(ignore_index=ignore_index, beta=beta, loss_type=loss_type,
                                                   compiled=_liger_compiled(), use_ref_model=False)
        loss, aux = modules[key](weight, hidden, targets)
        zero = loss * 0
        return loss, aux[0] + zero, aux[1] + zero

    return preference


def _liger_distill(spec):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``return_soft_hard_loss=True``; chunks of 1024 tokens, its
    default; `_liger_compiled`): the same loss as ours (tests/test_distill.py), gradients formed during forward. Its
    backward scales the loss's gradient only (the soft and hard terms' cotangents are ignored), the same work."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    get = _named(spec, "student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "targets", "beta",
                 "temperature", "weight_hard_loss", "weight_soft_loss", "ignore_index")
    modules = {}

    def distill(*args):
        sh, sw, th, tw, targets, beta, temperature, w_hard, w_soft, ignore_index = get(args)
        key = (beta, temperature, w_hard, w_soft, ignore_index)
        if key not in modules:
            modules[key] = LigerFusedLinearJSDLoss(
                weight_hard_loss=w_hard, weight_soft_loss=w_soft, beta=beta, ignore_index=ignore_index,
                temperature=temperature, compiled=_liger_compiled(), return_soft_hard_loss=True)
        return modules[key](sh, sw, th, tw, targets)

    return distill


def _liger_grpo(spec):
    """Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunks of 1 completion, its default; `_liger_compiled`) with the
    reference log-probs given (``use_ref_model`` when ``beta > 0``): the same loss as ours (tests/test_grpo.py),
    gradients formed during forward, wrapped to ``(loss, *its metrics)``: ``kl`` (beta > 0) and the region clip ratio;
    it computes no entropy (ours does, in the same pass)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    get = _named(spec, "hidden", "weight", "targets", "completion_mask", "advantages", "old_logps", "ref_logps",
                 "beta", "epsilon_low", "epsilon_high", "temperature", "loss_type", "max_completion_length")
    modules = {}

    def grpo(*args):
        hidden, weight, targets, mask, adv, old, ref, beta, eps_low, eps_high, temp, loss_type, max_len = get(args)
        key = (beta, eps_low, eps_high, temp, loss_type, max_len, ref is not None)
        if key not in modules:
            modules[key] = LigerFusedLinearGRPOLoss(
                beta=beta, compiled=_liger_compiled(), use_ref_model=ref is not None, epsilon_low=eps_low,
                epsilon_high=eps_high, loss_type=loss_type, max_completion_length=max_len, temperature=temp)
        loss, metrics = modules[key](hidden, weight, targets, mask, adv, ref_per_token_logps=ref,
                                     old_per_token_logps=old)
        return loss, *metrics

    return grpo


PEERS = {
    "transformers": {"rms_norm": _hf_rms_norm, "rope": _hf_rope, "swiglu": _hf_swiglu,
                     "linear_cross_entropy": _hf_linear_cross_entropy, "weight_dequant": _hf_weight_dequant,
                     "fp8_gemm": _hf_fp8_gemm},
    "mlx_lm": {"rms_norm": _mlx_lm_rms_norm, "rope": _mlx_lm_rope, "swiglu": _mlx_lm_swiglu,
               "linear_cross_entropy": _mlx_lm_linear_cross_entropy, "weight_dequant": _mlx_lm_weight_dequant},
    "liger": {"preference": _liger_preference, "distill": _liger_distill, "grpo": _liger_grpo},
}


# ----------------------------------------------------------------------------- backends, dtype, shapes


def target(backend: str) -> tuple[str, str]:
    """``(implementation, device)`` of an asv backend: the `dsfs.bench.IMPLS` name (or the peer's) and where it
    runs (torch backends on `common.torch_device`)."""
    torch_dev = common.torch_device().type
    return {"reference": ("reference", torch_dev), "compiled": ("compiled", torch_dev), "cuda": ("ours", "cuda"),
            "mlx": ("ours", "mlx"), "torch_builtin": ("builtin", torch_dev), "mlx_builtin": ("builtin", "mlx"),
            "transformers": ("transformers", torch_dev), "mlx_lm": ("mlx_lm", "mlx"),
            "liger": ("liger", torch_dev)}[backend]


def dtype(spec, sample=None):
    """The machine's dtype: bfloat16 where there is a CUDA or Metal GPU, else float32; or, where the op (or the
    ``sample``) is not specified for that one, the first dtype it is specified for."""
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and sys.platform == "darwin":
        try:
            import mlx.core as mx

            gpu = mx.metal.is_available()
        except ImportError:
            pass
    d = torch.bfloat16 if gpu else torch.float32
    allowed = [x for x in spec.dtypes if sample is None or sample.dtypes is None or x in sample.dtypes]
    return d if d in allowed else (allowed or spec.dtypes)[0]


def _on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "mlx":
        import mlx.core as mx

        return not mx.metal.is_available()
    return False


def _spec(op: str):
    from reference.testing import get_spec

    return get_spec(op)


@functools.cache
def _samples(op: str) -> dict:
    """The op's bench samples by name (drawn once per process)."""
    return {s.name: s for s in dsfs_bench.bench_samples(_spec(op))}


def _static_skips(spec, shapes: list[str]) -> list[tuple]:
    """(backend, shape) pairs that cannot run on any machine (no kernel of ours, no built-in, no peer for the op):
    asv skips them without running ``setup``."""
    missing = [b for b in BACKENDS
               if (b in ("cuda", "mlx") and b not in spec.ours)
               or (b == "torch_builtin" and "torch" not in spec.builtin)
               or (b == "mlx_builtin" and "mlx" not in spec.builtin)
               or (b in PEERS and spec.name not in PEERS[b])]
    return [(b, s) for b in missing for s in shapes]


# ----------------------------------------------------------------------------- the suites

_BUILT: dict = {}  # (op, mode, backend, shape) -> Timed or the NotImplementedError: asv re-runs setup per sample


def build(op: str, mode: str, backend: str, shape: str):
    """The `dsfs.bench.Timed` of one benchmark (built once per process), or raise ``NotImplementedError``."""
    key = (op, mode, backend, shape)
    if key not in _BUILT:
        try:
            _BUILT[key] = _build(op, mode, backend, shape)
        except NotImplementedError as e:
            _BUILT[key] = e
    if isinstance(_BUILT[key], NotImplementedError):
        raise _BUILT[key]
    return _BUILT[key]


def _build(op: str, mode: str, backend: str, shape: str):
    spec, impl, sample, dt, device, fn = _prepare(op, backend, shape, CPU_MAX_SECONDS)
    return dsfs_bench.build(spec, impl, sample, dt, device, mode, fn=fn)


def _prepare(op: str, backend: str, shape: str, max_seconds: float, factor: float = 1.0):
    """``(spec, impl, sample, dtype, device, fn)``: what `dsfs.bench.build` needs for one benchmark, after the
    checks that may skip it (``NotImplementedError``): the device is there, the peer has a function for the op, the
    shape exists, and on a CPU one call (``factor`` forwards) takes at most ``max_seconds`` at `CPU_FLOPS`."""
    spec = _spec(op)
    impl, device = target(backend)
    why = dsfs_bench.unavailable(device)
    if why:
        skip(why)
    fn = None
    if backend in PEERS:
        if op not in PEERS[backend]:
            skip(f"{backend}: no function for {op}")
        try:
            fn = PEERS[backend][op](spec)
        except ImportError as e:
            skip(f"{backend} is not importable here: {e}")
    samples = _samples(op)
    if shape not in samples:
        skip(f"{op} has no bench shape {shape!r}")
    sample = samples[shape]
    dt = dtype(spec, sample)
    if _on_cpu(device) and spec.flops is not None:
        flops = factor * spec.flops(sample, dt)
        seconds = flops / CPU_FLOPS[device]
        if seconds > max_seconds:
            call = "call" if factor == 1 else f"forward+backward (as {factor:g} forwards)"
            skip(f"{flops / 1e9:.0f} GFLOP per {call}: about {seconds:.0f} s on this CPU (limit {max_seconds:.0f} s)")
    return spec, impl, sample, dt, device, fn


class _Forward(Suite):
    op = ""

    def setup(self, backend, shape):
        self.call = build(self.op, "forward", backend, shape).call

    def time_forward(self, backend, shape):
        self.call()


class _ForwardBackward(Suite):
    op = ""

    def setup(self, backend, shape):
        self.call = build(self.op, "backward", backend, shape).call

    def time_forward_backward(self, backend, shape):
        self.call()


class _Memory(Suite):
    """Peak memory of one call, forward (``*_forward``) and forward+backward (``*_forward_backward``):

    - ``peakmem_*``: asv's peak resident memory of the benchmark's process (bytes), which includes the Python,
      torch and MLX baseline of the process (several hundred MB), the inputs and setup;
    - ``track_peak_mib_*``: what the call itself needs (MiB): `common.peak_mib` of the second call (the first
      warms up), the peak of the device's allocator above the memory in use before the call (CUDA, MLX), or of the
      process's resident set on a CPU (Linux).

    The benchmark builds its call itself (`dsfs.bench.build`, as the time suites), so that setup holds nothing and
    each method builds only its own mode; setup makes the checks that may skip it, with the memory suites' CPU
    limit (`MEMORY_CPU_MAX_SECONDS` on a forward+backward) instead of `CPU_MAX_SECONDS`."""

    op = ""
    unit = "MiB"  # of the track_ methods (asv gives peakmem_ its own, bytes)
    timeout = 600

    def setup(self, backend, shape):
        _prepare(self.op, backend, shape, MEMORY_CPU_MAX_SECONDS, BACKWARD_FACTOR)

    def _timed(self, mode, backend, shape):
        spec, impl, sample, dt, device, fn = _prepare(self.op, backend, shape, MEMORY_CPU_MAX_SECONDS,
                                                      BACKWARD_FACTOR)
        return dsfs_bench.build(spec, impl, sample, dt, device, mode, fn=fn)

    def _track(self, mode, backend, shape):
        timed = self._timed(mode, backend, shape)
        return common.peak_mib(timed.where, timed.call)

    def peakmem_forward(self, backend, shape):
        self._timed("forward", backend, shape).call()

    def peakmem_forward_backward(self, backend, shape):
        self._timed("backward", backend, shape).call()

    def track_peak_mib_forward(self, backend, shape):
        return self._track("forward", backend, shape)

    def track_peak_mib_forward_backward(self, backend, shape):
        return self._track("backward", backend, shape)


def _suites() -> dict:
    """One class per op (and per differentiable op one ``_grad`` class), parametrized by backend and shape name; for
    the ops of `MEMORY_OPS` one more, ``_memory`` (`_Memory`)."""
    from reference.testing import all_specs

    out = {}
    for name, spec in all_specs().items():
        try:
            shapes = [d["name"] for d in dsfs_bench.describe(spec, counts=False)]
        except Exception as e:  # a broken spec must not hide every other suite; its own tests report it
            print(f"bench/ops.py: {name}: no bench shapes ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        doc = f"{spec.signature}: MODE on its bench shapes. {spec.source}".strip()
        attrs = dict(op=name, params=[BACKENDS, shapes], param_names=["backend", "shape"], __module__=__name__,
                     skip_params=_static_skips(spec, shapes))
        out[name] = type(name, (_Forward,), dict(attrs, __doc__=doc.replace("MODE", "forward (seconds per call)")))
        if spec.differentiable:
            out[f"{name}_grad"] = type(f"{name}_grad", (_ForwardBackward,), dict(
                attrs, __doc__=doc.replace("MODE", "forward+backward (seconds per call)")))
        if name in MEMORY_OPS and spec.differentiable:
            out[f"{name}_memory"] = type(f"{name}_memory", (_Memory,), dict(
                attrs, __doc__=doc.replace("MODE", "peak memory of forward and forward+backward (bytes: peakmem_, "
                                                   "MiB above the memory in use before: track_peak_mib_)")))
    return out


globals().update(_suites())
