"""RMSNorm (Zhang & Sennrich 2019) forward and backward in Triton; reference: `reference.rms_norm.rms_norm`.

``y = weight * x * rstd`` with ``rstd = 1 / sqrt(mean(x**2, -1) + eps)``, one program per row of ``x`` viewed as
(M, H); every sum is taken in float32 whatever the input dtype. The backward (Liger-Kernel's layout) recomputes
``xhat = x * rstd`` from the saved ``rstd`` (M,) and gives

    dx = rstd * (w * dy - xhat * mean(w * dy * xhat, -1))        dw = sum_rows(dy * xhat)

where ``dw`` is summed in float32 per program over a strided set of rows into a (programs, H) buffer, then
reduced over programs with torch.

Differences from the reference: the weight multiplies in float32 before the single rounding to ``x.dtype``
(the reference rounds ``x * rstd`` to ``x.dtype`` first), and the output is always ``x.dtype`` (the reference
promotes to the weight's dtype when the two differ). Outputs are cast by `kernels.triton.utils.cast`, which
rounds to nearest under Triton's interpreter too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, check, empty

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK_H: tl.constexpr):
    """One row per program: x, y (M, H) row-major; w (H,); rstd (M,) float32; BLOCK_H = next_pow2(H)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * H + cols, cast(x * rstd * w, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, H, BLOCK_H: tl.constexpr):
    """Program p handles rows p, p + P, ... (P programs); writes dx (M, H) and its float32 partial dw (P, H)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for row in range(pid, M, step):
        off = tl.cast(row, tl.int64) * H + cols
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        wdy = w * dy
        c = tl.sum(wdy * xhat, axis=0) / H
        tl.store(dx_ptr + off, cast((wdy - xhat * c) * rstd, dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * H + cols, dw, mask=mask)


def _num_programs(device: torch.device, rows: int) -> int:
    """Programs for a row-strided reduction: a few per SM on a GPU, 4 under the interpreter; at most ``rows``."""
    if device.type == "cuda":
        n = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n = 4
    return max(1, min(rows, n))


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> int:
    check("x", x, dtypes=FLOATS)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., H) with H >= 1, got {tuple(x.shape)}")
    H = x.shape[-1]
    check("weight", weight, dtypes=FLOATS, shape=(H,), device=x.device)
    return H


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    x: (..., H) float32/bfloat16/float16, contiguous; weight: (H,) any of those dtypes, same device.
    Returns ``(y, rstd)``: y (..., H) in ``x.dtype``; rstd (prod(...),) float32, kept for the backward.
    Raises TypeError on a wrong dtype, ValueError on a wrong shape, device or layout.
    """
    H = _check_inputs(x, weight)
    M = x.numel() // H
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = empty(M, dtype=torch.float32, device=x.device)
    if M:
        _rms_norm_fwd_kernel[(M,)](x, weight, y, rstd, H, float(eps), BLOCK_H=triton.next_power_of_2(H))
    return y, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel.

    dy, x: (..., H) of ``x.dtype``, contiguous; weight (H,); rstd (prod(...),) float32 from `rms_norm_fwd`.
    Returns ``(dx, dw)``: dx (..., H) in ``x.dtype``, dw (H,) in ``weight.dtype`` (summed in float32).
    Raises TypeError / ValueError like `rms_norm_fwd`.
    """
    H = _check_inputs(x, weight)
    M = x.numel() // H
    check("dy", dy, dtypes=x.dtype, shape=tuple(x.shape), device=x.device)
    check("rstd", rstd, dtypes=torch.float32, shape=(M,), device=x.device)
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    if M == 0:
        return dx, torch.zeros_like(weight)
    P = _num_programs(x.device, M)
    dw_part = empty(P, H, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(P,)](dy, x, weight, rstd, dx, dw_part, M, H, BLOCK_H=triton.next_power_of_2(H))
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and rstd (M,) float32; gradients for x and weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy.contiguous(), x, weight, rstd)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable RMSNorm: x (..., H) float32/bf16/fp16 contiguous, weight (H,) -> (..., H) in ``x.dtype``.

    Gradients flow to ``x`` and ``weight`` (dw in ``weight.dtype``). Raises TypeError / ValueError on bad inputs
    (see `rms_norm_fwd`); CPU tensors are accepted only under ``TRITON_INTERPRET=1``.
    """
    return RMSNormFunction.apply(x, weight, eps)


__all__ = ["rms_norm", "rms_norm_fwd", "rms_norm_bwd", "RMSNormFunction"]
