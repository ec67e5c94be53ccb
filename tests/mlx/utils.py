"""Shared helpers of the runtime_mlx and Metal emulation tests: the one `to_mx` / `to_torch` conversion, and the
same weights in the reference and the MLX model."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

from reference import Model as ReferenceModel
from runtime_mlx import Model
from runtime_mlx.checkpoint import load_torch_state_dict, load_weights
from tests.reference_utils import randomize_


def to_mx(t: torch.Tensor) -> mx.array:
    """A torch tensor as an mx array of the same dtype (bfloat16 through float32), except float64, which MLX's
    GPU lacks, becomes float32. The one conversion every MLX test uses."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    a = t.numpy()
    return mx.array(a.astype(np.float32) if a.dtype == np.float64 else a)


def to_torch(a: mx.array) -> torch.Tensor:
    """An mx array as a torch tensor of the same dtype (bfloat16 through float32), for `tests.tolerance` (which
    compares in float64) and exact comparisons of indices and bits."""
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


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
