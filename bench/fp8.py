"""Fine-grained FP8 (e4m3, DeepSeek-V3 report section 3.3): activation quantization, weight dequantization and
the block-scaled GEMM, forward only.

Shapes for N in `ROWS`, K = 1024, float32 in and out, 128-wide blocks:

- ``act_quant``: x (N, K) -> e4m3 (N, K) and one scale per 1x128 tile (N, K/128);
- ``weight_dequant``: e4m3 weights (N, K) with one scale per 128x128 block -> float32 (N, K);
- ``fp8_gemm``: e4m3 activations (N, K) with tile scales times e4m3 weights (1024, K) with block scales, fp32
  accumulation -> (N, 1024).

Seconds per call. Per backend: reference = `reference.fp8`; cuda = `kernels.triton.fp8`; mlx =
`runtime_mlx.kernels` (e4m3 as uint8 bit patterns). Peers: transformers' ``finegrained_fp8`` dequantization
(``_dequantize_fp8_weight``, the pure-torch path it uses for backward) and its GEMM (``fp8_linear``, CUDA only);
mlx-lm's DeepSeek-V3 ``sanitize``, which dequantizes each FP8 weight once at load (to bfloat16).
"""

from __future__ import annotations

from . import common
from .common import BACKENDS, Suite, skip

OPS = ["act_quant", "weight_dequant", "fp8_gemm"]
ROWS = [512, 2048]
K, OUT, BLOCK = 1024, 1024, 128
MODULES = {"reference": "reference.fp8", "cuda": "kernels.triton.fp8", "mlx": "runtime_mlx.kernels"}


def quantized(n: int):
    """Torch CPU tensors: x (n, K) float32, its act_quant (a, a_s), and weights w (n, K) / b (OUT, K) quantized
    per 128x128 block: (w_fp8, w_s), (b_fp8, b_s). Seeded."""
    import torch

    from reference.fp8 import act_quant, weight_quant

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, K, generator=gen)
    return (x, *act_quant(x, BLOCK), *weight_quant(torch.randn(n, K, generator=gen), BLOCK),
            *weight_quant(torch.randn(OUT, K, generator=gen) * K**-0.5, BLOCK))


def to_backend(backend: str, tensors):
    """The tensors on ``backend``: torch on `common.torch_device`, or ``mx.array`` (e4m3 as uint8 bits)."""
    import torch

    if backend not in common.MLX_BACKENDS:
        return [t.to(common.torch_device()) for t in tensors]
    import mlx.core as mx

    return [mx.array((t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()) for t in tensors]


def op_call(backend: str, op: str, n: int):
    """A no-argument function that runs ``op`` on ``backend`` over prepared inputs and returns its outputs."""
    common.require(backend)
    x, a, a_s, w, w_s, b, b_s = to_backend(backend, quantized(n))
    if backend in common.OURS:
        mod = common.import_or_skip(MODULES[backend])
        if not hasattr(mod, op):
            skip(f"{mod.__name__} has no {op}")
        fn, args = getattr(mod, op), {"act_quant": (x,), "weight_dequant": (w, w_s), "fp8_gemm": (a, a_s, b, b_s)}[op]
        return lambda: fn(*args, BLOCK)
    if backend == "transformers":
        import torch
        from transformers.integrations import finegrained_fp8 as hf_fp8

        if op == "weight_dequant":
            return lambda: hf_fp8._dequantize_fp8_weight(w, w_s, [BLOCK, BLOCK], torch.float32)
        if op == "fp8_gemm" and torch.cuda.is_available():
            return lambda: hf_fp8.fp8_linear(x.to(torch.bfloat16), b, b_s, [BLOCK, BLOCK])
        skip(f"transformers: no {op} for tensors on {common.torch_device()}")
    if op != "weight_dequant":
        skip(f"mlx_lm: no {op} (it dequantizes FP8 checkpoints at load)")
    from mlx_lm.models import deepseek_v3

    args = deepseek_v3.ModelArgs(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, kv_lora_rank=8, q_lora_rank=None,
                                 qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8)
    model = deepseek_v3.Model(args)
    return lambda: model.sanitize({"w.weight": w, "w.weight_scale_inv": w_s})["w.weight"]


class FP8(Suite):
    """One FP8 op on N rows of width 1024, forward (seconds)."""

    params = [BACKENDS, OPS, ROWS]
    param_names = ["backend", "op", "rows"]

    def setup(self, backend, op, rows):
        self.call = op_call(backend, op, rows)

    def time_forward(self, backend, op, rows):
        with common.no_grad(backend):
            out = self.call()
            common.sync(backend, *(out if isinstance(out, tuple) else (out,)))
