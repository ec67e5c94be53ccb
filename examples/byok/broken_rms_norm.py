"""A deliberately broken RMSNorm: it accumulates the sum of squares in the input's dtype.

It reads the row eight elements at a time, as a vectorized kernel does, and keeps the running sum in ``x.dtype``.
In float32 that is harmless. In bfloat16 (8 significant bits) the sum stalls once it is large: past 4,096 the
spacing of bfloat16 numbers is 32, so adding a chunk worth about 8 rounds to nothing. Rows of 100 elements pass;
DeepSeek-V3's hidden size of 7,168 does not. ``dsfs check rms_norm --impl examples/byok/broken_rms_norm.py:rms_norm``
shows it; `my_rms_norm.py` is the fix (a float32 accumulator).
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x**2) + eps) * weight`` over the last dim of ``x`` (..., H); returns ``x.dtype``."""
    acc = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)  # BUG: the accumulator is bfloat16 for bf16 x
    for chunk in x.split(8, dim=-1):
        acc = acc + chunk.pow(2).sum(-1)
    rstd = torch.rsqrt(acc / x.shape[-1] + eps)
    return x * rstd[..., None] * weight
