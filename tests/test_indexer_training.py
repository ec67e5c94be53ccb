"""Lightning-indexer training (V3.2 report section 2.1; the V4 report's warm-up), for DSA and CSA: the KL loss against
a hand-written one, the dense warm-up (main model frozen, recall of the dense attention's top-k rises well above a
random indexer's), the sparse stage (the LM loss never reaches the indexer, the KL never reaches the main model),
and ``dsfs train --indexer-warmup-steps``."""

from __future__ import annotations

import pytest
import torch

from dsfs.trainer import TorchTrainer
from reference import Model, V4Config, V4Model
from reference.dsa import indexer_kl, topk_recall
from reference.model import indexer_recall, set_indexer_training
from tests.reference_utils import make_config, randomize_
from tests.test_v4 import randomize as randomize_v4
from tests.test_v4 import tiny as tiny_v4


def test_indexer_kl_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 5, 7, generator=g) < 0.7
    mask[0, 0] = False  # a query without keys is left out
    got = indexer_kl(scores, target, mask)
    want = []
    for b in range(2):
        for t in range(5):
            m = mask[b, t]
            if not m.any():
                continue
            p = target[b, t][m] / target[b, t][m].sum()
            q = torch.softmax(scores[b, t][m], -1)
            want.append((p * (p.log() - q.log())).sum())
    assert torch.allclose(got.double(), torch.stack(want).mean(), rtol=1e-6)
    got.backward()
    assert scores.grad[~mask].abs().max() == 0 and scores.grad.abs().max() > 0
    same = indexer_kl(torch.log(target).masked_fill(~mask, 0.0), target, mask)  # softmax(log p) = p
    assert abs(float(same)) < 1e-6


def test_topk_recall():
    target = torch.tensor([[[5.0, 4.0, 3.0, 0.0, 0.0]]])
    visible = torch.ones(1, 1, 5, dtype=torch.bool)
    assert topk_recall(target, target, visible, 2) == 1.0
    assert topk_recall(-target, target, visible, 2) == 0.0
    assert topk_recall(torch.tensor([[[5.0, 0.0, 3.0, 9.0, 0.0]]]), target, visible, 2) == 0.5


def _dsa():
    torch.manual_seed(0)
    return randomize_(Model(make_config("dsa", num_hidden_layers=2, max_position_embeddings=64, index_topk=4)))


def _csa():
    cfg = V4Config(**tiny_v4(vocab_size=97, num_hidden_layers=2, layer_types=["compressed_sparse_attention"] * 2,
                             mlp_layer_types=["moe", "moe"], compress_rates={"compressed_sparse_attention": 2},
                             index_topk=4, hc_mult=2))
    return randomize_v4(V4Model(cfg))


def _ids(vocab, b=4, t=48, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make,steps", [(_dsa, 40), (_csa, 100)], ids=["dsa", "csa"])
def test_warmup_trains_only_the_indexer_and_recall_rises(make, steps):
    model = make().train()
    vocab = model.config.vocab_size
    held_out = _ids(vocab, 2, 48, seed=7)
    before = indexer_recall(model, held_out)  # the random indexer's recall
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    trainer = TorchTrainer(model, torch.device("cpu"), 1e-2, 0.0, 1.0, 0.3, False, "adamw",
                           indexer_warmup_steps=steps)
    for step in range(steps):
        trainer.begin_step(step)
        m = trainer.micro_step({"input_ids": _ids(vocab, seed=step), "targets": _ids(vocab, seed=step + 100)}, 1)
        assert m["loss"] == m["indexer_loss"]  # the warm-up optimizes the KL alone
        trainer.optimizer_step(1e-2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    after = indexer_recall(model, held_out)
    print(f"{make.__name__}: top-k recall of the dense attention's top-k, random indexer {before}, after the "
          f"warm-up {after}")
    assert min(a - b for a, b in zip(after, before, strict=True)) > 0.15, (before, after)


@pytest.mark.parametrize("make", [_dsa, _csa], ids=["dsa", "csa"])
def test_sparse_stage_keeps_the_two_losses_apart(make):
    model = make().train()
    vocab = model.config.vocab_size
    ids, tgt = _ids(vocab), _ids(vocab, seed=5)
    set_indexer_training(model, "sparse")
    out = model.loss(ids, tgt)
    mtp = 0.3 * torch.stack(out.mtp_losses).mean() if out.mtp_losses else 0.0
    assert out.indexer_loss is not None
    assert torch.allclose(out.loss, out.lm_loss + mtp + out.aux_loss + out.indexer_loss)
    params = dict(model.named_parameters())
    lm_grads = torch.autograd.grad(out.lm_loss, list(params.values()), allow_unused=True, retain_graph=True)
    kl_grads = torch.autograd.grad(out.indexer_loss, list(params.values()), allow_unused=True)
    for (n, _), g_lm, g_kl in zip(params.items(), lm_grads, kl_grads, strict=True):
        if ".indexer." in n:
            assert g_lm is None or g_lm.abs().max() == 0, f"the LM loss reached {n}"
        else:
            assert g_kl is None or g_kl.abs().max() == 0, f"the indexer KL reached {n}"
    assert any(g is not None and g.abs().max() > 0 for g in kl_grads)
    set_indexer_training(model, None)
    assert model.loss(ids, tgt).indexer_loss is None


def test_dsfs_train_indexer_warmup(data_dir, tmp_path):
    from dsfs.train import train
    from tests.test_train import read_metrics
    from tests.test_v4_train import MICRO_V4

    train("tiny-v4", data_dir, tmp_path / "r", backend="reference", compile=False, verbose=False,
          model_overrides=MICRO_V4, batch_size=2, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=6,
          eval_batches=1, max_steps=6, indexer_warmup_steps=3)
    recs = read_metrics(tmp_path / "r")[0]
    assert [r["loss"] == r["indexer_loss"] for r in recs] == [True] * 3 + [False] * 3
    assert all(r["indexer_loss"] is not None for r in recs)
    with pytest.raises(Exception, match="indexer_warmup_steps"):
        train("tiny-v4", data_dir, tmp_path / "bad", backend="reference", compile=False, verbose=False,
              model_overrides=MICRO_V4, max_steps=2, indexer_warmup_steps=-1)
