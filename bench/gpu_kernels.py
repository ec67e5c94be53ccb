"""Every Triton kernel timed beside the reference op, ``torch.compile`` of the reference op and, where one
exists, the PyTorch built-in, with achieved GB/s (memory-bound ops) or TFLOP/s (matmul-bound ops).

    uv run python -m bench.gpu_kernels --out bench/results/gpu_kernels.json

Needs a CUDA device: without one it prints why and exits 0 (nothing is faked). ``--smoke`` instead runs each
case once at tiny sizes under Triton's interpreter on the CPU, to check the script itself; it reports no
timings. Times are medians of ``triton.testing.do_bench`` (milliseconds); every column of a row is measured in
the same process on the same inputs, so the ratios are the figures to read. Work per call (bytes moved, or
FLOPs; causal attention counts half the score matrix) is the minimum the op needs, the same for every column.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Case:
    """One benchmark row: ``ours`` (the Triton kernel), ``ref`` (the reference op), ``builtin`` (PyTorch's
    own, or None), each a no-argument callable; ``nbytes`` or ``flops`` of work per call; ``backward``: the
    callables run forward and backward."""

    name: str
    ours: Callable
    ref: Callable
    builtin: Callable | None = None
    nbytes: float = 0.0
    flops: float = 0.0
    backward: bool = False
    results: dict = field(default_factory=dict)


def _fwd_bwd(fn, inputs):
    """A callable running ``fn(*inputs)`` forward and backward (gradient of the sum of the output)."""
    import torch

    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward() if out.dim() else out.backward()
        return out

    return run if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs) else (lambda: fn(*inputs))


def cases(device, smoke: bool, dtype=None) -> list[Case]:
    """The benchmark rows at DeepSeek-V3-like shapes, or tiny ones with ``smoke``; ``dtype`` of the activations
    and weights: bfloat16 by default, float32 with ``smoke``."""
    import torch
    import torch.nn.functional as F

    from kernels.triton import attention as k_attn
    from kernels.triton import cross_entropy as k_ce
    from kernels.triton import dsa as k_dsa
    from kernels.triton import fp8 as k_fp8
    from kernels.triton import mla as k_mla
    from kernels.triton import moe as k_moe
    from kernels.triton import rms_norm as k_norm
    from kernels.triton import rope as k_rope
    from kernels.triton import swiglu as k_swiglu
    from reference import attention as r_attn
    from reference import cross_entropy as r_ce
    from reference import dsa as r_dsa
    from reference import fp8 as r_fp8
    from reference import moe as r_moe
    from reference import rms_norm as r_norm
    from reference import rope as r_rope
    from reference import swiglu as r_swiglu

    dt = dtype or (torch.float32 if smoke else torch.bfloat16)
    es = torch.tensor([], dtype=dt).element_size()

    def rnd(*shape, grad=False, dtype=dt, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)

    s = (lambda small, big: small) if smoke else (lambda small, big: big)
    out = []

    # rms_norm: (M, H) rows, forward and forward+backward
    m, h = s(19, 16384), s(40, 7168)
    x, w = rnd(m, h, grad=True), rnd(h, grad=True)
    for bwd in (False, True):
        out.append(Case(f"rms_norm {m}x{h}" + (" fwd+bwd" if bwd else ""),
                        _fwd_bwd(lambda a, b: k_norm.rms_norm(a, b, 1e-6), (x, w) if bwd else (x.detach(), w.detach())),
                        _fwd_bwd(lambda a, b: r_norm.rms_norm(a, b, 1e-6), (x, w) if bwd else (x.detach(), w.detach())),
                        _fwd_bwd(lambda a, b: F.rms_norm(a, (a.shape[-1],), b, 1e-6),
                                 (x, w) if bwd else (x.detach(), w.detach())),
                        nbytes=(4 if bwd else 2) * m * h * es, backward=bwd))

    # rope: (B, H, T, D) queries, interleaved (MLA) pairing
    b, nh, t, d = s(1, 8), s(3, 128), s(7, 4096), s(16, 64)
    q = rnd(b, nh, t, d, grad=True)
    ang = torch.rand(t, d // 2, device=device) * 6.28
    cos, sin = ang.cos(), ang.sin()
    out.append(Case(f"rope {b}x{nh}x{t}x{d} fwd+bwd", _fwd_bwd(lambda a: k_rope.rope(a, cos, sin, True), (q,)),
                    _fwd_bwd(lambda a: r_rope.apply_rope(a, cos, sin, True), (q,)),
                    nbytes=4 * q.numel() * es, backward=True))

    # swiglu: (M, I)
    m, i = s(19, 16384), s(40, 18432)
    g, u = rnd(m, i, grad=True), rnd(m, i, grad=True)
    out.append(Case(f"swiglu {m}x{i} fwd+bwd", _fwd_bwd(k_swiglu.swiglu, (g, u)), _fwd_bwd(r_swiglu.swiglu, (g, u)),
                    nbytes=7 * m * i * es, backward=True))

    # cross-entropy fused with the LM head: (N, H) x (V, H)
    n, h, v = s(37, 8192), s(24, 7168), s(61, 129280)
    hid, wt = rnd(n, h, grad=True, scale=0.1), rnd(v, h, grad=True, scale=0.05)
    tgt = torch.randint(0, v, (n,), device=device)
    out.append(Case(f"linear_cross_entropy {n}x{h}, V={v} fwd+bwd",
                    _fwd_bwd(lambda a, b: k_ce.linear_cross_entropy(a, b, tgt), (hid, wt)),
                    _fwd_bwd(lambda a, b: r_ce.linear_cross_entropy(a, b, tgt), (hid, wt)),
                    flops=6 * n * h * v, backward=True))

    # attention: MLA prefill shapes (Dk 192, Dv 128), causal, forward and forward+backward
    b, nh, t, dk, dv = s(1, 4), s(2, 16), s(13, 4096), s(24, 192), s(16, 128)
    q, k, vv = rnd(b, nh, t, dk, grad=True), rnd(b, nh, t, dk, grad=True), rnd(b, nh, t, dv, grad=True)
    sc = dk**-0.5
    for bwd in (False, True):
        args = (q, k, vv) if bwd else (q.detach(), k.detach(), vv.detach())
        out.append(Case(f"attention causal {b}x{nh}x{t}, Dk={dk} Dv={dv}" + (" fwd+bwd" if bwd else ""),
                        _fwd_bwd(lambda a, c, e: k_attn.attention(a, c, e, sc), args),
                        _fwd_bwd(lambda a, c, e: r_attn.attend(a, c, e, None, sc), args),
                        None, flops=(3.5 if bwd else 1.0) * 2 * b * nh * t * t * (dk + dv) / 2, backward=bwd))

    # MLA absorbed decode over the latent cache: one new token, 128 heads, r 512, dr 64
    b, nh, s_len, r, dr = s(2, 64), s(4, 128), s(29, 4096), s(16, 512), s(8, 64)
    ql, qp = rnd(b, nh, 1, r), rnd(b, nh, 1, dr)
    ckv, kpe = rnd(b, s_len, r), rnd(b, s_len, dr)
    sc = 192**-0.5

    def mla_ref():
        qq = torch.cat((ql, qp), -1)
        kk = torch.cat((ckv, kpe), -1)[:, None]
        return r_attn.attend(qq, kk, ckv[:, None], r_attn.causal_mask(1, s_len, s_len - 1, device), sc)

    out.append(Case(f"mla_decode B={b} H={nh} S={s_len} r={r}",
                    lambda: k_mla.mla_decode(ql, qp, ckv, kpe, sc), mla_ref,
                    nbytes=b * s_len * (r + dr) * es))

    # DSA: indexer scores + causal top-k, then sparse attention over the selection (absorbed form)
    b, t, hi, d, topk = 1, s(9, 4096), s(4, 64), s(16, 128), s(4, 2048)
    iq, ik, iw = rnd(b, t, hi, d), rnd(b, t, d), rnd(b, t, hi, dtype=torch.float32)
    isc = d**-0.5

    def dsa_ref():
        return r_dsa.indexer_topk(r_dsa.indexer_scores(iq, ik, iw, isc), topk)

    out.append(Case(f"dsa indexer scores+top-k T={t} Hi={hi} D={d} k={topk}",
                    lambda: k_dsa.indexer_topk(k_dsa.indexer_scores(iq, ik, iw, isc), topk), dsa_ref,
                    flops=2 * b * t * t * hi * d / 2))
    nh = s(4, 128)
    sq = rnd(b, nh, t, r + dr, grad=True)
    skv = rnd(b, 1, t, r + dr, grad=True)
    idx = k_dsa.indexer_topk(k_dsa.indexer_scores(iq, ik, iw, isc), topk)
    mask = r_dsa.indices_to_mask(idx, t)[:, None]  # (B, 1, T, S); -1 slots select nothing
    out.append(Case(f"dsa sparse_attention H={nh} T={t} k={topk} fwd+bwd",
                    _fwd_bwd(lambda a, c: k_dsa.sparse_attention(a, c, c[..., :r].contiguous(), idx, sc), (sq, skv)),
                    _fwd_bwd(lambda a, c: r_attn.attend(a, c, c[..., :r], mask, sc), (sq, skv)),
                    flops=3.5 * 2 * b * nh * t * min(topk, t) * (2 * r + dr), backward=True))

    # MoE: routing, then the routed experts (permute, grouped GEMMs, swiglu, combine)
    n, e, kk, h, i, groups = s(23, 8192), s(16, 256), s(4, 8), s(24, 7168), s(8, 2048), s(4, 8)
    logits, bias = rnd(n, e, dtype=torch.float32), rnd(e, dtype=torch.float32, scale=0.1)

    out.append(Case(f"moe route N={n} E={e} top-{kk} groups {groups}",
                    lambda: k_moe.route(logits, bias, kk, groups, groups // 2, True, 2.5),
                    lambda: r_moe.route(logits, bias, kk, groups, groups // 2, True, 2.5),
                    nbytes=n * e * 4))
    experts = r_moe.Experts(e, h, i).to(device, dt)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, h**-0.5)
    xs = rnd(n, h, grad=True)
    tidx = torch.stack([torch.randperm(e, device=device)[:kk] for _ in range(n)])
    tw = torch.rand(n, kk, device=device)
    out.append(Case(f"moe experts N={n} E={e} top-{kk} H={h} I={i} fwd+bwd",
                    _fwd_bwd(lambda a: k_moe.experts_forward(a, experts.gate_proj, experts.up_proj,
                                                             experts.down_proj, tidx, tw), (xs,)),
                    _fwd_bwd(lambda a: experts(a, tidx, tw), (xs,)),
                    flops=3 * 2 * n * kk * 3 * h * i, backward=True))

    # FP8: act_quant, weight_dequant, block-scaled GEMM
    m, kdim, ndim = s(19, 4096), s(200, 7168), s(150, 7168)
    a = rnd(m, kdim)
    wq, ws = r_fp8.weight_quant(rnd(ndim, kdim))
    aq, a_s = r_fp8.act_quant(a)
    out.append(Case(f"fp8 act_quant {m}x{kdim}", lambda: k_fp8.act_quant(a), lambda: r_fp8.act_quant(a),
                    nbytes=m * kdim * (es + 1)))
    out.append(Case(f"fp8 weight_dequant {ndim}x{kdim}", lambda: k_fp8.weight_dequant(wq, ws, dtype=dt),
                    lambda: r_fp8.weight_dequant(wq, ws, dtype=dt), nbytes=ndim * kdim * (1 + es)))
    out.append(Case(f"fp8_gemm {m}x{ndim}x{kdim}", lambda: k_fp8.fp8_gemm(aq, a_s, wq, ws, out_dtype=dt),
                    lambda: r_fp8.fp8_gemm(aq, a_s, wq, ws, out_dtype=dt), flops=2 * m * ndim * kdim))

    # FP8 training (report section 3.3): the three GEMMs of a linear layer y = x W^T at M = N = K, beside a dt
    # (bfloat16) torch.matmul of the same size as the built-in; operands quantized beforehand (not timed). Names
    # local to this block: the lambdas above read theirs when called.
    sq = s(40, 4096)
    x_t, w_t, dy_t = rnd(sq, sq), rnd(sq, sq), rnd(sq, sq)
    w8, w8_s = r_fp8.weight_quant(w_t)
    gemms = (("Fprop x W^T", (*k_fp8.act_quant(x_t), w8, w8_s), x_t, w_t.T),
             ("Dgrad dy W (W^T view, its K-major copy included)", (*k_fp8.act_quant(dy_t), w8.T, w8_s.T), dy_t, w_t),
             ("Wgrad dy^T x (per-row scales on both)",  # both quantized along the token axis, which Wgrad contracts
              (*k_fp8.act_quant(dy_t, transpose=True), *k_fp8.act_quant(x_t, transpose=True)), dy_t.T, x_t))
    for what, ops, lhs, rhs in gemms:
        out.append(Case(f"fp8 {what} {sq}x{sq}x{sq}", lambda ops=ops: k_fp8.fp8_gemm(*ops, out_dtype=dt),
                        lambda ops=ops: r_fp8.fp8_gemm(*ops, out_dtype=dt),
                        lambda lhs=lhs, rhs=rhs: torch.matmul(lhs, rhs), flops=2 * sq**3))
    out.append(Case(f"fp8 act_quant transpose (Wgrad operand) {sq}x{sq}",
                    lambda: k_fp8.act_quant(dy_t, transpose=True), lambda: r_fp8.act_quant(dy_t, transpose=True),
                    nbytes=sq * sq * (es + 1)))
    ge, gm, gn, gk = s(3, 8), s(40, 8192), s(24, 2048), s(50, 7168)  # routed experts' gate_proj, 8 local experts
    gw, gw_s = r_fp8.stacked_weight_quant(rnd(ge, gn, gk))
    ga, ga_s = k_fp8.act_quant(rnd(gm, gk))
    counts = torch.distributions.Multinomial(gm, torch.ones(ge)).sample().long()
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
    out.append(Case(f"fp8_grouped_gemm E={ge} M={gm} N={gn} K={gk}",
                    lambda: k_fp8.fp8_grouped_gemm(ga, ga_s, gw, gw_s, offsets, out_dtype=dt),
                    lambda: r_fp8.fp8_grouped_gemm(ga, ga_s, gw, gw_s, offsets, out_dtype=dt), flops=2 * gm * gn * gk))
    return out


def rate(case: Case, ms: float) -> str:
    """Achieved TFLOP/s or GB/s of ``case`` at ``ms`` milliseconds per call."""
    if case.flops:
        return f"{case.flops / ms / 1e9:.1f} TFLOP/s"
    return f"{case.nbytes / ms / 1e6:.0f} GB/s"


def table(rows: list[Case]) -> list[str]:
    """The markdown table of the rows measured so far (a dash where a column was not measured)."""
    lines = ["| op | Triton | rate | reference | compiled ref | built-in | ref / Triton |", "|" + "---|" * 7]
    for c in rows:
        r = c.results
        if "reference" not in r:
            continue
        ms = {k: f"{r[k]:.3f} ms" if r.get(k) else "-" for k in ("triton", "reference", "compiled reference",
                                                                  "builtin")}
        lines.append(f"| {c.name} | {ms['triton']} | {rate(c, r['triton'])} | {ms['reference']} | "
                     f"{ms['compiled reference']} | {ms['builtin']} | {r['reference'] / r['triton']:.2f}x |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="run each case once, tiny, under the interpreter on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--only", default="", help="substring filter on case names")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu_kernels: skipped, no CUDA device (torch.cuda.is_available() is False); nothing was timed")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.manual_seed(0)
    rows = [c for c in cases(device, args.smoke) if args.only in c.name]
    if args.smoke:
        for c in rows:
            c.ours(), c.ref(), c.builtin and c.builtin()
            print(f"ok  {c.name}")
        return 0
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    import triton

    device_name = torch.cuda.get_device_name()
    print(f"{device_name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)

    def save():
        """The table of every row so far, also written as JSON to ``--out`` (after each row, so a timeout
        keeps what was measured)."""
        lines = table(rows)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                           "rows": [{"name": c.name, "ms": c.results, "flops": c.flops, "bytes": c.nbytes}
                                    for c in rows], "table": lines}, f, indent=1)
        return lines

    for c in rows:
        c.results["triton"] = bench(c.ours)
        c.results["reference"] = bench(c.ref)
        if c.builtin is not None:
            c.results["builtin"] = bench(c.builtin)
        print(f"{c.name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in c.results.items()), flush=True)
        save()
    if not args.no_compile:
        for c in rows:
            try:
                c.results["compiled reference"] = bench(torch.compile(c.ref))
                print(f"{c.name}: compiled reference {c.results['compiled reference']:.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - a compile failure is a result to report, not a crash
                c.results["compiled reference"] = None
                print(f"{c.name}: torch.compile failed: {type(e).__name__}: {e}".splitlines()[0], flush=True)
            save()
    print("\n".join(save()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
