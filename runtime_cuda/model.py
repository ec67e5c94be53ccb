"""`runtime_cuda.Model`: the reference model with Triton kernels on its hot ops (DESIGN.md, "Kernel inventory").

Every module is the reference's, with the same parameter and buffer names, so `from_pretrained` reads the same
checkpoint directory. After the reference builds the model, each module whose class has a Triton subclass here
(`SWAPS`) is switched to that subclass; the subclasses add no state and only override the methods that run a
hot op. Everything else (embeddings, projections, the cache, generation, MTP wiring) is the reference's code.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.triton import fp8 as triton_fp8
from kernels.triton.cross_entropy import linear_cross_entropy
from kernels.triton.rms_norm import rms_norm
from kernels.triton.swiglu import swiglu
from reference import attention as ref_attention
from reference import dsa as ref_dsa
from reference import mla as ref_mla
from reference import model as ref_model
from reference import moe as ref_moe
from reference import rms_norm as ref_rms_norm
from reference import swiglu as ref_swiglu
from reference.config import ModelConfig

from .attention import DSA, MLA, Attention
from .moe import Experts, Router


class RMSNorm(ref_rms_norm.RMSNorm):
    """`reference.rms_norm.RMSNorm` on the Triton kernel (fp32 accumulation whatever the input dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.contiguous(), self.weight, self.eps)


class MLP(ref_swiglu.MLP):
    """`reference.swiglu.MLP` with the Triton SwiGLU between the three projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


SWAPS: dict[type, type] = {
    ref_rms_norm.RMSNorm: RMSNorm,
    ref_swiglu.MLP: MLP,
    ref_attention.Attention: Attention,
    ref_mla.MLA: MLA,
    ref_dsa.DSA: DSA,
    ref_moe.Router: Router,
    ref_moe.Experts: Experts,
}
"""Reference class -> its Triton subclass. Standard softmax MoE routing and the DSA indexer's LayerNorm stay
on the reference's torch ops."""


def use_triton(module: nn.Module) -> nn.Module:
    """Switch every submodule of ``module`` whose exact class is a key of `SWAPS` to its Triton subclass, in
    place (parameters, buffers and hooks untouched); returns ``module``."""
    for m in module.modules():
        cls = SWAPS.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return module


class Model(ref_model.Model):
    """DeepSeek-V3 / V3.2 causal LM with Triton kernels; the API of `reference.model.Model`.

    Runs on a CUDA device, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow: tests only). The LM loss is
    the chunked fused LM-head cross-entropy (`kernels.triton.cross_entropy.linear_cross_entropy`), so the full
    (B, T, vocab) logits are never stored in training; ``forward`` still returns logits.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        use_triton(self)

    cross_entropy = staticmethod(linear_cross_entropy)
    """The LM loss's fused head + cross-entropy: the Triton kernel (`kernels.triton.cross_entropy`)."""

    fp8_ops = triton_fp8
    """The FP8 GEMMs of FP8 training (`reference.fp8_training`) and of ``keep_fp8`` checkpoints
    (`reference.fp8_checkpoint`): the Triton kernels (FP8 tensor cores: compute capability 8.9 or more)."""
