"""`runtime_cuda.V4Model`: the reference DeepSeek-V4 (`reference.v4_model`) with Triton kernels on its hot ops.

As `runtime_cuda.model` does for V3: after the reference builds the model, each module whose exact class has a
subclass here (`V4_SWAPS`, plus the V3 swaps of `runtime_cuda.model.SWAPS`: RMSNorm) is switched to it. The
subclasses add no state; they override one method each (the indexer two): the attention's ``attend``
(`kernels.triton.sink_attention`), the compressors' ``pool`` (`kernels.triton.compressor.gated_pool`), the indexer's
``select`` (`kernels.triton.compressor.compressed_topk`), the hyper-connections' ``pre`` (`kernels.triton.mhc.mhc_pre`)
and the layers' ``post`` (`kernels.triton.mhc.mhc_post`). The routed experts (clamped SwiGLU), routers, indexer scores
and the hyper-head stay on the reference's torch ops.
"""

from __future__ import annotations

import torch

from kernels.triton.compressor import compressed_topk, gated_pool
from kernels.triton.cross_entropy import linear_cross_entropy
from kernels.triton.mhc import mhc_post, mhc_pre
from kernels.triton.sink_attention import sink_attention
from reference import compressor as ref_compressor
from reference import mhc as ref_mhc
from reference import v4_model as ref_v4

from .model import SWAPS


class V4Attention(ref_v4.V4Attention):
    """`reference.v4_model.V4Attention` with the Triton sparse attention with sinks."""

    def attend(self, q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return sink_attention(q.contiguous(), kv.contiguous(), self.sinks, idx.contiguous(), self.head_dim**-0.5)


def _gated_pool(kv, gate, position_bias, overlap, prior_kv=None, prior_gate=None):
    """`kernels.triton.compressor.gated_pool` on contiguous copies (the compressor passes window-aligned slices)."""
    def c(t):
        return None if t is None else t.contiguous()

    return gated_pool(c(kv), c(gate), position_bias, overlap, c(prior_kv), c(prior_gate))


class Compressor(ref_compressor.Compressor):
    """`reference.compressor.Compressor` with the Triton gated pooling."""

    pool = staticmethod(_gated_pool)


class Indexer(ref_compressor.Indexer):
    """`reference.compressor.Indexer` with the Triton gated pooling of its keys and the Triton top-k."""

    pool = staticmethod(_gated_pool)

    def select(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Top-``index_topk`` visible entries (B, S, k) int64, -1 for unfilled slots
        (`kernels.triton.compressor.compressed_topk`)."""
        visible = ref_compressor.visible_entries(positions, scores.shape[-1], self.compress_rate)
        return compressed_topk(scores, visible, self.topk)


class HyperConnection(ref_mhc.HyperConnection):
    """`reference.mhc.HyperConnection` with the fused Triton mHC pre-mix (RMS, projection, Sinkhorn, collapse)."""

    def pre(self, streams: torch.Tensor):
        return mhc_pre(streams.contiguous(), self.fn, self.base, self.scale, self.sinkhorn_iters, self.hc_eps,
                       self.rms_norm_eps)


class V4DecoderLayer(ref_v4.V4DecoderLayer):
    """`reference.v4_model.V4DecoderLayer` with the Triton mHC post-mix."""

    post = staticmethod(mhc_post)


class V4MTPBlock(ref_v4.V4MTPBlock):
    """`reference.v4_model.V4MTPBlock` with the Triton mHC post-mix."""

    post = staticmethod(mhc_post)


V4_SWAPS: dict[type, type] = {
    **SWAPS,
    ref_v4.V4Attention: V4Attention,
    ref_compressor.Compressor: Compressor,
    ref_compressor.Indexer: Indexer,
    ref_mhc.HyperConnection: HyperConnection,
    ref_v4.V4DecoderLayer: V4DecoderLayer,
    ref_v4.V4MTPBlock: V4MTPBlock,
}
"""Reference class -> its Triton subclass, for V4 models."""


class V4Model(ref_v4.V4Model):
    """DeepSeek-V4 causal LM with Triton kernels; the API of `reference.v4_model.V4Model`. Runs on a CUDA device, or
    on CPU tensors under ``TRITON_INTERPRET=1`` (tests). The LM loss is the chunked fused head cross-entropy."""

    def __init__(self, config):
        super().__init__(config)
        for m in self.modules():
            cls = V4_SWAPS.get(type(m))
            if cls is not None:
                m.__class__ = cls

    cross_entropy = staticmethod(linear_cross_entropy)
