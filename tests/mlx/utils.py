"""Shared helpers of the runtime_mlx and Metal emulation tests: the same weights in the reference and the MLX
model; `to_mx` / `to_torch` are `reference.testing`'s."""

from __future__ import annotations

import mlx.core as mx  # noqa: F401  (re-exported for the MLX tests)
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from reference import Model as ReferenceModel
from reference.testing import to_mx, to_torch  # noqa: F401  (the one conversion, re-exported for the MLX tests)
from runtime_mlx import Model, kernels
from runtime_mlx.checkpoint import load_torch_state_dict, load_weights
from runtime_mlx.rope import RoPE
from tests.reference_utils import randomize_

METAL = kernels.metal_available()
needs_metal = pytest.mark.skipif(not METAL, reason="Metal kernels need Apple Silicon (no Metal device)")
PATHS = ["mlx", pytest.param("metal", marks=needs_metal)]
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.5}


def copy_weights(mlx_module, torch_module) -> None:
    """Set every parameter of an MLX module (a whole model, or a layer) from the torch module of the same
    names (its ``state_dict``)."""
    if isinstance(mlx_module, Model):
        load_torch_state_dict(mlx_module, torch_module.state_dict())
    else:
        load_weights(mlx_module, {k: to_mx(v) for k, v in torch_module.state_dict().items()})


def model_pair(config, router_bias: float = 0.05, train: bool = False) -> tuple[ReferenceModel, Model]:
    """The reference model with O(1) random weights and an MLX model holding the same weights, both in eval
    (or train) mode."""
    ref = randomize_(ReferenceModel(config), router_bias=router_bias).train(train)
    model = Model(config)
    copy_weights(model, ref)
    model.train(train)
    return ref, model


def grads_of(module, fn):
    """Parameter gradients (flat name -> array) of the scalar ``fn()`` with respect to an MLX module."""
    return dict(tree_flatten(nn.value_and_grad(module, fn)()[1]))


def layer_pair(ref_cls, cls, config):
    """A reference attention layer (``ref_cls``, random weights, eval mode) and the MLX layer ``cls`` of the same
    ``config`` with the same weights: ``(ref, layer)``."""
    ref = randomize_(ref_cls(config, 0)).eval()
    layer = cls(config, 0, RoPE(config.rope_dim, config.rope_theta, config.rope_scaling))
    copy_weights(layer, ref)
    return ref, layer
