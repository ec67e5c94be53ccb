"""runtime_mlx RoPE (mx.fast.rope: interleaved, NeoX, YaRN, linear and llama3 scaling, offsets) against the
reference."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch

from reference.rope import RotaryEmbedding, apply_rope
from reference.testing import assert_close
from runtime_mlx.rope import RoPE
from tests.mlx.utils import YARN, to_mx, to_torch

LINEAR = {"rope_type": "linear", "factor": 3.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("scaling", [None, YARN, LINEAR, LLAMA3], ids=["plain", "yarn", "linear", "llama3"])
@pytest.mark.parametrize("offset", [0, 37])
def test_rope(interleaved, scaling, offset):
    """``mx.fast.rope`` (traditional = interleaved pairs, freqs = 1 / inv_freq of every scaling, YaRN amplitude) equals
    `reference.rope.apply_rope`, and so does its gradient; a wider input keeps its tail (the indexer)."""
    dim, t = 16, 7
    rot = RotaryEmbedding(dim, 10000.0, scaling)
    cos, sin = rot(t, offset)
    x = torch.randn(2, 3, t, dim + 8, requires_grad=True)
    ref = torch.cat((apply_rope(x[..., :dim], cos, sin, interleaved), x[..., dim:]), -1)
    (ref * torch.linspace(-1, 1, dim + 8)).sum().backward()
    rope = RoPE(dim, 10000.0, scaling)
    out = rope(to_mx(x), offset, traditional=interleaved)
    assert_close(to_torch(out), ref, what="rope")
    w = mx.linspace(-1, 1, dim + 8)
    dx = mx.grad(lambda a: (rope(a, offset, traditional=interleaved) * w).sum())(to_mx(x))
    assert_close(to_torch(dx), x.grad, what="rope dx")
