"""Triton kernel tests: the device they run on, and poisoned outputs for every launcher."""

import pytest
import torch

from kernels.triton import utils

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""Where the kernel tests run: the GPU when there is one, else CPU tensors under ``TRITON_INTERPRET=1``."""


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every output a launcher allocates through `kernels.triton.utils.empty` starts as NaN."""
    utils.POISON = True
    yield
    utils.POISON = False
