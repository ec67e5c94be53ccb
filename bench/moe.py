"""Feed-forward layers: dense SwiGLU, a standard softmax top-k MoE and DeepSeekMoE at 8, 64 and 256 routed experts.

Input (1, N, 256) float32 for N tokens in `TOKENS`. Variants (one decoder layer's ``mlp``, `bench.common.BASE_CONFIG`):

- ``dense``: SwiGLU with intermediate width 512;
- ``standard_8``: softmax router, 8 experts of width 64, top-2, no shared expert;
- ``deepseek_8``: sigmoid router with the correction bias, 8 experts of width 64, top-2, one shared expert;
- ``deepseek_64``: 64 experts, top-6, 8 groups of which 4 are kept (group-limited routing), one shared expert;
- ``deepseek_256``: 256 experts, top-8, 8 groups, 4 kept, one shared expert (DeepSeek-V3's routing at width 64).

`FFN` times the forward and forward+backward (gradients of the layer's parameters); `Router`
times the DeepSeekMoE router alone (scores, group-limited top-k, weights). Seconds per call. The peers time their
own modules on the same weights: transformers' DeepseekV3MLP / DeepseekV3MoE / DeepseekV3TopkRouter and mlx-lm's
DeepseekV3MLP / DeepseekV3MoE / MoEGate (neither has a standard softmax MoE).
"""

from __future__ import annotations

from . import common
from .common import BACKENDS, Suite, skip

VARIANTS = ["dense", "standard_8", "deepseek_8", "deepseek_64", "deepseek_256"]
TOKENS = [256, 1024]
ROUTING = {  # routed experts -> (top-k, n_group, topk_group)
    8: (2, 1, 1),
    64: (6, 8, 4),
    256: (8, 8, 4),
}


def moe_config(variant: str):
    """The one-layer config of FFN ``variant`` (MLA attention, which the FFN benchmarks do not run)."""
    if variant == "dense":
        return common.config(first_k_dense_replace=1)
    kind, experts = variant.split("_")
    k, groups, kept = ROUTING[int(experts)]
    return common.config(moe_type=kind, n_routed_experts=int(experts),
                         num_experts_per_tok=k, n_group=groups, topk_group=kept)


def load_mlp(backend: str, variant: str):
    """(model, its layer-0 ``mlp``) of ``backend`` for ``variant``; raises NotImplementedError where a peer has no
    such module."""
    common.require(backend)
    if backend in common.PEERS and variant.startswith("standard"):
        skip(f"{backend}: DeepSeek-V3 has no standard softmax MoE")
    model = common.load_model(backend, common.checkpoint(moe_config(variant)))
    return model, model.model.layers[0].mlp


class FFN(Suite):
    """One FFN layer on (1, N, 256): forward, and forward+backward (seconds)."""

    params = [BACKENDS, VARIANTS, TOKENS]
    param_names = ["backend", "variant", "tokens"]

    def setup(self, backend, variant, tokens):
        self.model, self.mlp = load_mlp(backend, variant)
        self.x = common.array(backend, (1, tokens, 256), seed=1)
        self.step = common.forward_backward(backend, self.mlp, self.mlp)

    def time_forward(self, backend, variant, tokens):
        with common.no_grad(backend):
            common.sync(backend, self.mlp(self.x))

    def time_forward_backward(self, backend, variant, tokens):
        self.step(self.x)


class Router(Suite):
    """The DeepSeekMoE router alone on N tokens of width 256: sigmoid scores, bias, group-limited top-k and the
    normalized weights (seconds)."""

    params = [BACKENDS, [v for v in VARIANTS if v.startswith("deepseek")], TOKENS]
    param_names = ["backend", "variant", "tokens"]

    def setup(self, backend, variant, tokens):
        self.model, mlp = load_mlp(backend, variant)
        self.gate = mlp.gate
        shape = (1, tokens, 256) if backend == "mlx_lm" else (tokens, 256)  # ours and transformers' take (N, H)
        self.x = common.array(backend, shape, seed=1)

    def time_router(self, backend, variant, tokens):
        with common.no_grad(backend):
            common.sync(backend, *self.gate(self.x))
