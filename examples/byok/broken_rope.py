"""A deliberately broken RoPE candidate, to see what `dsfs check` / `reference.testing.run` report for it.

``rope(x, cos, sin, interleaved, offset=0)`` has the op's signature but ignores ``interleaved``: it always pairs
``(x[i], x[i + D/2])`` (NeoX, right for the V3.2 indexer) and never ``(x[2i], x[2i+1])`` (DeepSeek-V3's MLA,
``interleaved=True``). Everything else is right (positions from ``offset``, the output in ``x``'s dtype, the
gradient through autograd), so the battery's interleaved samples fail (all but the empty one), each with its ``y``
and ``dx`` rows far above the bound (relative errors of 0.4 to 1.2), and the NeoX ones pass:

    dsfs check rope --impl examples/byok/broken_rope.py:rope
"""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int = 0) -> torch.Tensor:
    t, half = x.shape[-2], x.shape[-1] // 2
    c = cos[offset:offset + t].to(torch.float32)
    s = sin[offset:offset + t].to(torch.float32)
    x1, x2 = x[..., :half].float(), x[..., half:].float()  # BUG: the NeoX halves, whatever `interleaved` says
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
