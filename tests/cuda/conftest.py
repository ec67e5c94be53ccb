"""Triton kernel tests: the device they run on, poisoned outputs for every launcher, and the versions they need."""

import numpy
import pytest
import torch
import triton

from kernels.triton import utils

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the kernel tests run: the GPU when there is one, else CPU tensors under ``TRITON_INTERPRET=1``."""


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_unusable() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with the installed versions, or None.

    Triton before 3.7 turns a one-element array into a loop bound with ``int()``, which numpy 2.4 and later
    refuse ('only 0-dimensional arrays can be converted to Python scalars'; seen with triton 3.6.0 and numpy
    2.4.6, fixed in triton 3.7.0). Compiled kernels on a GPU are not affected.
    """
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton's interpreter needs triton >= 3.7 or numpy < 2.4 (found triton {triton.__version__}, "
                f"numpy {numpy.__version__})")
    return None


def pytest_collection_modifyitems(config, items):
    """Skip every kernel test, naming the versions, where the interpreter would run them and cannot."""
    reason = utils.interpreted() and interpreter_unusable()
    if reason:
        for item in items:
            if "tests/cuda/" in item.nodeid:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every output a launcher allocates through `kernels.triton.utils.empty` starts as NaN."""
    utils.POISON = True
    yield
    utils.POISON = False
