"""RMSNorm (Zhang & Sennrich 2019), as used throughout DeepSeek-V3."""

from __future__ import annotations

import torch
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast to float32 when narrower (bf16/fp16); float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * x / sqrt(mean(x**2, -1) + eps)``, computed in at least float32 and cast back to ``x.dtype``.

    Shapes: ``x`` (..., D), ``weight`` (D,); returns (..., D) in ``x.dtype`` (as transformers'
    DeepseekV3RMSNorm, the weight multiplies after the cast back).
    """
    xf = at_least_fp32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain ``weight`` (D,), initialised to ones."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
