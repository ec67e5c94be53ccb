"""Shared by the MLX kernel tests and the Metal emulation tests: inputs that span many binades, drawn from torch's
global generator (`reference.testing.spec.spread` draws from a given one). The absorbed MLA decode these tests
compare with is the op `reference.mla.mla_decode`."""

from __future__ import annotations

import torch

from reference.testing.spec import spread as _spread


def spread(*shape) -> torch.Tensor:
    """`reference.testing.spec.spread` from torch's global generator (seeded by the test's ``torch.manual_seed``)."""
    return _spread(torch.default_generator, *shape)
