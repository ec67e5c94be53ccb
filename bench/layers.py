"""Elementwise and row-wise ops: RMSNorm, RoPE, SwiGLU and the LM head with cross-entropy, on N tokens.

Shapes, float32, for N in `TOKENS`:

- ``rms_norm``: x (N, 1024) with a gain (1024,), eps 1e-6;
- ``rope``: interleaved RoPE (DeepSeek-V3's MLA pairing) of queries (1, 8, N, 64) and keys (1, 1, N, 64) at
  positions 0..N-1;
- ``swiglu``: ``silu(gate) * up`` on two (N, 1024) inputs;
- ``cross_entropy``: hidden (N, 256) times an LM head (4096, 256), then the mean cross-entropy over N targets (the
  cuda backend's kernel fuses the two and never stores the logits).

`Op` times the forward and forward+backward (gradients of every float input, and of the RMSNorm gain). Seconds per
call. Per backend: reference = `reference` functions; cuda = `kernels.triton`; mlx = `runtime_mlx.kernels` /
`runtime_mlx.rope.RoPE`; transformers = DeepseekV3RMSNorm, ``apply_rotary_pos_emb_interleave``, ``ACT2FN['silu']``,
``loss_utils.fixed_cross_entropy``; mlx_lm = ``nn.RMSNorm``'s ``mx.fast.rms_norm``, ``nn.RoPE``'s ``mx.fast.rope``,
``activations.swiglu``, ``nn.losses.cross_entropy``.
"""

from __future__ import annotations

from . import common
from .common import BACKENDS, Suite

OPS = ["rms_norm", "rope", "swiglu", "cross_entropy"]
TOKENS = [512, 2048]
WIDTH, HEADS, HEAD_DIM, HIDDEN, VOCAB, EPS = 1024, 8, 64, 256, 4096, 1e-6


def inputs(backend: str, op: str, n: int) -> list:
    """The op's random inputs for ``backend`` (float ones require grad in torch)."""
    arr = common.array
    if op == "rms_norm":
        xs = [arr(backend, (n, WIDTH), 1), arr(backend, (WIDTH,), 2) * 0.1 + 1.0]
    elif op == "rope":
        xs = [arr(backend, (1, HEADS, n, HEAD_DIM), 1), arr(backend, (1, 1, n, HEAD_DIM), 2)]
    elif op == "swiglu":
        xs = [arr(backend, (n, WIDTH), 1), arr(backend, (n, WIDTH), 2)]
    else:
        xs = [arr(backend, (n, HIDDEN), 1), arr(backend, (VOCAB, HIDDEN), 2) * HIDDEN**-0.5,
              arr(backend, (n,), 3, kind="tokens", high=VOCAB)]
    if backend not in common.MLX_BACKENDS:
        for x in xs:
            if x.is_floating_point():
                x.requires_grad_(True)
    return xs


def op_function(backend: str, op: str, n: int):
    """(fn, module): ``fn(*inputs(backend, op, n))`` computes the op with ``backend``'s implementation; ``module``
    is the nn.Module that holds parameters of its own (transformers' RMSNorm), else None."""
    common.require(backend)
    if backend == "reference":
        return _reference(op, n), None
    if backend == "cuda":
        return _cuda(op, n), None
    if backend == "transformers":
        return _transformers(op, n)
    if backend == "mlx":
        return _mlx(op, n), None
    return _mlx_lm(op, n), None


def _rope_angles(n: int):
    """cos, sin (n, HEAD_DIM/2) of the reference's RotaryEmbedding on `torch_device`."""
    from reference.rope import RotaryEmbedding

    return RotaryEmbedding(HEAD_DIM)(n, 0, common.torch_device())


def _reference(op: str, n: int):
    from reference.cross_entropy import linear_cross_entropy
    from reference.rms_norm import rms_norm
    from reference.rope import apply_rope
    from reference.swiglu import swiglu

    if op == "rope":
        cos, sin = _rope_angles(n)
        return lambda q, k: (apply_rope(q, cos, sin, True), apply_rope(k, cos, sin, True))
    return {
        "rms_norm": lambda x, w: rms_norm(x, w, EPS),
        "swiglu": swiglu,
        "cross_entropy": lambda h, w, t: linear_cross_entropy(h, w, t),  # the fused head the model trains with
    }[op]


def _cuda(op: str, n: int):
    triton_op = common.import_or_skip(f"kernels.triton.{op}")
    if op == "rope":
        cos, sin = _rope_angles(n)
        return lambda q, k: (triton_op.rope(q, cos, sin, True), triton_op.rope(k, cos, sin, True))
    return {
        "rms_norm": lambda x, w: triton_op.rms_norm(x, w, EPS),
        "swiglu": lambda g, u: triton_op.swiglu(g, u),
        "cross_entropy": lambda h, w, t: triton_op.linear_cross_entropy(h, w, t),
    }[op]


def _transformers(op: str, n: int):
    import torch
    from transformers.activations import ACT2FN
    from transformers.loss.loss_utils import fixed_cross_entropy
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    if op == "rms_norm":
        norm = hf.DeepseekV3RMSNorm(WIDTH, EPS).to(common.torch_device())
        return (lambda x, w: norm(x)), norm
    if op == "rope":
        cfg = hf.DeepseekV3Config(qk_rope_head_dim=HEAD_DIM, max_position_embeddings=max(n, 4096))
        dev = common.torch_device()
        rotary = hf.DeepseekV3RotaryEmbedding(cfg).to(dev)
        cos, sin = rotary(torch.zeros(1, device=dev), torch.arange(n, device=dev)[None])
        return (lambda q, k: hf.apply_rotary_pos_emb_interleave(q, k, cos, sin)), None
    if op == "swiglu":
        act = ACT2FN["silu"]
        return (lambda g, u: act(g) * u), None
    return (lambda h, w, t: fixed_cross_entropy(h @ w.T, t)), None


def _mlx(op: str, n: int):
    kernels = common.import_or_skip("runtime_mlx.kernels")
    if op == "rope":
        rope = common.import_or_skip("runtime_mlx.rope", "RoPE").RoPE(HEAD_DIM)
        return lambda q, k: (rope(q, 0, True), rope(k, 0, True))
    if op == "cross_entropy":
        ce = common.import_or_skip("runtime_mlx.model", "masked_cross_entropy").masked_cross_entropy
        return lambda h, w, t: ce(h @ w.T, t)
    return {
        "rms_norm": lambda x, w: kernels.rms_norm(x, w, EPS),
        "swiglu": kernels.swiglu,
    }[op]


def _mlx_lm(op: str, n: int):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.activations import swiglu

    if op == "rope":
        rope = nn.RoPE(HEAD_DIM, traditional=True, base=10000.0)
        return lambda q, k: (rope(q), rope(k))
    return {
        "rms_norm": lambda x, w: mx.fast.rms_norm(x, w, EPS),
        "swiglu": swiglu,
        "cross_entropy": lambda h, w, t: nn.losses.cross_entropy(h @ w.T, t).mean(),
    }[op]


class Op(Suite):
    """One op on N tokens: forward, and forward+backward (seconds)."""

    params = [BACKENDS, OPS, TOKENS]
    param_names = ["backend", "op", "tokens"]

    def setup(self, backend, op, tokens):
        self.fn, module = op_function(backend, op, tokens)
        self.inputs = inputs(backend, op, tokens)
        self.step = common.forward_backward(backend, self.fn, module)

    def time_forward(self, backend, op, tokens):
        with common.no_grad(backend):
            out = self.fn(*self.inputs)
            common.sync(backend, *(out if isinstance(out, tuple) else (out,)))

    def time_forward_backward(self, backend, op, tokens):
        self.step(*self.inputs)
