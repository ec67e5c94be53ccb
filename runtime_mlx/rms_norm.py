"""RMSNorm (Zhang & Sennrich 2019) in MLX; the op itself is `runtime_mlx.kernels.rms_norm`."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2, -1) + eps)`` over the last axis; ``weight`` (D,) starts at ones.

    Input (..., D) of any float dtype; output (..., D) in ``x.dtype`` (same as `reference.rms_norm.RMSNorm`).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self.weight, self.eps)
