"""MLX attention: the op's battery (`reference.testing.attention`) on the runtime's `attention` and on its MLX
builtin, ``mx.fast.scaled_dot_product_attention``, which the runtime calls; and the runtime's `attend` (causal,
grouped heads, cached, boolean masks) against the reference."""

from __future__ import annotations

import pytest
import torch

from reference.attention import attend as ref_attend
from reference.attention import causal_mask as ref_causal_mask
from reference.testing import assert_close, get_spec
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx.attention import attend, attention
from tests.mlx.utils import to_mx, to_torch


@pytest.mark.parametrize("case", cases("attention"))
def test_attention_battery(case):
    """The runtime's `attention` (causal aligned to the end of the keys, non-causal, GQA/MQA, Dk != Dv): forward and
    the gradients of q, k and v."""
    check_case(case, attention, "mlx")


def test_attention_causal_needs_enough_keys():
    q, k = to_mx(torch.randn(1, 2, 5, 8)), to_mx(torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="S=4 < T=5"):
        attention(q, k, k, 0.3)


@pytest.mark.parametrize("case", cases("attention"))
def test_battery_mx_fast_sdpa(case):
    """``mx.fast.scaled_dot_product_attention`` ("causal" aligned to the end of the keys, grouped heads natively,
    Dk != Dv) passes the op's battery, gradients included."""
    check_case(case, get_spec("attention").builtin["mlx"](), "mlx")


@pytest.mark.parametrize("heads,kv_heads,dk,dv", [(4, 4, 8, 8), (4, 2, 8, 8), (4, 1, 12, 8)])
@pytest.mark.parametrize("cached", [False, True])
def test_attend_causal(heads, kv_heads, dk, dv, cached):
    """The runtime's ``mask=None`` (causal; also T < S: the queries are the last T positions) with grouped heads
    and dv != dk."""
    t, s = (3, 9) if cached else (9, 9)
    q, k, v = torch.randn(2, heads, t, dk), torch.randn(2, kv_heads, s, dk), torch.randn(2, kv_heads, s, dv)
    mask = None if t == s else ref_causal_mask(t, s, s - t)
    ref = ref_attend(q, k, v, mask, 0.3)
    assert_close(to_torch(attend(to_mx(q), to_mx(k), to_mx(v), None, 0.3)), ref, what="attend")


def test_attend_boolean_mask():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 5)
    mask = (torch.rand(2, 1, 6, 6) < 0.6) | torch.eye(6, dtype=torch.bool)
    ref = ref_attend(q, k, v, mask, 0.4)
    assert_close(to_torch(attend(to_mx(q), to_mx(k), to_mx(v), to_mx(mask), 0.4)), ref, what="masked attend")
