"""Launcher helpers shared by every Triton kernel: input checks and output allocation.

``POISON``: when true (the test session sets it), every output that a launcher allocates with `empty` is
filled with NaN first, so a kernel that leaves an element unwritten fails the tolerance check
(DESIGN.md, "Tolerance").
"""

from __future__ import annotations

import os

import torch

POISON = False


def interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check(name: str, t: torch.Tensor, *, ndim: int | None = None, dtypes=None, shape: tuple | None = None,
          device: torch.device | None = None, contiguous: bool = True) -> torch.Tensor:
    """Check one launcher input and return it.

    ``ndim``: required number of dims; ``dtypes``: allowed dtypes (a dtype or a tuple of them); ``shape``: the
    required shape, ``None`` entries match any size; ``device``: the device it must share with the other
    inputs; ``contiguous``: whether the kernel needs a contiguous tensor. A tensor that lives on a CPU is
    accepted only under the interpreter.

    Raises ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` for a wrong rank, shape, device or
    layout, each naming ``name`` and what was expected.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype in {[str(d) for d in allowed]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if t.device.type != "cuda" and not interpreted():
        raise ValueError(f"{name}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {t.stride()}")
    return t


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for a kernel's output; NaN-filled (or the dtype's max for integers) when `POISON`."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(out.dtype).max if out.dtype != torch.bool else True)
    return out
