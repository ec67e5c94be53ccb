"""Cross-entropy fused with the LM head, over chunks of tokens, in Triton; reference:
`reference.cross_entropy.linear_cross_entropy`.

The full (N, V) logits are never stored (the idea of Liger-Kernel's fused linear cross-entropy). For each chunk
of tokens: ``logits = hidden_chunk @ weight.T`` (torch matmul, in the inputs' dtype) goes into a fresh buffer;
a Triton program per token (per up to 16 tokens when V <= 2048) takes the logsumexp in float32 (online max and
sum over blocks of ``BLOCK_V`` <= 4096 columns), writes the token's loss, and overwrites the buffer with the
gradient of the loss with respect to the logits, ``(softmax - onehot(target)) * scale``; then
``d_hidden_chunk = grad @ weight`` and ``d_weight += grad.T @ hidden_chunk`` (summed in float32 across chunks).

For "mean" and "sum" every gradient is computed in the forward and the backward only scales it by the (scalar)
output gradient, out of place. For "none" the output gradient is per token and unknown in the forward, so the
forward computes losses only and the backward runs the same chunked pass again with it folded into ``scale``.

Semantics (those of `F.cross_entropy`): targets equal to ``ignore_index`` add no loss and no gradient;
``token_weights`` (N,) multiply each token's loss like class weights; "mean" divides by the number of non-ignored
tokens, or with weights by the sum of the non-ignored tokens' weights, so all-ignored targets give NaN (the
reference model's `masked_cross_entropy` wants 0 there: use "sum" and divide by ``max(count, 1)``). The loss is
float32; ``token_weights`` get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, check, empty

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
MAX_BLOCK_V = 4096


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, scale_ptr, loss_ptr, n, V, ignore_index, WRITE_GRAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_N tokens per program. logits (n, V) row-major, overwritten with its gradient when WRITE_GRAD;
    targets (n,) int64; scale (n,) float32, the gradient's factor; loss (n,) float32, unweighted, 0 if ignored.
    Rows past n repeat row n - 1 (its loads only; their stores are masked off)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < n
    rows = tl.minimum(rows, n - 1)
    ptr = logits_ptr + rows[:, None] * V
    cols = tl.arange(0, BLOCK_V)[None, :]
    x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=1)
    d = tl.sum(tl.exp(x - m[:, None]), axis=1)
    for start in range(BLOCK_V, V, BLOCK_V):
        x = tl.load(ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(d)
    target = tl.load(targets_ptr + rows)
    valid = target != ignore_index
    x_t = tl.load(logits_ptr + rows * V + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, lse - x_t, 0.0), mask=live)
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + rows), 0.0)[:, None]
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse[:, None]) - tl.where(start + cols == target[:, None], 1.0, 0.0)) * scale
            tl.store(ptr + start + cols, cast(g, logits_ptr.dtype.element_ty), mask=live[:, None] & mask)


def default_chunk_size(N: int, V: int, H: int) -> int:
    """Tokens per chunk so that a chunk's (chunk, V) logits hold about as many numbers as hidden's (N, H)."""
    return max(1, triton.cdiv(N, triton.cdiv(V, H)))


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check("hidden", hidden, ndim=2, dtypes=FLOATS)
    check("weight", weight, ndim=2, dtypes=hidden.dtype, shape=(None, hidden.shape[1]), device=hidden.device)
    check("targets", targets, dtypes=torch.int64, shape=(hidden.shape[0],), device=hidden.device)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int | None = None, grad_hidden: bool = True,
                          grad_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunked pass: per-token losses and, if asked, the gradients of ``sum(scale * loss)``.

    hidden (N, H), weight (V, H): one float dtype, contiguous; targets (N,) int64 in [0, V) or ``ignore_index``;
    scale (N,) float32 (ignored tokens may hold anything). Returns ``(loss, d_hidden, d_weight)``: loss (N,)
    float32, unweighted, 0 at ignored tokens; d_hidden (N, H) in hidden's dtype and d_weight (V, H) float32,
    each None when not asked for. Raises TypeError on a wrong dtype, ValueError on a wrong shape, device,
    layout, chunk_size or an out-of-range target (this check reads the targets on the host).
    """
    _check_inputs(hidden, weight, targets)
    (N, H), V, device = hidden.shape, weight.shape[0], hidden.device
    check("scale", scale, dtypes=torch.float32, shape=(N,), device=device)
    chunk = default_chunk_size(N, V, H) if chunk_size is None else chunk_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if V == 0:
        raise ValueError("weight: expected V >= 1 rows (the vocabulary)")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"targets: expected values in [0, {V}) or ignore_index={ignore_index}, "
                         f"got {targets[bad][0].item()}")
    loss = empty(N, dtype=torch.float32, device=device)
    d_hidden = empty(N, H, dtype=hidden.dtype, device=device) if grad_hidden else None
    d_weight = torch.zeros(V, H, dtype=torch.float32, device=device) if grad_weight else None
    write_grad = grad_hidden or grad_weight
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    block_n = max(1, min(16, MAX_BLOCK_V // block_v))  # several tokens per program when V is small
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        h = hidden[s:e]
        logits = h @ weight.T  # fresh (e - s, V) buffer: the kernel overwrites it with its gradient
        _cross_entropy_kernel[(triton.cdiv(e - s, block_n),)](logits, targets[s:e], scale[s:e], loss[s:e], e - s, V,
                                                              ignore_index, WRITE_GRAD=write_grad, BLOCK_N=block_n,
                                                              BLOCK_V=block_v)
        if grad_hidden:
            d_hidden[s:e] = logits @ weight  # under autocast the product is bf16: cast into d_hidden's dtype
        if grad_weight:
            d_weight += (logits.T @ h).float()
    return loss, d_hidden, d_weight


def _token_factors(targets, ignore_index, token_weights, N, device):
    """Per-token weight w (N,) float32: 0 at ignored tokens, else the token weight (1 without weights)."""
    valid = targets != ignore_index
    if token_weights is None:
        return valid.float()
    check("token_weights", token_weights, dtypes=(*FLOATS, torch.float64), shape=(N,), device=device,
          contiguous=False)
    return torch.where(valid, token_weights.float(), 0.0)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper. "mean"/"sum": saves d_hidden (N, H) and d_weight (V, H) computed in the forward;
    "none": saves hidden, weight, targets and the token factors and recomputes in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, token_weights, chunk_size, grad_enabled):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_inputs(hidden, weight, targets)
        w = _token_factors(targets, ignore_index, token_weights, hidden.shape[0], hidden.device)
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if reduction == "none":
            loss, _, _ = chunked_cross_entropy(hidden, weight, targets, w, ignore_index, chunk_size, False, False)
            ctx.save_for_backward(hidden, weight, targets, w)
            return loss * w
        denom = w.sum() if reduction == "mean" else None
        scale = w / denom if reduction == "mean" else w
        loss, dh, dw = chunked_cross_entropy(hidden, weight, targets, scale, ignore_index, chunk_size, need_h, need_w)
        ctx.save_for_backward(dh, dw)
        total = (loss * w).sum()
        return total / denom if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction == "none":
            hidden, weight, targets, w = ctx.saved_tensors
            scale = (w * grad_out.float()).contiguous()
            _, dh, dw = chunked_cross_entropy(hidden, weight, targets, scale, ctx.ignore_index, ctx.chunk_size,
                                              need_h, need_w)
        else:
            dh, dw = ctx.saved_tensors
            g = grad_out.float()
            dh = None if dh is None else dh * g  # out of place: the saved gradients stay as they are
            dw = None if dw is None else dw * g
        dh = None if dh is None else dh.to(ctx.dtypes[0])
        dw = None if dw is None else dw.to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", token_weights: torch.Tensor | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Differentiable fused LM head + cross-entropy, ``F.cross_entropy(hidden @ weight.T, targets, ...)``.

    hidden (N, H) float32/bf16/fp16 and weight (V, H) of the same dtype, contiguous; targets (N,) int64 in
    [0, V) or ``ignore_index``; token_weights (N,) float or None; chunk_size tokens per chunk (default
    `default_chunk_size`). Returns a float32 scalar ("mean", "sum") or (N,) ("none"). Gradients flow to hidden
    and weight (in their dtypes). Raises TypeError / ValueError on bad inputs (see `chunked_cross_entropy`).
    """
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction, token_weights,
                                            chunk_size, torch.is_grad_enabled())  # no gradients under no_grad


__all__ = ["linear_cross_entropy", "chunked_cross_entropy", "default_chunk_size", "LinearCrossEntropyFunction"]
