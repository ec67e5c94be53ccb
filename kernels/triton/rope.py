"""Rotary position embedding (RoPE, Su et al. 2021) forward and backward in Triton; reference:
`reference.rope.apply_rope`.

Each pair ``(x1, x2)`` of the last dimension turns by its angle: ``(x1 c - x2 s, x2 c + x1 s)``. Pairs are
``(x[2i], x[2i+1])`` when ``interleaved`` (DeepSeek-V3 MLA) and ``(x[i], x[i + D/2])`` otherwise (NeoX, the
V3.2 indexer). The map is linear in ``x`` and its transpose is the same map with ``s`` negated, so one kernel
serves both directions (``BACKWARD`` flag). ``cos``/``sin`` are inputs (YaRN's amplitude already folded in, as
`reference.rope.RotaryEmbedding` gives them) and get no gradient.

Positions: row ``t`` of ``x`` uses row ``offset + t`` of ``cos``/``sin``, so a decode step passes the whole
table and its absolute position instead of slicing (``offset=0`` with an already-sliced table is the same).
Math is float32; the output is ``x.dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, check, empty

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, ROWS, T, HALF, offset, INTERLEAVED: tl.constexpr,
                 BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program j: rows [j*BLOCK_R, (j+1)*BLOCK_R) of x, y viewed as (ROWS, 2*HALF) row-major, where row n is
    position t = n % T; cos, sin (P, HALF) row-major, row offset + t used; BLOCK_P = next_pow2(HALF)."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_P)
    mask = (n < ROWS)[:, None] & (i < HALF)[None, :]
    cs = (n % T + offset)[:, None] * HALF + i[None, :]
    c = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    if INTERLEAVED:
        o1 = 2 * i
        o2 = 2 * i + 1
    else:
        o1 = i
        o2 = i + HALF
    row = n[:, None] * (2 * HALF)
    x1 = tl.load(x_ptr + row + o1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + row + o2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row + o1[None, :], cast(x1 * c - x2 * s, y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + row + o2[None, :], cast(x2 * c + x1 * s, y_ptr.dtype.element_ty), mask=mask)


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int = 0,
                backward: bool = False) -> torch.Tensor:
    """Rotate ``x`` by the angles of rows ``offset .. offset+T-1`` of ``cos``/``sin`` (by minus them when
    ``backward``, which is the gradient of the forward).

    x: (..., T, D) float32/bfloat16/float16, contiguous, D even, rank >= 2; cos, sin: (P, D/2) with
    P >= offset + T, one float dtype for both (any of the three), contiguous, same device. Returns (..., T, D)
    in ``x.dtype``. Raises TypeError on a wrong dtype, ValueError on a wrong shape, offset, device or layout.
    """
    check("x", x, dtypes=FLOATS)
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape (..., T, D) with D even, got {tuple(x.shape)}")
    T, D = x.shape[-2:]
    check("cos", cos, dtypes=FLOATS, shape=(None, D // 2), device=x.device)
    check("sin", sin, dtypes=cos.dtype, shape=tuple(cos.shape), device=x.device)
    if not isinstance(offset, int) or offset < 0 or offset + T > cos.shape[0]:
        raise ValueError(f"offset: need an int with 0 <= offset and offset + T <= {cos.shape[0]} (cos/sin rows), "
                         f"got offset={offset!r}, T={T}")
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    rows = x.numel() // D
    BLOCK_P = triton.next_power_of_2(D // 2)
    BLOCK_R = max(1, min(triton.next_power_of_2(rows), 2048 // BLOCK_P))  # tiles of about 2048 pairs
    _rope_kernel[(triton.cdiv(rows, BLOCK_R),)](x, cos, sin, y, rows, T, D // 2, offset, INTERLEAVED=bool(interleaved),
                                                 BACKWARD=bool(backward), BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P)
    return y


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper: saves cos and sin; the gradient of x is the inverse-angle rotation of the output's."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, offset):
        y = rope_launch(x, cos, sin, interleaved, offset)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.offset = interleaved, offset
        return y

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dx = rope_launch(dy.contiguous(), cos, sin, ctx.interleaved, ctx.offset, backward=True)
        return dx, None, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, offset: int = 0) -> torch.Tensor:
    """Differentiable RoPE: ``apply_rope(x, cos[offset:offset+T], sin[offset:offset+T], interleaved)``.

    x: (..., T, D) contiguous (any number of heads in the leading dims, 1 included); cos, sin: (P, D/2),
    P >= offset + T. Returns (..., T, D) in ``x.dtype``; the gradient flows to ``x`` only. Raises
    TypeError / ValueError on bad inputs (see `rope_launch`).
    """
    return RopeFunction.apply(x, cos, sin, interleaved, offset)


__all__ = ["rope", "rope_launch", "RopeFunction"]
