"""Test and time any implementation of an op against the reference: the tolerance helper, one spec per op, and
the battery that runs a spec on a candidate. The project's own tests, ``dsfs check``, ``dsfs bench`` and the
pytest plugin (`reference.testing.pytest_plugin`) all use this module.

```python
from reference.testing import get_spec, run, failures, format_rows

rows = run(get_spec("rms_norm"), my_rms_norm, device="cpu")   # every sample, every dtype, forward and backward
print(format_rows(rows)); assert not failures(rows)
```

Depends on torch and numpy only (MLX is imported for ``device="mlx"``); it imports neither runtime.
"""

from __future__ import annotations

import importlib

from .battery import (
    DEVICES,
    ImplError,
    Row,
    arrays_for,
    check_signature,
    failures,
    format_rows,
    load_impl,
    run,
    run_case,
    to_mx,
    to_torch,
)
from .spec import FLOATS, OpSpec, Output, Sample
from .tolerance import BOUNDS, assert_close, bound_for, rel_err

# One module per op family, named like the reference module; each defines SPECS (or SPEC).
FAMILIES = ("rms_norm", "rope", "swiglu", "cross_entropy", "attention", "mla", "dsa", "moe", "fp8", "preference",
            "distill", "grpo", "compressor", "sink_attention", "mhc")


def all_specs() -> dict[str, OpSpec]:
    """Every op spec by name, in inventory order."""
    out: dict[str, OpSpec] = {}
    for family in FAMILIES:
        mod = importlib.import_module(f"{__name__}.{family}")
        for spec in getattr(mod, "SPECS", None) or [mod.SPEC]:
            out[spec.name] = spec
    return out


def get_spec(name: str) -> OpSpec:
    """The spec of op ``name``; raises ``KeyError`` naming the known ops."""
    specs = all_specs()
    if name not in specs:
        raise KeyError(f"unknown op {name!r}; expected one of {', '.join(specs)}")
    return specs[name]


__all__ = [
    "BOUNDS", "DEVICES", "FAMILIES", "FLOATS", "ImplError", "OpSpec", "Output", "Row", "Sample", "all_specs",
    "arrays_for", "assert_close", "bound_for", "check_signature", "failures", "format_rows", "get_spec",
    "load_impl", "rel_err", "run", "run_case", "to_mx", "to_torch",
]
