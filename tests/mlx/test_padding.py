"""runtime_mlx.Model on a left-padded batch with ``attention_mask`` (batched rollouts), as tests/test_padding.py
for the reference: prompts of lengths 5, 9 and 1 left-padded to 9 with random ids, a prefill and 4 cached decode
steps; the logits at real positions equal each prompt's own unpadded MLX run and the reference's padded run, for
every attention type with MoE layers; padding positions stay finite; a bad mask is a one-line ValueError.
Float32, bound 1e-5 (DESIGN.md)."""

from __future__ import annotations

import pytest
import torch

from reference.testing import assert_close
from tests.mlx.utils import PATHS, model_pair, mx, to_mx, to_torch
from tests.test_padding import (
    CASES,
    STEPS,
    assert_rows_match_unpadded,
    case_config,
    padded_batch,
    prefill_and_decode,
    real_positions,
    set_absorb,
)


def run(model, ids, steps, mask=None) -> torch.Tensor:
    """`prefill_and_decode` on the MLX model: torch tensors in and out."""
    return prefill_and_decode(model, ids, steps, mask, to=to_mx, back=to_torch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CASES))
def test_padded_batch_equals_unpadded_runs_and_reference(name, path):
    cfg, absorb = case_config(name)
    ref, model = model_pair(cfg)
    set_absorb(ref, absorb)
    set_absorb(model, absorb)
    prompts, ids, mask, steps = padded_batch(cfg.vocab_size)
    padded = run(model, ids, steps, mask)
    assert padded.shape == (3, 9 + STEPS, cfg.vocab_size)
    assert torch.isfinite(padded).all(), "non-finite logits (at padding positions?)"
    assert_rows_match_unpadded(padded, mask, prompts, steps, lambda p, s: run(model, p, s), f"mlx {name}")
    with torch.no_grad():
        want = prefill_and_decode(ref, ids, steps, mask)
    for b, (g, w) in enumerate(zip(real_positions(padded, mask), real_positions(want, mask), strict=True)):
        assert_close(g, w, what=f"mlx vs reference [{name}], row {b}")
    repadded = torch.where(mask.bool(), ids, torch.randint_like(ids, cfg.vocab_size))
    again = run(model, repadded, steps, mask.bool())  # other pad ids, a bool mask
    for a, b in zip(real_positions(again, mask), real_positions(padded, mask), strict=True):
        assert_close(a, b, what=f"mlx {name}: other pad ids")


def test_bad_attention_mask_is_a_one_line_value_error():
    cfg, _ = case_config("mla")
    _, model = model_pair(cfg)
    _, ids, mask, _ = padded_batch(cfg.vocab_size)
    ids, mask = to_mx(ids), to_mx(mask)
    bad = {"shape": mask[:, 1:], "float dtype": mask.astype(mx.float32), "torch": torch.ones(3, 9),
           "3-D": mask[..., None]}
    for what, m in bad.items():
        with pytest.raises(ValueError, match="attention_mask") as e:
            model(ids, attention_mask=m)
        assert "\n" not in str(e.value), what
    cache = model.new_cache()
    model(ids, cache, mask)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape .*\(3, 9 \+ 1\)") as e:
        model(ids[:, :1], cache, mask[:, :1])  # S must cover the cache too
    assert "\n" not in str(e.value)
