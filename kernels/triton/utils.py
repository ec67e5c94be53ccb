"""Helpers shared by every Triton kernel: launcher checks and outputs, and the tile helpers with the one policy
for half-precision tiles under Triton's interpreter.

Launchers: `check` (one input's dtype, rank, shape, device, layout), `empty` (an output; NaN-poisoned when
``POISON`` is true, which the test session sets, so a kernel that leaves an element unwritten fails the
tolerance check: DESIGN.md, "Tolerance"), `pow2` (a tile width), `interpreted`.

Inside kernels (``@triton.jit``): `tile_dot`, `cast`, `round_bf16`, `load_tile`, `store_tile`.

Half precision under the interpreter (``TRITON_INTERPRET=1``), measured with triton 3.9.0 and 3.6.0 (numpy
2.3/2.4, CPU): 32 x K by K x 32 tiles of N(0, 1) values against the float64 product, ``||out - ref|| / ||ref||``;
casts of 1024 N(0, 3) values against torch's.

- ``tl.dot`` on float16 tiles is right: 6.1e-8 (K = 16), 1.2e-7 (K = 64), 3.7e-7 (K = 512), the same numbers
  as upcasting the tiles to float32 first (float32 accumulation).
- ``tl.dot`` on bfloat16 tiles is garbage: 4.2e9, 8.6e9, 2.4e10 (with an accumulator, ``out_dtype`` or
  ``input_precision="ieee"`` alike); upcast to float32 first: 2.4e-8, 5.7e-8, 1.7e-7.
- Loads and stores of float16 and bfloat16 are bit-exact, and so are their casts to float32.
- float32 -> float16 casts round to nearest even (0 of 1024 differ from torch); float32 -> bfloat16 casts
  truncate (478 of 1024 differ by one ulp, with ``fp_downcast_rounding="rtne"`` too), so a bfloat16 sum of
  bfloat16 values drifts as well (256 of 256 differ from torch after 8 additions).

So the policy, applied by every kernel through these helpers: `tile_dot` upcasts bfloat16 tiles to float32
under the interpreter only (float16 and float32 tiles go to ``tl.dot`` as they are), and every float32 ->
narrower cast of a result goes through `cast`, which rounds bfloat16 to nearest even by hand (`round_bf16`)
under the interpreter only. On a GPU both are the plain operations: the tensor cores take half tiles with
float32 accumulation, and the hardware cast rounds. ``INTERPRETED`` is read once, at import, as Triton itself
decides at ``@triton.jit`` time whether to interpret.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON = False


def interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRETED: tl.constexpr = tl.constexpr(interpreted())


def check(name: str, t: torch.Tensor, *, ndim: int | None = None, dtypes=None, shape: tuple | None = None,
          device: torch.device | None = None, contiguous: bool = True) -> torch.Tensor:
    """Check one launcher input and return it.

    ``ndim``: required number of dims; ``dtypes``: allowed dtypes (a dtype or a tuple of them); ``shape``: the
    required shape, ``None`` entries match any size; ``device``: the device it must share with the other
    inputs; ``contiguous``: whether the kernel needs a contiguous tensor. A tensor that lives on a CPU is
    accepted only under the interpreter.

    Raises ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` for a wrong rank, shape, device or
    layout, each naming ``name`` and what was expected.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        if t.dtype not in allowed:
            raise TypeError(f"{name}: expected dtype in {[str(d) for d in allowed]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if t.device.type != "cuda" and not interpreted():
        raise ValueError(f"{name}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {t.stride()}")
    return t


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for a kernel's output; NaN-filled (or the dtype's max for integers) when `POISON` or the
    environment's ``DSFS_POISON_OUTPUTS=1`` (set by `reference.testing`'s battery)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON or os.environ.get("DSFS_POISON_OUTPUTS") == "1":
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(out.dtype).max if out.dtype != torch.bool else True)
    return out


def pow2(n: int) -> int:
    """Tile width for a dim of size ``n``: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def round_bf16(x):
    """float32 ``x`` rounded to the nearest bfloat16 value (ties to even), still float32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounded to nearest even on every backend: under the interpreter a cast to bfloat16 is
    rounded by `round_bf16` first, since the interpreter's own cast truncates (module docstring)."""
    if INTERPRETED and dtype == tl.bfloat16:
        x = round_bf16(x.to(tl.float32))
    return x.to(dtype)


@triton.jit
def tile_dot(a, b, acc=None):
    """``acc + a @ b`` (or ``a @ b``) with a float32 result, for (M, K) and (K, N) tiles of one dtype.

    float32 tiles multiply in IEEE float32 (``input_precision="ieee"``, no TF32), so float32 results meet the
    1e-5 bound; float16 and bfloat16 tiles go to the tensor cores with float32 accumulation, except that under
    the interpreter bfloat16 tiles are upcast to float32 first (its bfloat16 ``tl.dot`` is garbage; module
    docstring), which is numerically the same product (exact products, float32 sums).
    """
    if INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee" if a.dtype == tl.float32 else None)


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols):
    """The tile ``ptr[rows, cols]`` of a row-major (n_rows, n_cols) matrix, zero outside it."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, x, rows, cols, n_rows, n_cols):
    """Store ``x`` into the tile ``ptr[rows, cols]`` of a row-major (n_rows, n_cols) matrix, `cast` to its dtype."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * n_cols + cols[None, :], cast(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def expert_tile(offsets_ptr, t, M, E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """``(e, first row, end row)`` of row tile ``t`` in the schedule of the grouped GEMMs (`grouped_gemm`,
    `kernels.triton.fp8.fp8_grouped_gemm`): the row tiles of the nonempty expert segments [offsets[e], offsets[e+1])
    in expert order, expert e owning cdiv(count_e, BLOCK_M) of them; e == E past the last tile. The tile's rows are
    [first, min(first + BLOCK_M, end))."""
    ex = tl.arange(0, BLOCK_E)
    emask = ex < E
    seg0 = tl.load(offsets_ptr + ex, mask=emask, other=0).to(tl.int32)
    seg1 = tl.load(offsets_ptr + ex + 1, mask=emask, other=0).to(tl.int32)
    tiles = (seg1 - seg0 + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, axis=0)  # tiles of experts 0..e
    e = tl.sum((last <= t).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(ex == e, last - tiles, 0), axis=0)
    start = tl.sum(tl.where(ex == e, seg0, 0), axis=0) + (t - first_tile) * BLOCK_M
    end = tl.minimum(tl.sum(tl.where(ex == e, seg1, 0), axis=0), M)
    return e, start, end
