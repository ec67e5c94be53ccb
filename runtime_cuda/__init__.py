"""PyTorch runtime whose hot ops run Triton kernels (`kernels/triton`); same API and checkpoints as `reference`."""

from .model import Model, use_triton
from .v4_model import V4Model

Model.v4_class = V4Model

__all__ = ["Model", "V4Model", "use_triton"]
