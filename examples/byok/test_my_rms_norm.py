"""Check a kernel against the op's battery inside pytest: ``uv run pytest examples/byok/test_my_rms_norm.py``.

`battery` returns a test function parametrized by every case of the op (sample x dtype); assign it to a name that
starts with ``test_``. The candidate is a function or a ``"module:function"`` / ``"path/to/file.py:function"``
string (imported when the tests run, so an import error fails the tests instead of the collection).
"""

from pathlib import Path

from reference.testing.pytest_plugin import battery

HERE = Path(__file__).parent

test_my_rms_norm = battery("rms_norm", f"{HERE / 'my_rms_norm.py'}:rms_norm")

# Only some cases, one dtype, forward only (a forward-only kernel, or a quick loop while writing it):
# test_quick = battery("rms_norm", my_rms_norm.rms_norm, dtypes=[torch.bfloat16], tags=["model"], backward=False)
