"""kernels/triton/utils.py: the tile helpers' policy for half precision, natively on a GPU and under the interpreter.

`tile_dot` must give the float32-accumulated product of the tiles as they are (bfloat16 tiles included, which
the interpreter alone would get wrong), and `cast` must round to nearest even as torch's ``.to`` does (the
interpreter's own bfloat16 cast truncates). Both are checked bit for bit where exactness is promised.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.triton.utils import cast, load_tile, pow2, store_tile, tile_dot
from reference.testing import assert_close
from tests.cuda.conftest import DEVICE


@triton.jit
def _dot_kernel(A, B, C, M, N, K, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    rows, cols, ks = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    a = load_tile(A, rows, ks, M, K)
    b = load_tile(B, ks, cols, K, N)
    if ACC:
        c = tile_dot(a, b, tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32))
    else:
        c = tile_dot(a, b)
    store_tile(C, c, rows, cols, M, N)


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, cast(tl.load(X + i, mask=i < n), Y.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("acc", [False, True], ids=["plain", "acc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tile_dot_is_the_fp32_accumulated_product(dtype, acc):
    m, n, k = 19, 23, 40  # none a power of two: the tiles are padded and masked
    a, b = torch.randn(m, k, device=DEVICE).to(dtype), torch.randn(k, n, device=DEVICE).to(dtype)
    c = torch.full((m, n), float("nan"), device=DEVICE)
    _dot_kernel[(1,)](a, b, c, m, n, k, ACC=acc, BLOCK_M=pow2(m), BLOCK_N=pow2(n), BLOCK_K=pow2(k))
    ref = a.double() @ b.double() + (1.0 if acc else 0.0)
    assert_close(c, ref, what=f"tile_dot({dtype})")  # float32 products of exact half values: the fp32 bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rounds_to_nearest_even_like_torch(dtype):
    x = torch.randn(1000, device=DEVICE) * 3
    x[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    y = torch.empty(1000, dtype=dtype, device=DEVICE)
    _cast_kernel[(1,)](x, y, 1000, BLOCK=1024)
    assert torch.equal(y[1:].cpu(), x[1:].to(dtype).cpu()) and y[0].isnan(), "cast must round as torch does"
    assert torch.signbit(y[2]), "-0.0 keeps its sign"
