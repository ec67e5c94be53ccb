"""`runtime_mlx.kernels.linear_cross_entropy` (the LM head fused with the loss, chunked over tokens): the op's
battery (`reference.testing.cross_entropy`) on every path; beyond the op spec, per-token weights and explicit chunk
sizes (chunks that do not divide the tokens) against `reference.cross_entropy.linear_cross_entropy` (float64), and
its memory: the (N, V) logits never exist at once. And the per-token `cross_entropy` kernel on given logits, on
every path, against `F.cross_entropy`."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
import torch.nn.functional as F

from reference.cross_entropy import linear_cross_entropy as ref_lce
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx.kernels import cross_entropy, kernel_path, linear_cross_entropy
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("linear_cross_entropy"))
def test_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.linear_cross_entropy` (int64 targets, as the battery passes them),
    its per-chunk `cross_entropy` on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, linear_cross_entropy, "mlx")
    assert kernel_path("cross_entropy") == path


def _inputs(n=37, h=24, v=301):
    hidden, weight = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64) * 0.3
    targets = torch.randint(0, v, (n,))
    targets[[0, 5, 6, n - 1]] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,chunk_size", [(False, 8), (True, 8), (True, None)],
                         ids=["plain-chunk8", "token_weights-chunk8", "token_weights-default"])
def test_options_match_reference(reduction, weighted, chunk_size):
    """Options beyond the op's signature (the battery runs the plain, default-chunk case): per-token weights, and
    chunks of 8 over 37 tokens (the last one partial)."""
    hidden, weight, targets = _inputs()
    tw = torch.rand(hidden.shape[0], dtype=torch.float64) + 0.5 if weighted else None
    g = torch.randn(hidden.shape[0], dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = ref_lce(hr, wr, targets, reduction=reduction, token_weights=tw, chunk_size=chunk_size)
    (ref * g).sum().backward()

    tm, twm, gm = to_mx(targets), None if tw is None else to_mx(tw), to_mx(g)

    def lce(a, b):
        return linear_cross_entropy(a, b, tm, reduction=reduction, token_weights=twm, chunk_size=chunk_size)

    out = lce(to_mx(hidden), to_mx(weight))
    dh, dw = mx.grad(lambda a, b: (lce(a, b) * gm).sum(), argnums=(0, 1))(to_mx(hidden), to_mx(weight))
    assert out.dtype == mx.float32 and out.shape == tuple(ref.shape)
    assert_close(to_torch(out), ref, what="loss")
    assert_close(to_torch(dh), hr.grad, what="d_hidden")
    assert_close(to_torch(dw), wr.grad, what="d_weight")
    if reduction == "none":
        assert (to_torch(out)[targets == -100] == 0).all()


def test_all_ignored_and_bad_arguments():
    hidden, weight = mx.random.normal((4, 8)), mx.random.normal((11, 8))
    ignored = mx.full((4,), -100, dtype=mx.int32)
    assert mx.isnan(linear_cross_entropy(hidden, weight, ignored)).item()  # 0 / 0, as F.cross_entropy
    assert linear_cross_entropy(hidden, weight, ignored, reduction="sum").item() == 0.0
    tg = mx.zeros((4,), dtype=mx.int32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, tg, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, tg, chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, mx.random.normal((11, 9)), tg)
    with pytest.raises(TypeError, match="targets"):
        linear_cross_entropy(hidden, weight, tg.astype(mx.float32))


def test_chunks_bound_the_memory():
    """Loss and gradients of 2048 tokens over a 2048-word vocabulary in chunks of 32: the peak memory stays a small
    fraction of the 16 MiB the float32 logits would take (measured about 2.5 MiB, the same at 256 tokens)."""
    n, h, v = 2048, 32, 2048
    hidden, weight = mx.random.normal((n, h)), mx.random.normal((v, h)) * 0.1
    targets = mx.random.randint(0, v, (n,))
    mx.eval(hidden, weight, targets)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loss, grads = mx.value_and_grad(lambda a, b: linear_cross_entropy(a, b, targets, chunk_size=32), argnums=(0, 1))(
        hidden, weight)
    mx.eval(loss, grads)
    assert mx.get_peak_memory() - base < n * v * 4 / 4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy(path, dtype):
    n, v = 13, 1000
    logits, tg = (torch.randn(n, v) * 3).to(dtype), torch.randint(0, v, (n,))
    tg[[2, 7]] = -100
    g = torch.randn(n)
    lr = logits.double().requires_grad_()
    ref = F.cross_entropy(lr, tg, reduction="none", ignore_index=-100)
    ref.backward(g.double())
    lm, tm = to_mx(logits), to_mx(tg)
    out = cross_entropy(lm, tm)
    dl = mx.grad(lambda a: (cross_entropy(a, tm) * to_mx(g)).sum())(lm)
    assert_close(to_torch(out), ref, dtype)
    assert_close(to_torch(dl), lr.grad, dtype, what="dlogits")
