"""The hot ops of the MLX runtime: Metal kernels through ``mx.fast.metal_kernel``, or pure MLX where Metal is absent.

One module per op family, named like ``kernels/metal/<family>.metal`` (`rms_norm`, `swiglu`, `moe`, `mla`, `dsa`, `fp8`,
`cross_entropy`, `distill`, and DeepSeek-V4's `mhc`, `compressor`, `sink_attention`; `preference` and `grpo` build on
`cross_entropy` and have no kernel of their own), plus `launch`: path choice (`kernel_path`, `backend`), the one-time
self-check and its fallback to the pure-MLX path (``DSFS_REQUIRE_METAL=1`` makes a failing kernel an error),
`KernelSpec` / `Launch` / `run_metal`, and the argument checks. Each op has the name and the arguments of the reference
op (and the Triton op) of the same name; its pure-MLX path is ``<op>_mlx``, its Metal path ``_<op>_metal(...,
runner=None)`` (``runner`` runs a `Launch`: the CPU emulation in ``tests/metal_emulation`` sets it). `fp8_grouped_gemm`,
`fp8_grouped_wgrad` and `sparse_attention` have no Metal kernel: pure MLX (``mx.gather_mm`` per K block, a loop over the
experts, ``mx.fast.scaled_dot_product_attention``) on every device.

Kernels with a gradient (rms_norm, swiglu, cross_entropy, distill, and route's weights) are ``mx.custom_function``
with a ``.vjp``; the backward kernels recompute what they need (rstd, logsumexp) instead of keeping it alive between
forward and backward.

Conventions (all ops):
- float inputs may be float32, float16 or bfloat16; reductions and softmax run in float32;
- integer outputs (indices) are int32 (the reference and Triton return int64);
- FP8 e4m3 values travel as their uint8 bit patterns (``mx.to_fp8`` / ``torch.float8_e4m3fn.view(uint8)``).

Source for the semantics: the plain-PyTorch ``reference`` package (the definition of correct).
"""

from reference.fp8 import AMAX_MIN, FP8_MAX

from .compressor import compressed_topk, gated_pool
from .cross_entropy import cross_entropy, linear_cross_entropy
from .distill import distill, distill_logits
from .dsa import indexer_scores, indexer_topk, indices_to_mask, sparse_attention
from .fp8 import act_dequant, act_quant, fp8_gemm, fp8_grouped_gemm, fp8_grouped_wgrad, weight_dequant, weight_quant
from .grpo import grpo, grpo_loss, token_logps, token_stats
from .launch import (
    METAL_DIR,
    SPECS,
    KernelSpec,
    Launch,
    MetalFallbackWarning,
    MetalKernelError,
    backend,
    fallbacks,
    kernel_path,
    metal_available,
    reset_checks,
    run_metal,
)
from .mhc import mhc_post, mhc_pre
from .mla import mla_decode
from .moe import route
from .preference import preference, preference_loss, sequence_logps
from .rms_norm import rms_norm
from .sink_attention import sink_attention
from .swiglu import swiglu

__all__ = [
    "AMAX_MIN",
    "FP8_MAX",
    "METAL_DIR",
    "SPECS",
    "KernelSpec",
    "Launch",
    "MetalFallbackWarning",
    "MetalKernelError",
    "act_dequant",
    "act_quant",
    "backend",
    "compressed_topk",
    "cross_entropy",
    "distill",
    "distill_logits",
    "fallbacks",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_wgrad",
    "gated_pool",
    "grpo",
    "grpo_loss",
    "indexer_scores",
    "indexer_topk",
    "indices_to_mask",
    "kernel_path",
    "linear_cross_entropy",
    "metal_available",
    "mhc_post",
    "mhc_pre",
    "mla_decode",
    "preference",
    "preference_loss",
    "reset_checks",
    "rms_norm",
    "route",
    "run_metal",
    "sequence_logps",
    "sink_attention",
    "sparse_attention",
    "swiglu",
    "token_logps",
    "token_stats",
    "weight_dequant",
    "weight_quant",
]
