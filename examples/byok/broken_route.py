"""A deliberately broken DeepSeek-V3 router, to see what `dsfs check` / `reference.testing.run` report for it.

``route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)`` has the op's signature
and gets everything right but the group limit: it computes the group scores (the sum of each group's two best
biased scores) and even picks the ``topk_group`` best groups, then forgets to mask the others and takes the
``top_k`` best biased scores over ALL experts. Where a token's best experts already lie in its best groups that
changes nothing, so the samples without groups (``n_group=1``) pass, and so does the grouped one whose logits are
all equal; every other grouped sample has tokens that pick an expert of an excluded group and fails, the ones
built so that each token's single best expert sits in an excluded group on most of their ``topk_idx`` entries.
``topk_weight`` (renormalized over the wrong experts) and ``dlogits`` fail with them; ``scores`` pass. Scores,
bias (picks, never weighs), ties (lower index first), normalization, scaling and the gradient are all right:

    dsfs check route --impl examples/byok/broken_route.py:route
"""

from __future__ import annotations

import torch


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest along the last dim, best first, equal values lower index first (a stable sort: ``torch.topk``
    promises no order among ties, and the battery's tie samples would catch that too)."""
    return x.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    scores = torch.sigmoid(logits.float())
    choice = scores.detach() + bias.float()
    n, e = choice.shape
    group_scores = choice.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    _kept_groups = _top(group_scores, topk_group)  # BUG: computed, never applied to `choice`
    topk_idx = _top(choice, top_k)
    w = scores.gather(1, topk_idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor, scores
