"""SwiGLU activation (Shazeer 2020, "GLU Variants Improve Transformer") forward and backward in Triton;
reference: `reference.swiglu.swiglu`.

``y = silu(g) * u`` with ``silu(g) = g * sigmoid(g)``, elementwise over flat blocks of ``BLOCK`` elements. As in
Liger-Kernel, the backward recomputes ``sigmoid(g)`` from the saved inputs instead of keeping the activation:

    du = dy * silu(g)        dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

Math is float32 whatever the input dtype; outputs are in the inputs' dtype, written to new tensors (the
saved inputs are never overwritten).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, check, empty

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """Flat g, u, y (n,); one BLOCK-element slice per program."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, cast(g * tl.sigmoid(g) * u, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    """Flat dy, g, u, dg, du (n,); one BLOCK-element slice per program."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(du_ptr + off, cast(dy * g * sig, du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + off, cast(dy * u * sig * (1.0 + g * (1.0 - sig)), dg_ptr.dtype.element_ty), mask=mask)


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    check("gate", gate, dtypes=FLOATS)
    check("up", up, dtypes=gate.dtype, shape=tuple(gate.shape), device=gate.device)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel. gate, up: (..., I) float32/bfloat16/float16, one dtype, one shape, contiguous.
    Returns ``silu(gate) * up`` (..., I) in that dtype. Raises TypeError on a wrong dtype, ValueError on a
    shape, device or layout mismatch."""
    _check_pair(gate, up)
    y = empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. dy, gate, up: same shape and dtype, contiguous. Returns ``(d_gate, d_up)``
    in that dtype. Raises TypeError / ValueError like `swiglu_fwd`."""
    _check_pair(gate, up)
    check("dy", dy, dtypes=gate.dtype, shape=tuple(gate.shape), device=gate.device)
    dg = empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dg, du, n, BLOCK=BLOCK)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up, recomputes the activation in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        y = swiglu_fwd(gate, up)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Differentiable ``silu(gate) * up``: gate, up (..., I) of one float dtype and shape, contiguous; returns
    (..., I) in that dtype; gradients flow to both. Raises TypeError / ValueError on bad inputs."""
    return SwiGLUFunction.apply(gate, up)


__all__ = ["swiglu", "swiglu_fwd", "swiglu_bwd", "SwiGLUFunction"]
