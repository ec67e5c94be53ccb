"""Fine-grained FP8 (e4m3) quantization and the block-scaled GEMM, in plain PyTorch.

Source: DeepSeek-V3 technical report (arXiv 2412.19437), section 3.3 "FP8 training", fine-grained
quantization: activations are scaled per 1x128 tile, weights per 128x128 block, and partial products are
promoted to an fp32 accumulator with the scales applied per K-block. The semantics follow the official
``inference/kernel.py`` (``act_quant``, ``weight_dequant``, ``fp8_gemm``):

- values are ``torch.float8_e4m3fn`` (largest finite value 448); scales are fp32 ``s = amax / 448`` and
  dequantization is ``x = y * s`` (the checkpoints call the weight scale ``weight_scale_inv``);
- amax is clamped to at least ``AMAX_MIN = 1e-4`` (as in the later official kernel), so an all-zero tile
  gets ``s = 1e-4 / 448`` and quantizes to zeros instead of 0/0 = NaN. A tile whose amax is below 1e-4 is
  therefore scaled less than all the way up to 448 and keeps fewer significant bits;
- ``x / s`` is clamped to +-448 before the cast (torch's cast saturates on CPU; not every backend does);
- unlike the official kernels, sizes need not be multiples of the block: the last tile/block may be
  partial, and its amax is taken over its valid elements only. NaN inputs propagate to the outputs.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4

__all__ = ["FP8_DTYPE", "FP8_MAX", "AMAX_MIN", "act_quant", "act_dequant", "weight_quant", "weight_dequant",
           "fp8_gemm"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_float(name: str, t, allow_fp8: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == FP8_DTYPE and not allow_fp8:
        raise TypeError(f"{name} must be a floating tensor to quantize, got an already-quantized {t.dtype}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_dtype(name: str, t, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _quant_tiles(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (..., T, B) fp32 tiles, zero-padded -> (fp8 values, fp32 scales (..., T))."""
    amax = t.abs().amax(dim=-1).clamp(min=AMAX_MIN)
    s = amax / FP8_MAX
    y = (t / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return y, s


def act_quant(x: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 e4m3 per 1 x ``block_size`` tile along the last dimension.

    x: (..., K) floating (any float dtype; computed in fp32), rank >= 1, K >= 1 (K need not be a multiple
    of ``block_size``). Returns ``(y, s)``: y (..., K) ``torch.float8_e4m3fn`` with y = clamp(x / s, +-448);
    s (..., ceil(K / block_size)) float32, s = max(amax_tile, 1e-4) / 448, in units of x per fp8 unit.
    Raises TypeError if x is not a floating tensor (or is already fp8), ValueError on rank 0, K = 0 or a
    bad block_size. Source: arXiv 2412.19437 sec. 3.3; official inference/kernel.py ``act_quant``.
    """
    _check_float("x", x)
    _check_block(block_size)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., K) with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    kb = _cdiv(K, block_size)
    xp = torch.nn.functional.pad(x.float(), (0, kb * block_size - K))
    y, s = _quant_tiles(xp.reshape(*x.shape[:-1], kb, block_size))
    return y.reshape(xp.shape)[..., :K].contiguous(), s


def act_dequant(y: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant``: x = y * s per 1 x ``block_size`` tile.

    y: (..., K) ``torch.float8_e4m3fn``; s: (..., ceil(K / block_size)) float32. Returns (..., K) in
    ``dtype`` (computed in fp32). Raises TypeError on wrong dtypes, ValueError on mismatched shapes.
    Source: arXiv 2412.19437 sec. 3.3; official inference/kernel.py (the scales of ``act_quant``).
    """
    _check_dtype("y", y, FP8_DTYPE)
    _check_dtype("s", s, torch.float32)
    _check_block(block_size)
    if y.dim() < 1:
        raise ValueError(f"y must have shape (..., K), got {tuple(y.shape)}")
    _check_shape("s", s, (*y.shape[:-1], _cdiv(y.shape[-1], block_size)))
    idx = torch.arange(y.shape[-1], device=y.device) // block_size
    return (y.float() * s[..., idx]).to(dtype)


def weight_quant(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix to FP8 e4m3 per ``block_size`` x ``block_size`` block.

    w: (N, K) floating (computed in fp32); edge blocks may be partial. Returns ``(w_fp8, scale_inv)``:
    w_fp8 (N, K) ``torch.float8_e4m3fn``; scale_inv (ceil(N / bs), ceil(K / bs)) float32 =
    max(amax_block, 1e-4) / 448, the ``weight_scale_inv`` of DeepSeek-V3 checkpoints.
    Raises TypeError if w is not a floating tensor, ValueError if it is not 2-D and non-empty.
    Source: arXiv 2412.19437 sec. 3.3; the inverse of official inference/kernel.py ``weight_dequant``.
    """
    _check_float("w", w)
    _check_block(block_size)
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D (N, K) tensor, got shape {tuple(w.shape)}")
    N, K = w.shape
    nb, kb = _cdiv(N, block_size), _cdiv(K, block_size)
    wp = torch.nn.functional.pad(w.float(), (0, kb * block_size - K, 0, nb * block_size - N))
    tiles = wp.reshape(nb, block_size, kb, block_size).transpose(1, 2).reshape(nb, kb, -1)
    y, s = _quant_tiles(tiles)
    y = y.reshape(nb, kb, block_size, block_size).transpose(1, 2).reshape(wp.shape)
    return y[:N, :K].contiguous(), s


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize block-scaled FP8 weights: w[n, k] = w_fp8[n, k] * scale_inv[n // bs, k // bs].

    w_fp8: (N, K) ``torch.float8_e4m3fn``; scale_inv: (ceil(N / bs), ceil(K / bs)) float32 (edge blocks
    may be partial, as in DeepSeek-V3 Hugging Face checkpoints and mlx_lm's deepseek_v3 ``sanitize``).
    Returns (N, K) in ``dtype`` (computed in fp32). Raises TypeError on wrong dtypes, ValueError on a
    wrong rank or a scale_inv shape that does not match. Source: official inference/kernel.py
    ``weight_dequant``; arXiv 2412.19437 sec. 3.3.
    """
    _check_dtype("w_fp8", w_fp8, FP8_DTYPE)
    _check_dtype("scale_inv", scale_inv, torch.float32)
    _check_block(block_size)
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be 2-D (N, K), got shape {tuple(w_fp8.shape)}")
    N, K = w_fp8.shape
    _check_shape("scale_inv", scale_inv, (_cdiv(N, block_size), _cdiv(K, block_size)))
    s = scale_inv.repeat_interleave(block_size, 0)[:N].repeat_interleave(block_size, 1)[:, :K]
    return (w_fp8.float() * s).to(dtype)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block_size: int = 128,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-scaled FP8 matmul ``c = dequant(a) @ dequant(b).T`` with an fp32 accumulator.

    a: (..., K) ``torch.float8_e4m3fn`` activations with a_s (..., ceil(K / bs)) float32 per-tile scales
    (from ``act_quant``); b: (N, K) ``torch.float8_e4m3fn`` weights with b_s (ceil(N / bs), ceil(K / bs))
    float32 block scales (from ``weight_quant``). As in the official kernel, for each K-block kb:
    ``acc += (a_kb @ b_kb.T) * a_s[:, kb, None] * b_s[None, n // bs, kb]`` in fp32. Returns (..., N) in
    ``out_dtype`` (default ``torch.get_default_dtype()``). Raises TypeError on wrong dtypes, ValueError on
    mismatched shapes. Source: official inference/kernel.py ``fp8_gemm``; arXiv 2412.19437 sec. 3.3.
    """
    for name, t in (("a", a), ("b", b)):
        _check_dtype(name, t, FP8_DTYPE)
    for name, t in (("a_s", a_s), ("b_s", b_s)):
        _check_dtype(name, t, torch.float32)
    _check_block(block_size)
    if a.dim() < 1 or b.dim() != 2:
        raise ValueError(f"a must be (..., K) and b (N, K); got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    K, N = a.shape[-1], b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"b must have shape (N, K) with K = a.shape[-1] = {K}, got {tuple(b.shape)}")
    kb = _cdiv(K, block_size)
    _check_shape("a_s", a_s, (*a.shape[:-1], kb))
    _check_shape("b_s", b_s, (_cdiv(N, block_size), kb))
    a2, a_s2 = a.reshape(-1, K), a_s.reshape(-1, kb)
    b_s_n = b_s.repeat_interleave(block_size, 0)[:N]  # (N, kb): the scale of row n's block
    acc = torch.zeros(a2.shape[0], N, dtype=torch.float32, device=a.device)
    for i in range(kb):
        k0, k1 = i * block_size, min((i + 1) * block_size, K)
        part = a2[:, k0:k1].float() @ b[:, k0:k1].float().T
        acc += part * a_s2[:, i, None] * b_s_n[None, :, i]
    out_dtype = torch.get_default_dtype() if out_dtype is None else out_dtype
    return acc.to(out_dtype).reshape(*a.shape[:-1], N)
