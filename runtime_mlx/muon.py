"""Muon in MLX: the Muon-group update of `reference.muon.Muon` (see its docstring and the papers there).

``mlx.optimizers.Muon`` differs from it in three ways that matter here: its weight decay is added to the gradient
(L2, not decoupled), it has no update-RMS scaling (Moonlight's ``0.2 * sqrt(max(A, B))``, which lets one
learning rate serve Muon and AdamW), and it flattens a stack of expert matrices (E, A, B) into one (E, A*B)
matrix instead of orthogonalizing each expert. The AdamW groups of the reference optimizer are MLX's own
``optim.AdamW`` (`runtime_mlx.train.make_mlx_optimizer` puts the two side by side).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from reference.muon import MATCH_RMS_ADAMW, NS_COEFFICIENTS


def zeropower_via_newtonschulz5(g: mx.array, steps: int = 5, eps: float = 1e-7) -> mx.array:
    """`reference.muon.zeropower_via_newtonschulz5` in MLX: the trailing two dimensions of ``g`` (..., A, B)
    orthogonalized per matrix, float32 out. Raises ``ValueError`` for ``g.ndim < 2`` or ``steps < 1``."""
    if g.ndim < 2:
        raise ValueError(f"Newton-Schulz orthogonalization needs a matrix (..., A, B), got shape {tuple(g.shape)}")
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    a, b, c = NS_COEFFICIENTS
    x = g.astype(mx.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.swapaxes(-1, -2)
    norm = mx.sqrt(mx.sum(x * x, axis=(-2, -1), keepdims=True))
    x = x / mx.maximum(norm, eps)
    for _ in range(steps):
        gram = x @ x.swapaxes(-1, -2)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.swapaxes(-1, -2) if tall else x


class Muon(optim.Optimizer):
    """The Muon group update of `reference.muon.Muon` for MLX parameters of shape (..., A, B): EMA momentum
    ``momentum_buffer``, Nesterov, decoupled weight decay, Newton-Schulz per matrix, update scaled by
    ``0.2 * sqrt(max(A, B))``. ``learning_rate``: float or MLX schedule. Raises ``ValueError`` for a
    hyperparameter out of range, or (at the first update) a parameter with fewer than 2 dimensions."""

    def __init__(self, learning_rate, momentum: float = 0.95, weight_decay: float = 0.1, nesterov: bool = True,
                 ns_steps: int = 5):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum}: expected in [0, 1)")
        if weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"weight_decay={weight_decay}, ns_steps={ns_steps}: expected >= 0 and >= 1")
        self._maybe_schedule("learning_rate", learning_rate)
        self.momentum, self.weight_decay, self.nesterov, self.ns_steps = momentum, weight_decay, nesterov, ns_steps

    def init_single(self, parameter: mx.array, state: dict) -> None:
        if parameter.ndim < 2:
            raise ValueError(f"Muon got a parameter of shape {tuple(parameter.shape)}: it updates matrices "
                             "(..., A, B); vectors (norms, biases) belong with AdamW")
        state["momentum_buffer"] = mx.zeros_like(parameter)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        mu = self.momentum
        buf = state["momentum_buffer"] + (1 - mu) * (gradient - state["momentum_buffer"])  # lerp, as torch's
        state["momentum_buffer"] = buf
        update = gradient + mu * (buf - gradient) if self.nesterov else buf
        lr = self.learning_rate.astype(parameter.dtype)
        scale = MATCH_RMS_ADAMW * math.sqrt(max(parameter.shape[-2], parameter.shape[-1]))
        o = zeropower_via_newtonschulz5(update, self.ns_steps).astype(parameter.dtype)
        return parameter * (1 - lr * self.weight_decay) - (lr * scale) * o
