"""A deliberately broken DeepSeek-V3 router, to see what `dsfs check` / `reference.testing.run` report for it.

``route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)`` has the op's signature
and gets everything right but the group limit: it computes the group scores (the sum of each group's two best
biased scores) and even picks the ``topk_group`` best groups, then forgets to mask the others and takes the
``top_k`` best biased scores over ALL experts. Wherever a token's best experts already lie in its best groups
that changes nothing, so the samples without groups (``n_group=1``) pass, and so do many tokens of the grouped
ones; the samples built so that a token's single best expert sits in a group the limit excludes fail, with
``topk_idx`` (and so ``topk_weight``, renormalized over other experts) differing. Scores, bias (picks, never
weighs), normalization, scaling and the gradient are all right:

    python -m dsfs check route --impl examples/byok/broken_route.py:route
"""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
          norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    scores = torch.sigmoid(logits.float())
    choice = scores.detach() + bias.float()
    n, e = choice.shape
    group_scores = choice.view(n, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    _kept_groups = group_scores.topk(topk_group, dim=-1).indices  # BUG: computed, never applied to `choice`
    topk_idx = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, topk_idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return topk_idx, w * routed_scaling_factor, scores
