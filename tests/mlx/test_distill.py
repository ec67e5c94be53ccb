"""`runtime_mlx.kernels.distill` (GKD's generalized JSD plus the student's cross-entropy, fused with both LM heads,
chunked over tokens): the op's battery (`reference.testing.distill`) on every path; beyond the op spec, explicit
chunk sizes (a partial last chunk), every beta and temperature 2, bfloat16 and mixed student/teacher dtypes, the
per-token `distill_logits` on given logits with -inf entries and masked rows, argument errors, and its memory (the
(N, V) logits never exist at once). Everything against `reference.distill` in float64."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
import torch.nn.functional as F

from reference.distill import distill as ref_distill
from reference.distill import soft_terms
from reference.testing import assert_close
from reference.testing.pytest_plugin import cases, check_case
from runtime_mlx.kernels import distill, distill_logits, kernel_path
from tests.mlx.utils import PATHS, to_mx, to_torch


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", cases("distill"))
def test_battery(path, case):
    """The op's battery on `runtime_mlx.kernels.distill` (int64 targets, as the battery passes them), its per-chunk
    `distill_logits` on the path ``path`` (pure MLX, or Metal)."""
    check_case(case, distill, "mlx")
    assert kernel_path("distill") == path


def _inputs(n=37, hs=16, ht=24, v=301, dtype=torch.float64):
    torch.manual_seed(0)
    sh, sw = torch.randn(n, hs, dtype=dtype), torch.randn(v, hs, dtype=dtype) * 0.4
    th, tw = torch.randn(n, ht, dtype=dtype), torch.randn(v, ht, dtype=dtype) * 0.4
    targets = torch.randint(0, v, (n,))
    targets[[0, 5, 6, n - 1]] = -100
    return sh, sw, th, tw, targets


def _run_both(args, targets, kw, dtype=torch.float32, tdtype=None):
    """(reference outputs, reference grads of student_hidden/weight, our outputs, our grads) for random cotangents
    of the three outputs; ``args``: float64 tensors (sh, sw, th, tw); ours get them in ``dtype`` (the teacher in
    ``tdtype``)."""
    sh, sw, th, tw = args
    tdtype = tdtype or dtype
    cast = [sh.to(dtype), sw.to(dtype), th.to(tdtype), tw.to(tdtype)]
    shr, swr = cast[0].double().requires_grad_(), cast[1].double().requires_grad_()
    ref = ref_distill(shr, swr, cast[2].double(), cast[3].double(), targets, **kw)
    cots = torch.randn(3, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (shr, swr), list(cots))

    m = [to_mx(a) for a in cast]
    tm = to_mx(targets)

    def f(a, b, c, d):
        return distill(a, b, c, d, tm, **kw)

    outs, grads = mx.vjp(f, m, [to_mx(c.float()) for c in cots])
    mx.eval(outs, grads)
    return [r.detach() for r in ref], ref_grads, outs, grads


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.0, 2.0), (0.25, 2.0),
                                              (1.0, 2.0)])
def test_matches_reference(path, beta, temperature):
    """37 tokens in chunks of 8 (the last one partial), a vocabulary of 301, student 16 wide and teacher 24, the
    first and last tokens and two more ignored; loss, soft, hard and both student gradients, and none for the
    teacher."""
    sh, sw, th, tw, targets = _inputs()
    kw = dict(beta=beta, temperature=temperature, weight_hard_loss=0.3, weight_soft_loss=0.7, chunk_size=8)
    ref, (dh, dw), outs, grads = _run_both((sh, sw, th, tw), targets, kw)
    for name, o, r in zip(("loss", "soft_loss", "hard_loss"), outs, ref, strict=True):
        assert o.dtype == mx.float32 and o.shape == ()
        assert_close(to_torch(o), r, what=name)
    assert_close(to_torch(grads[0]), dh, what="d_student_hidden")
    assert_close(to_torch(grads[1]), dw, what="d_student_weight")
    assert not mx.any(grads[2]).item() and not mx.any(grads[3]).item(), "the teacher got a gradient"
    assert kernel_path("distill") == path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16)], ids=["bf16", "bf16-student", "bf16-teacher"])
def test_low_precision(path, dtypes):
    """bfloat16 inputs (both models, or one of them): float32 outputs, gradients in the student's dtype, within the
    bfloat16 bound of the float64 reference on the same (rounded) inputs."""
    sh, sw, th, tw, targets = _inputs()
    kw = dict(beta=0.5, temperature=2.0, chunk_size=16)
    ref, (dh, dw), outs, grads = _run_both((sh, sw, th, tw), targets, kw, *dtypes)
    for name, o, r in zip(("loss", "soft_loss", "hard_loss"), outs, ref, strict=True):
        assert o.dtype == mx.float32
        assert_close(to_torch(o), r, torch.bfloat16, what=name)
    assert grads[0].dtype == to_mx(sh.to(dtypes[0])).dtype
    assert_close(to_torch(grads[0]), dh, torch.bfloat16, what="d_student_hidden")
    assert_close(to_torch(grads[1]), dw, torch.bfloat16, what="d_student_weight")


def _ref_logits(z, u, targets, beta, temperature, gs, gh):
    """float64 reference of `distill_logits` (values and dz) from `reference.distill.soft_terms` and
    ``F.cross_entropy``, rows with ``targets == -100`` zeroed."""
    valid = targets != -100
    zs = torch.where(valid[:, None], z, 0.0)
    us = torch.where(valid[:, None], u, 0.0)
    soft, g_soft = soft_terms(zs / temperature, us / temperature, beta)
    zr = zs.clone().requires_grad_()
    hard = F.cross_entropy(zr, targets, reduction="none", ignore_index=-100)
    (g_hard,) = torch.autograd.grad(hard, zr, gh)
    dz = torch.where(valid[:, None], g_soft * (gs / temperature)[:, None] + g_hard, 0.0)
    return torch.where(valid, soft, 0.0), hard.detach(), dz


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distill_logits_minus_inf_and_masked_rows(path, beta):
    """-inf logits: every seventh entry (the first included) in both models, plus entries -inf in the student only
    (beta 1 and between: p_s = 0 there) or in the teacher only (beta 0 and between: p_t = 0), so terms 0 * log 0
    must count 0; an ignored row of -inf only and an ignored row of NaN give 0 and a zero gradient; the rest match
    the reference, finite."""
    torch.manual_seed(1)
    n, v, temperature = 6, 300, 2.0
    z, u = torch.randn(n, v, dtype=torch.float64) * 3, torch.randn(n, v, dtype=torch.float64) * 3
    z[:, ::7] = u[:, ::7] = float("-inf")
    if beta > 0:
        z[:, 3] = float("-inf")
    if beta < 1:
        u[:, 5] = float("-inf")
    targets = torch.tensor([1, 2, -100, 8, -100, 299])
    z[2], u[2] = float("-inf"), float("-inf")  # a fully masked row
    z[4] = float("nan")
    gs, gh = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    soft_ref, hard_ref, dz_ref = _ref_logits(z, u, targets, beta, temperature, gs, gh)
    zm, um, tm = to_mx(z), to_mx(u), to_mx(targets)
    soft, hard = distill_logits(zm, um, tm, beta, temperature)
    _, (dz,) = mx.vjp(lambda a: distill_logits(a, um, tm, beta, temperature), [zm], [to_mx(gs), to_mx(gh)])
    assert kernel_path("distill") == path
    assert_close(to_torch(soft), soft_ref, what="soft")
    assert_close(to_torch(hard), hard_ref, what="hard")
    assert_close(to_torch(dz), dz_ref, what="dz")
    assert (to_torch(soft)[[2, 4]] == 0).all() and (to_torch(dz)[[2, 4]] == 0).all()


@pytest.mark.parametrize("path", PATHS)
def test_all_ignored(path):
    """Every target ignored: three zeros (not 0 / 0) and zero gradients."""
    sh, sw, th, tw = (to_mx(a.float()) for a in _inputs(n=8, v=50)[:4])
    tm = mx.full((8,), -100, dtype=mx.int32)

    def f(a, b):
        return distill(a, b, th, tw, tm, chunk_size=4)

    outs, grads = mx.vjp(f, [sh, sw], [mx.array(1.0), mx.array(0.5), mx.array(-2.0)])
    assert [o.item() for o in outs] == [0.0, 0.0, 0.0]
    assert not mx.any(grads[0]).item() and not mx.any(grads[1]).item()


def test_bad_arguments():
    sh, sw, th, tw = mx.zeros((4, 8)), mx.zeros((11, 8)), mx.zeros((4, 6)), mx.zeros((11, 6))
    tg = mx.zeros((4,), dtype=mx.int32)
    with pytest.raises(ValueError, match="beta"):
        distill(sh, sw, th, tw, tg, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill(sh, sw, th, tw, tg, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        distill(sh, sw, th, tw, tg, chunk_size=0)
    with pytest.raises(ValueError, match="weight_soft_loss"):
        distill(sh, sw, th, tw, tg, weight_soft_loss="0.5")
    with pytest.raises(ValueError, match="vocabulary"):
        distill(sh, sw, th, mx.zeros((12, 6)), tg)
    with pytest.raises(ValueError, match="student_weight"):
        distill(sh, mx.zeros((11, 9)), th, tw, tg)
    with pytest.raises(ValueError, match="teacher_hidden"):
        distill(sh, sw, mx.zeros((5, 6)), mx.zeros((11, 6)), tg)
    with pytest.raises(ValueError, match="at least one token"):
        distill(sh[:0], sw, th[:0], tw, tg[:0])
    with pytest.raises(TypeError, match="targets"):
        distill(sh, sw, th, tw, tg.astype(mx.float32))
    with pytest.raises(TypeError, match="student_hidden"):
        distill(sh.astype(mx.int32), sw, th, tw, tg)
    with pytest.raises(ValueError, match="one \\(N, V\\) shape"):
        distill_logits(mx.zeros((4, 11)), mx.zeros((4, 12)), tg)


def _peak_mib(n: int, v: int = 2048, h: int = 32, chunk: int = 16) -> float:
    """Peak memory (MiB) of the loss and both student gradients of ``n`` tokens, above what the inputs hold."""
    sh, sw = mx.random.normal((n, h)), mx.random.normal((v, h)) * 0.1
    th, tw = mx.random.normal((n, h)), mx.random.normal((v, h)) * 0.1
    targets = mx.random.randint(0, v, (n,))
    mx.eval(sh, sw, th, tw, targets)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loss, grads = mx.value_and_grad(lambda a, b: distill(a, b, th, tw, targets, chunk_size=chunk)[0],
                                    argnums=(0, 1))(sh, sw)
    mx.eval(loss, grads)
    return (mx.get_peak_memory() - base) / 2**20


def test_chunks_bound_the_memory():
    """Loss and gradients over a 2048-word vocabulary in chunks of 16 tokens: the peak memory is the same for 256
    and 2048 tokens (one chunk's temporaries: measured about 3.8 MiB on the pure-MLX path, which materializes
    about 15 (16, V) float32 arrays per chunk), far below the 16 MiB of one model's float32 logits of 2048 tokens
    (32 MiB for both models)."""
    small, large = _peak_mib(256), _peak_mib(2048)
    assert large < 1.2 * small + 0.5, f"peak grows with the tokens: {small:.2f} MiB at 256, {large:.2f} at 2048"
    assert large < 2048 * 2048 * 4 / 2**20 / 2
