"""The one shared tolerance helper (DESIGN.md, "Tolerance").

``err = ||out - ref|| / ||ref||`` with per-dtype bounds; NaN or Inf never passes.
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
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def rel_err(out, ref) -> float:
    """Relative Frobenius error ``||out - ref|| / ||ref||`` computed in float64.

    ``out``/``ref``: tensors or array-likes of the same shape. Returns ``inf`` if ``out`` holds a
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
    b = BOUNDS[dtype] if bound is None else bound
    err = rel_err(out, ref)
    assert err <= b, f"{what}: relative error {err:.3e} exceeds bound {b:.1e} ({dtype})"
    return err
