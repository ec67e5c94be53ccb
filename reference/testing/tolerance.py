"""The one tolerance helper (DESIGN.md, "Tolerance"), shared by the project's tests and `dsfs check`.

``err = ||out - ref|| / ||ref||`` computed in float64 against a float64 reference (or the reference's own dtype),
with one bound per dtype: float32 1e-5, tf32 5e-4, bfloat16 / float16 1.6e-2 (about two ulps of bfloat16's
8-bit significand, accumulated over a row). NaN or Inf in the output never passes.
"""

from __future__ import annotations

import numpy as np
import torch

BOUNDS = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    "tf32": 5e-4,
    torch.bfloat16: 1.6e-2,
    torch.float16: 1.6e-2,
}


def _as_f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    if type(x).__module__.startswith("mlx"):  # an mx.array: through float32 (bfloat16 has no numpy dtype)
        import mlx.core as mx

        x = x.astype(mx.float32) if x.dtype == mx.bfloat16 else x
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def bound_for(dtype) -> float:
    """The bound of ``dtype`` (a torch dtype, an ``mx.Dtype`` or ``"tf32"``); raises ``KeyError`` naming the
    dtypes that have one."""
    key = dtype if dtype == "tf32" or isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).split(".")[-1])
    if key not in BOUNDS:
        raise KeyError(f"no tolerance bound for {dtype}; expected one of {[str(k) for k in BOUNDS]}")
    return BOUNDS[key]


def rel_err(out, ref) -> float:
    """Relative Frobenius error ``||out - ref|| / ||ref||`` computed in float64.

    ``out``/``ref``: torch tensors, ``mx.array`` s or array-likes of the same shape. Returns ``inf`` if ``out`` holds a
    NaN or Inf (so that NaN never passes). Raises ``AssertionError`` on a shape mismatch.
    """
    o, r = _as_f64(out), _as_f64(ref)
    assert o.shape == r.shape, f"shape mismatch: got {tuple(o.shape)}, expected {tuple(r.shape)}"
    if not torch.isfinite(o).all():
        return float("inf")
    denom = r.norm().item()
    diff = (o - r).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(out, ref, dtype=torch.float32, bound: float | None = None, what: str = "output") -> float:
    """Assert ``rel_err(out, ref) <= bound``; ``bound`` defaults to ``BOUNDS[dtype]``. Returns the error."""
    b = bound_for(dtype) if bound is None else bound
    err = rel_err(out, ref)
    assert err <= b, f"{what}: relative error {err:.3e} exceeds bound {b:.1e} ({dtype})"
    return err
