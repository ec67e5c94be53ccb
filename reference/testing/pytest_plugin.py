"""The battery inside pytest: one parametrized test per case (sample x dtype), in a user's CI or ours.

In a test file, two lines check a function against an op (see ``examples/byok/test_my_rms_norm.py``):

```python
from reference.testing.pytest_plugin import battery

test_my_rms_norm = battery("rms_norm", "my_kernels:rms_norm")   # or the function itself
```

pytest then collects ``test_my_rms_norm[ragged (2, 5, 100)-float32]``, ... one test per case, each failing with
the case's table rows (check, error, bound, why). For more control, parametrize by `cases` and call `check_case`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import pytest
import torch

from . import get_spec
from .battery import arrays_for, check_signature, failures, format_rows, load_impl, run_case
from .spec import OpSpec, Sample


def cases(op: str | OpSpec, dtypes: Sequence[torch.dtype] | None = None, tags: Sequence[str] | None = None,
          bench: bool = False) -> list:
    """``pytest.param((spec, sample, dtype), id="<sample>-<dtype>")`` for every case of ``op`` (restricted to
    ``dtypes`` and to samples with one of ``tags``), for ``@pytest.mark.parametrize("case", cases("rope"))``."""
    spec = get_spec(op) if isinstance(op, str) else op
    out = []
    for sample, dtype in spec.cases(dtypes, bench=bench):
        if tags and not set(tags) & set(sample.tags):
            continue
        out.append(pytest.param((spec, sample, dtype), id=f"{sample.name}-{str(dtype).replace('torch.', '')}"))
    if not out:  # an empty parameter set would only skip: a typo must not turn a check green
        raise ValueError(f"{spec.name}: no case with dtypes {dtypes} and tags {tags} (its dtypes: "
                         f"{[str(d).replace('torch.', '') for d in spec.dtypes]}, tags: "
                         f"{sorted({t for s in spec.samples(spec.rng()) for t in s.tags})})")
    return out


@functools.cache
def _load(target: str) -> Callable:
    """`load_impl`, once per target string for the whole session (a file candidate is imported once)."""
    return load_impl(target)


def check_case(case: tuple[OpSpec, Sample, torch.dtype], fn: Callable | str, device: str = "cpu",
               backward: bool = True) -> None:
    """Run one case of the battery on ``fn`` (a function or ``"module:function"``) on ``device``; fails the test
    with the case's rows when any check fails."""
    spec, sample, dtype = case
    try:
        fn = _load(fn) if isinstance(fn, str) else fn
        arrays, takes_out = arrays_for(device), check_signature(spec, fn)
    except ValueError as e:  # ImplError included: one line, no traceback through this module
        pytest.fail(str(e), pytrace=False)
    rows = run_case(spec, fn, sample, dtype, arrays, takes_out, backward)
    bad = failures(rows)
    if bad:
        pytest.fail(f"{spec.name} on {getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', fn)}, "
                    f"{len(bad)} check(s) failed:\n{format_rows(rows)}", pytrace=False)


def battery(op: str | OpSpec, impl: Callable | str, device: str = "cpu", dtypes: Sequence[torch.dtype] | None = None,
            tags: Sequence[str] | None = None, backward: bool = True) -> Callable:
    """A pytest test function, parametrized by every case of ``op``, that checks ``impl`` on ``device``.
    Assign it to a module-level name starting with ``test_``."""

    @pytest.mark.parametrize("case", cases(op, dtypes, tags))
    def test(case):
        check_case(case, impl, device, backward)

    return test
