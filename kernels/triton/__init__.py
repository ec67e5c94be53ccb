"""Triton kernels for the hot ops, one file per op family (DESIGN.md, "Kernel inventory").

Each file holds the ``@triton.jit`` kernels, launchers that check their inputs, and the differentiable entry
points (``torch.autograd.Function``) that `runtime_cuda` calls. On a machine without CUDA the kernels run on
CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported).
"""
