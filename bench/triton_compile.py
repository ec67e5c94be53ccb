"""Compile every Triton kernel for a GPU target on a machine without a GPU: does this triton build them?

    uv run python -m bench.triton_compile                 # sm_90 (Hopper), the installed triton
    PYTHONPATH=. python3 -m bench.triton_compile --arch 80

Each launcher of `kernels.triton` is called with CPU tensors, at the head dims and dtypes of DeepSeek-V3 (so with
the block sizes and constexprs a GPU run uses) but short sequences; every kernel launch is turned into a
compile (Triton's ``warmup``) against a stand-in driver that names the target, so nothing runs and the outputs
are garbage. Prints one line per compiled kernel variant (warps, stages, shared memory) and exits non-zero when a
kernel fails to compile or needs more shared memory than the target has (227 KiB on sm_90, 163 KiB on sm_80).
Not for timing, and no substitute for the GPU tests (bench/gpu_check.sh): ptxas runs, the driver does not.
"""

from __future__ import annotations

import argparse
import os
import sys

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376, 86: 101376}


def _install_stand_in(arch: int):
    """Make every ``kernel[grid](...)`` compile for ``sm_<arch>`` without a device; returns the list of
    (name, CompiledKernel) that collects them."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class StandIn:
        """The part of Triton's driver interface that compiling needs."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

    driver.set_active(StandIn())
    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    return compiled


def launch_all(dtypes) -> None:
    """Call every launcher once per dtype at DeepSeek-V3's head dims (short sequences)."""
    import torch

    from kernels.triton import (
        attention,
        cross_entropy,
        distill,
        dsa,
        fp8,
        grouped_gemm,
        grpo,
        mla,
        moe,
        rms_norm,
        rope,
        swiglu,
    )

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype)

    for dt in dtypes:
        x, w = r(5, 7168, dtype=dt), r(7168, dtype=dt)
        y, rstd = rms_norm.rms_norm_fwd(x, w)
        rms_norm.rms_norm_bwd(y, x, w, rstd)
        q = r(1, 4, 9, 64, dtype=dt)
        rope.rope_launch(q, r(9, 32), r(9, 32), True)
        g, u = r(5, 2048, dtype=dt), r(5, 2048, dtype=dt)
        swiglu.swiglu_bwd(swiglu.swiglu_fwd(g, u), g, u)
        cross_entropy.linear_cross_entropy(r(6, 64, dtype=dt), r(129280, 64, dtype=dt), torch.randint(0, 99, (6,)))
        hs, ws = r(6, 64, dtype=dt).requires_grad_(), r(129280, 64, dtype=dt).requires_grad_()
        for beta in (0.0, 0.5, 1.0):  # the kernel's three modes: forward KL, generalized JSD, reverse KL
            out = distill.distill(hs, ws, r(6, 32, dtype=dt), r(129280, 32, dtype=dt), torch.randint(0, 99, (6,)),
                                  beta=beta)
            torch.autograd.grad(out[1] + out[2], (hs, ws))  # both cotangents: the backward's second pass
        loss = grpo.grpo(hs, ws, torch.randint(0, 99, (2, 3)), torch.ones(2, 3), torch.randn(2), temperature=0.7)[0]
        torch.autograd.grad(loss, (hs, ws))  # the forward kernel, then the gradient kernel
        for dk, dv in ((192, 128), (576, 512), (64, 64)):  # MLA naive, absorbed (sparse only), a plain head
            q, k, v = r(1, 4, 9, dk, dtype=dt), r(1, 2, 9, dk, dtype=dt), r(1, 2, 9, dv, dtype=dt)
            if dk != 576:  # dense absorbed attention is mla_decode's (576 padded to 1024 overflows shared memory)
                o, lse = attention.attention_fwd(q, k, v, 0.1)
                attention.attention_bwd(q, k, v, o, lse, o, 0.1)
            idx = torch.randint(0, 9, (1, 9, 4))
            o, lse = dsa.sparse_attention_fwd(q, k, v, idx, 0.1)
            dsa.sparse_attention_bwd(q, k, v, idx, o, lse, o, 0.1)
        scores = dsa.indexer_scores(r(1, 9, 64, 128, dtype=dt), r(1, 9, 128, dtype=dt), r(1, 9, 64), 0.1)
        for topk in (4, 2048):
            dsa.indexer_topk(scores, topk)
        ql, qp, ckv, kpe = r(1, 16, 1, 512, dtype=dt), r(1, 16, 1, 64, dtype=dt), r(1, 40, 512, dtype=dt), r(
            1, 40, 64, dtype=dt)
        for splits in (1, 3):
            mla.mla_decode(ql, qp, ckv, kpe, 0.1, splits=splits)
            mla.mla_decode(ql, qp, ckv, kpe, 0.1, splits=splits, indices=torch.randint(0, 40, (1, 1, 8)))
        e, k = 16, 4
        xs, gate, up = r(20, 64, dtype=dt), r(e, 32, 64, dtype=dt), r(e, 32, 64, dtype=dt)
        idx = torch.stack([torch.randperm(e)[:k] for _ in range(5)])
        _, slot, _, offsets = moe.permute(idx, e)
        hs = grouped_gemm.grouped_gemm_forward(xs, gate, offsets)
        grouped_gemm.grouped_gemm_backward(hs, xs, gate, offsets)
        leaves = [t.clone().requires_grad_() for t in (xs, gate, up)]
        gg, uu = grouped_gemm.grouped_gate_up(*leaves, offsets)
        (gg.float().sum() + uu.float().sum()).backward()
        ys, tw = r(20, 64, dtype=dt), torch.rand(5, k)
        moe.combine_forward(ys, slot.view(5, k), tw)
        moe.combine_forward(ys, slot.view(5, k))  # unweighted: permute_rows' backward
        moe.combine_backward(r(5, 64, dtype=dt), ys, slot.view(5, k), tw)
    ids, wts, sc = moe.route_forward(r(7, 256), r(256), 8, 8, 4, True, 2.5)
    moe.route_backward(wts, sc, ids, sc, True, 2.5)
    f8 = torch.float8_e4m3fn
    for dt in (torch.float32, torch.bfloat16):
        aq, a_s = fp8.act_quant(r(5, 300, dtype=dt))
        fp8.act_quant(r(5, 300, dtype=dt), round_in_fp32=True)  # the default on a GPU is the cast path
        fp8.act_quant(r(5, 300, dtype=dt), scale_fmt="ue8m0", round_in_fp32=False)
        for ue8m0 in (None, "ue8m0"):  # the fused transposed quantization of Wgrad, on the GPU's cast path
            at, at_s = fp8.act_quant(r(300, 200, dtype=dt), scale_fmt=ue8m0, transpose=True, round_in_fp32=False)
        wq, ws = fp8.act_quant(r(256, 300))
        fp8.weight_dequant(wq, r(2, 3), dtype=dt)
        fp8.fp8_gemm(aq, a_s, r(200, 300).to(f8), r(2, 3), out_dtype=dt)  # Fprop: block scales, 16-row tiles
        bt, bt_s = fp8.act_quant(r(300, 150), transpose=True)
        fp8.fp8_gemm(at, at_s, bt, bt_s, out_dtype=dt)  # Wgrad: per-row scales on b, 128-row tiles
        w8 = r(300, 200).to(f8)
        fp8.fp8_gemm(at, at_s, w8.T, r(3, 2).T, out_dtype=dt)  # Dgrad: b = W^T (a K-major copy), scales a view
        fp8.fp8_grouped_gemm(at[:20], at_s[:20], r(4, 200, 300).to(f8), r(4, 2, 3), torch.tensor([0, 7, 7, 12, 20]),
                             out_dtype=dt)  # routed experts
        for ue8m0 in (None, "ue8m0"):  # routed experts' Wgrad: per-segment transposed quantization + grouped GEMM
            fp8.fp8_grouped_wgrad(r(300, 200, dtype=dt), r(300, 150, dtype=dt), torch.tensor([0, 170, 170, 300]),
                                  scale_fmt=ue8m0, round_in_fp32=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench.triton_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    import torch
    import triton

    compiled = _install_stand_in(args.arch)
    from kernels.triton import attention, dsa, fp8, grouped_gemm, mla, moe, utils  # noqa: F401 (those using it)

    # after those imports, which bound the real `interpreted` (False: GPU block sizes), `check` accepts CPU tensors
    utils.interpreted = lambda: True
    torch.manual_seed(0)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}", flush=True)
    try:
        launch_all((torch.float32, torch.bfloat16))  # float16 takes the bfloat16 code paths
    except Exception as e:  # noqa: BLE001 - report which kernel failed, then fail
        name = compiled[-1][0] if compiled else "-"
        print(f"FAILED after {len(compiled)} kernels (last compiled: {name}): {type(e).__name__}: {e}")
        return 1
    limit = SHARED_LIMIT.get(args.arch)
    seen, bad = set(), 0
    for name, k in compiled:
        md = k.metadata
        key = (name, k.hash)
        if key in seen:
            continue
        seen.add(key)
        over = limit is not None and md.shared > limit
        bad += over
        print(f"{'OVER ' if over else ''}{name:24s} warps {md.num_warps} stages {md.num_stages} shared {md.shared:6d}")
    print(f"{len(seen)} kernel variants compiled for sm_{args.arch}; {bad} over the shared-memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
