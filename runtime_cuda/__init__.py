"""PyTorch runtime whose hot ops run Triton kernels (`kernels/triton`); same API and checkpoints as `reference`."""

from .model import Model, use_triton

__all__ = ["Model", "use_triton"]
