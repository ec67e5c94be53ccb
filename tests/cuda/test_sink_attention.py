"""Triton sink attention (kernels/triton/sink_attention.py): the op's battery (`reference.testing.sink_attention`:
ragged sizes, -1 slots, a query with no valid index, dominating and vanishing sinks, a decode step, a V4-Flash slice;
forward and the gradients of q, kv and sinks), the saved log-sum-exp, int32 indices, and bad inputs. Outputs start
as NaN (tests/cuda/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from kernels.triton.sink_attention import sink_attention, sink_attention_fwd
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from tests.cuda.conftest import DEVICE
from tests.test_sink_attention import sink_inputs


@pytest.mark.parametrize("case", cases("sink_attention"))
def test_battery(case):
    check_case(case, sink_attention, DEVICE.type)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_empty_query_and_lse(index_dtype):
    """A query with no valid index: o exactly 0 and lse = the sink (base 2); elsewhere lse is log2 of the
    normalizer over [logits; sink]; int32 indices as int64."""
    q, kv, sinks, idx, scale = sink_inputs()
    q, kv, sinks = q.float(), kv.float(), sinks.float()
    o, lse = sink_attention_fwd(*(a.to(DEVICE) for a in (q, kv, sinks, idx.to(index_dtype))), scale)
    assert (o[0, 1] == 0).all()
    n_rows = kv.shape[1]
    ok = (idx >= 0) & (idx < n_rows)
    rows = kv.double()[torch.arange(2)[:, None, None], idx.clamp(0, n_rows - 1)]  # (B, S, K, D)
    z = (torch.einsum("bshd,bskd->bshk", q.double(), rows) * scale).masked_fill(~ok[:, :, None], float("-inf"))
    z = torch.cat((z, sinks.double().view(1, 1, -1, 1).expand(*z.shape[:3], 1)), -1)
    assert_close(lse.cpu(), torch.logsumexp(z, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64)))


def test_bad_inputs():
    q, kv, sinks, idx, scale = sink_inputs()
    q, kv, sinks, idx = q.float().to(DEVICE), kv.float().to(DEVICE), sinks.float().to(DEVICE), idx.to(DEVICE)
    with pytest.raises(ValueError, match="sinks"):
        sink_attention(q, kv, sinks[:2], idx, scale)
    with pytest.raises(TypeError, match="indices"):
        sink_attention(q, kv, sinks, idx.float(), scale)
    with pytest.raises(TypeError, match="kv"):
        sink_attention(q, kv.half(), sinks, idx, scale)
    with pytest.raises(ValueError, match="contiguous"):
        sink_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kv, sinks, idx, scale)
