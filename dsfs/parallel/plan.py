"""`dsfs plan`: per-device memory and per-step communication of a training layout, predicted from the model config.

A small analytical model of what `dsfs.parallel.trainer.ParallelTrainer` does, in three steps:

1. `model_counts`: every parameter tensor of the model (built on the meta device from the ``ModelConfig``, so the
   counts are the model code's own), with what splits it: its FSDP unit (a decoder or MTP layer, or the root:
   embedding, final norm, head), its tensor-parallel placement (`dsfs.parallel.tp`'s plan: column-, row-wise or
   replicated), whether it is a routed-expert stack (expert parallelism shards its dim 0, `dsfs.parallel.ep`) and its
   optimizer (`reference.optim.param_groups`: Muon for hidden matrices, AdamW for the rest).
2. Memory per device (`plan`; per pipeline rank when they differ): fp32 master parameters, fp32 gradients and the
   optimizer state (AdamW 2 moments + a step scalar per tensor, Muon 1 momentum; bf16 moments under bf16/fp8
   training, `reference.optim.store_moments_in`), sharded as the layout shards them (FSDP2 pads dim 0 to a multiple of
   the shard count; ZeRO-1's ``ZeroRedundancyOptimizer`` gives each rank whole tensors, greedily by size); the
   activations autograd saves for backward (`activation_bytes`, derived tensor by tensor from the model code: MLA,
   SwiGLU MLPs, DeepSeekMoE with its router and grouped experts or the EP dispatch, RMSNorm, the fused chunked
   cross-entropy, MTP) for the microbatches in flight; the unsharded parameters FSDP holds at the end of forward; and
   the peak (`Memory`).
3. Communication per optimizer step (`Comm`), per collective and mesh dimension, in one convention: the bytes a
   rank sends, ring algorithms: an all-gather or reduce-scatter of a buffer of ``S`` bytes (the whole, gathered
   buffer) over ``n`` ranks sends ``(n-1)/n S``, an all-reduce ``2 (n-1)/n S``, a broadcast ``(n-1)/n S`` (averaged
   over the ranks, as the ring pipelines it), an all-to-all the rows that leave the rank, a pipeline send its
   buffer. Scalars (loss metrics, the gradient norm) are left out.

The planner is checked against measurements of real `ParallelTrainer` steps on 2 gloo processes in
tests/parallel/test_plan.py (``torch.profiler`` for the collectives, ``torch.distributed._tools.mem_tracker.
MemTracker`` and autograd's saved-tensor hooks for memory). ``docs/plan_v3_671b.md`` works DeepSeek-V3's layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from dsfs.errors import ConfigError
from dsfs.parallel.layout import ParallelDims

PRECISIONS = ("fp32", "bf16", "fp8")
Q8 = 1 + 4 / 128
"""Bytes per element of an FP8-saved activation: one e4m3 byte plus a float32 scale per 1 x 128 tile
(`reference.fp8_training`)."""
GiB, MiB = 2**30, 2**20


# ---------------------------------------------------------------------------------------------- the training shape
@dataclass(frozen=True)
class TrainShape:
    """What one optimizer step processes and how: ``batch_size`` sequences per micro-batch (the whole world's, as
    ``dsfs train --batch-size``), ``seq_len`` tokens each, ``grad_accum`` micro-batches per step, ``optimizer``
    (adamw, muon), ``precision`` (fp32; bf16: autocast, bf16 moments; fp8: FP8 GEMMs with bf16 autocast on the
    rest, bf16 moments) and ``device`` ("cuda": bf16 autocast under fp8, as `dsfs.evaluation.autocast`; "cpu": fp8
    GEMMs in an fp32 model). Raises `ConfigError` naming the field."""

    batch_size: int
    seq_len: int
    grad_accum: int = 1
    optimizer: str = "adamw"
    precision: str = "fp32"
    device: str = "cuda"

    def __post_init__(self):
        for k in ("batch_size", "seq_len", "grad_accum"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{k.replace('_', '-')} {v}: expected an integer >= 1")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"--optimizer {self.optimizer}: expected adamw or muon")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"device {self.device!r}: expected cuda or cpu")

    @property
    def autocast(self) -> bool:
        """bf16 autocast is on (`dsfs.evaluation.autocast`)."""
        return self.precision == "bf16" or (self.precision == "fp8" and self.device == "cuda")

    @property
    def moment_bytes(self) -> int:
        """Bytes per optimizer moment element between steps (bf16 under bf16/fp8 training)."""
        return 2 if self.precision in ("bf16", "fp8") else 4


# ---------------------------------------------------------------------------------------------- 1. the counts
@dataclass(frozen=True)
class TensorCount:
    """One parameter tensor of the model: ``name`` (its FQN), ``shape``; ``unit`` the FSDP unit holding it ("root"
    for the embedding, final norm and head, "layers.i" or "mtp.k"), ``layer`` the decoder-layer index (MTP depth k:
    ``num_hidden_layers + k``; None for the root), ``tp`` its tensor-parallel placement ("col": dim 0 split, "row": dim
    1 split, "rep": whole on every TP rank), ``expert`` a routed-expert stack (EP splits dim 0), ``group`` its
    optimizer ("muon" or "adamw")."""

    name: str
    shape: tuple[int, ...]
    unit: str
    layer: int | None
    tp: str
    expert: bool
    group: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_COLWISE = re.compile(r"self_attn\.(q_b_proj|q_proj|kv_b_proj|k_proj|v_proj)\.weight$|"
                      r"mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$")
_ROWWISE = re.compile(r"self_attn\.o_proj\.weight$|mlp\.(shared_experts\.)?down_proj\.weight$")


def model_counts(cfg) -> list[TensorCount]:
    """The parameter tensors of ``reference.Model(cfg)`` (``cfg`` a ``reference.ModelConfig``), tied ones once, in
    ``named_parameters`` order, classified as `TensorCount` says. The model is built on the meta device: no memory,
    whatever its size. TP placements follow `dsfs.parallel.tp` (MLA's q_b/kv_b column-wise and o_proj row-wise, the
    latent projections, norms, routers and routed experts replicated); optimizer groups follow
    `reference.optim.param_groups` (Muon: matrices other than embeddings, the LM head and routers)."""
    import torch

    from reference import Model

    with torch.device("meta"):
        model = Model(cfg)
    emb = {id(model.model.embed_tokens.weight)}
    adam_only = {id(model.lm_head.weight)} | {id(m.gate.weight) for m in model.moe_layers()}
    n = cfg.num_hidden_layers
    out = []
    for name, p in model.named_parameters():
        m = re.match(r"model\.layers\.(\d+)\.|mtp\.(\d+)\.", name)
        if m is None:
            unit, layer = "root", None
        elif m.group(1) is not None:
            unit, layer = f"layers.{m.group(1)}", int(m.group(1))
        else:
            unit, layer = f"mtp.{m.group(2)}", n + int(m.group(2))
        tp = "col" if _COLWISE.search(name) else "row" if _ROWWISE.search(name) else "rep"
        expert = ".mlp.experts." in name
        muon = p.ndim >= 2 and id(p) not in emb and id(p) not in adam_only
        out.append(TensorCount(name, tuple(p.shape), unit, layer, tp, expert, "muon" if muon else "adamw"))
    return out


def param_totals(cfg, counts: list[TensorCount] | None = None) -> dict[str, int]:
    """Parameter counts: ``total`` (with MTP), ``main`` (without the MTP layers), ``mtp``, and ``activated`` (the
    main model's parameters one token uses: the routed experts counted ``num_experts_per_tok / n_routed_experts``
    of the way; the embedding and the head both counted)."""
    counts = model_counts(cfg) if counts is None else counts
    total = sum(t.numel for t in counts)
    mtp = sum(t.numel for t in counts if t.unit.startswith("mtp."))
    main = total - mtp
    experts = sum(t.numel for t in counts if t.expert and not t.unit.startswith("mtp."))
    head = cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0  # the tied head is used twice
    activated = main - experts + experts * cfg.num_experts_per_tok // max(cfg.n_routed_experts, 1) + head
    return {"total": total, "main": main, "mtp": mtp, "activated": activated}


# ---------------------------------------------------------------------------------------------- layout helpers
def local_shape(t: TensorCount, dims: ParallelDims) -> tuple[int, ...]:
    """``t``'s shape on one rank after tensor and expert parallelism (before FSDP)."""
    s = list(t.shape)
    if t.tp == "col" and dims.tp > 1:
        s[0] //= dims.tp
    elif t.tp == "row" and dims.tp > 1:
        s[1] //= dims.tp
    if t.expert and dims.ep > 1:
        s[0] //= dims.ep
    return tuple(s)


def fsdp_shards(t: TensorCount, dims: ParallelDims, zero: int) -> int:
    """Over how many ranks FSDP2 shards ``t`` (1: not sharded): ``dp_shard x cp`` (`dsfs.parallel.fsdp`), the
    routed experts under EP over ``dp_shard / (ep / cp)``; ZeRO-1 and a single data rank shard nothing."""
    if zero == 1:
        return 1
    if t.expert and dims.ep > 1:
        return dims.dp_shard // dims.dp_shard_in_ep
    return dims.dp_shard * dims.cp


def _padded_shard(shape: tuple[int, ...], n: int) -> int:
    """Elements of one FSDP2 shard: dim 0 padded to a multiple of ``n`` (``ceil(d0 / n) x rest``)."""
    if n == 1:
        return math.prod(shape)
    return -(-shape[0] // n) * math.prod(shape[1:])


def uniform_routing(cfg, ep: int, tokens: int = 4096, seed: int = 0) -> Routing:
    """Expected EP dispatch per token under uniform routing: ``tokens`` tokens routed by `reference.moe.route` from
    i.i.d. normal router logits (every expert equally likely; the config's group-limited routing applied), counted
    by `dsfs.parallel.ep.dispatch_volume` (one row per token and destination rank, ep.py's dedupe). Deterministic
    (``seed``)."""
    import torch

    from dsfs.parallel.ep import dispatch_volume
    from reference.moe import route

    if ep == 1 or not cfg.n_routed_experts:
        return Routing(1.0, 1.0, float(cfg.num_experts_per_tok))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, cfg.n_routed_experts, generator=g)
    idx, _, _ = route(logits, torch.zeros(cfg.n_routed_experts), cfg.num_experts_per_tok, cfg.n_group,
                      cfg.topk_group)
    rows = dispatch_volume(idx, cfg.n_routed_experts, ep, cfg.hidden_size).rows / tokens
    return Routing(rows, rows / ep, float(cfg.num_experts_per_tok))


@dataclass(frozen=True)
class Routing:
    """EP dispatch statistics per token of a rank (`uniform_routing`, or measured): ``rows`` (token, destination
    rank) rows it sends (ep.py sends a token once per rank, whatever the number of its experts there; the rows it
    receives are taken equal), ``self_rows`` of them to itself (no traffic), ``pairs`` (token, expert) pairs its
    experts receive."""

    rows: float
    self_rows: float
    pairs: float


# ---------------------------------------------------------------------------------------------- 2. activations
def _norm(d: int, in_bytes: int) -> float:
    """Bytes RMSNorm (`reference.rms_norm`) saves per token for an input of width ``d`` in ``in_bytes``: the fp32
    input (a fp32 copy of a bf16 one) for ``pow``, the (1,) rsqrt, the normalized ``y`` in the input dtype for the
    gain; its output (fp32: the gain is fp32) is saved by its consumer."""
    return 4 * d + 4 + in_bytes * d


def activation_bytes(cfg, shape: TrainShape, dims: ParallelDims, layers: list[int], rows: int, first: bool,
                     last: bool, routing: Routing | None = None) -> dict[str, float]:
    """Bytes autograd saves for backward over one forward of ``rows`` sequences (this rank's share: ``seq_len /
    cp`` tokens each) through decoder layers ``layers`` (MTP depth k as layer ``num_hidden_layers + k``), plus the
    embedding (``first``) and final norm, head cross-entropies (``last``). By component: "embedding", "attention"
    (norm, MLA), "ffn" (norm, dense MLP or DeepSeekMoE: router, routed experts, shared experts), "head" (final
    norms, the fused cross-entropy's precomputed gradients: (N, H) and the whole (V, H) head gradient in fp32, per
    call), "mtp" (its embedding and combine), "rope" (cos/sin per forward).

    Derived from the model code, tensor by tensor (fp32: every saved float 4 bytes; ``autocast``: linears save bf16
    copies of their input, one per linear, and of their weight, attention saves bf16 q, k, v; fp8: FP8 linears and
    SwiGLUs save e4m3 inputs with fp32 tile scales, `Q8`). Tensor parallelism: norms and the residual stream hold
    ``1/tp`` of the tokens (sequence parallelism), attention and FFNs the whole; routed experts run every token on
    every TP rank. Context parallelism: each MLA layer up-projects the latent of the whole sequence (k, v and the
    gathered latent for ``seq_len`` tokens, `dsfs.parallel.cp`). Expert parallelism: the rows ``routing`` gives
    (default `uniform_routing`)."""
    c = cfg
    ac, f8 = shape.autocast, shape.precision == "fp8"
    cd = 2 if ac else 4  # compute dtype: linear outputs, attention operands
    tp, cp = dims.tp, dims.cp
    n = rows * shape.seq_len / cp  # this rank's tokens (attention, FFN)
    ns = n / tp  # the residual stream's (norms)
    nkv = rows * shape.seq_len if cp > 1 else n  # keys/values: CP up-projects the whole sequence's latent
    h = c.hidden_size
    out = dict.fromkeys(("embedding", "attention", "ffn", "head", "mtp", "rope"), 0.0)

    def lin_in(d: int, consumers: int = 1) -> float:
        """A fp32 input of width d consumed by ``consumers`` linear layers: saved as is (fp32), one bf16 copy per
        linear (autocast), or one e4m3 copy (FP8 linears sharing it)."""
        return Q8 * d if f8 else (2 * d * consumers if ac else 4 * d)

    def wcopy(numel: float) -> float:
        """Autocast's bf16 copy of a weight (saved by its linear): 2 bytes per element, per forward."""
        return 2 * numel if ac else 0.0

    def mlp(inter: float, shared_input: bool) -> tuple[float, float]:
        """A SwiGLU MLP of (local) width ``inter``: (bytes per token, fixed bytes). ``shared_input``: its fp32
        input is saved by another module already (the router)."""
        if f8:  # fp8_swiglu_mlp: x, gate and up outputs in e4m3 (the SwiGLU output recomputed)
            return Q8 * h + 2 * Q8 * inter, 0.0
        x = 0.0 if shared_input and not ac else lin_in(h, 2)
        return x + 4 * cd * inter, wcopy(3 * h * inter)  # gate out, up out, silu(gate), product (down's input)

    nh = c.num_attention_heads // tp
    dq, dv, r, dr, ql = c.qk_head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim, c.q_lora_rank
    dvp = dq if dv < dq else (dv if ac else c.qk_nope_head_dim + dv)  # v as SDPA saves it (padded to dq)
    for layer in layers:
        # ---- attention: input norm on the stream, MLA on the tokens (`reference.mla.MLA`, naive form)
        a = _norm(h, 4) * ns + lin_in(h, 2) * n  # q_a / kv_a input (the TP-gathered one)
        fixed = 0.0
        if ql is not None:
            a += (_norm(ql, cd) + lin_in(ql)) * n  # q_a output through q_a_layernorm, q_b input
            fixed += wcopy(ql * h) + wcopy(ql * nh * dq)
        else:
            fixed += wcopy(h * nh * dq)
        a += (4 * (r + dr) + 4 + 4 * r if cd == 4 else 4 * r + 4 + 2 * r) * n  # kv_a output through kv_a_layernorm
        a += lin_in(r) * nkv  # kv_b input (under CP: the gathered latent of the whole sequence)
        if cp > 1:  # the gathered latent's k_pe columns stay alive in fp32 (kv_b saves a view); the index order
            a += (4 * dr if not (ac or f8) else 0) * nkv + 8 * rows * shape.seq_len / max(rows, 1)
        a += (cd * nh * dq + 4 * nh + cd * nh * dvp) * n + (cd * nh * dq + cd * nh * dvp) * nkv  # SDPA q, lse, o; k, v
        a += (Q8 if f8 else cd) * nh * dv * n  # o_proj input
        fixed += wcopy((r + dr) * h) + wcopy(r * nh * (c.qk_nope_head_dim + dv)) + wcopy(nh * dv * h)
        out["attention"] += a + (0 if f8 else fixed)
        # ---- FFN: post-attention norm on the stream, then the dense MLP or DeepSeekMoE on the tokens
        f = _norm(h, 4) * ns
        if not c.is_moe_layer(layer):
            per, fx = mlp(c.intermediate_size / tp, False)
            f += per * n + (0 if f8 else fx)
        else:
            e, k = c.n_routed_experts, c.num_experts_per_tok
            f += (4 * h + 4 * e + 8 * k + 4 + 4 * k) * n  # router: input, sigmoid scores, top-k ids, norm, weights
            im = c.moe_intermediate_size
            el = e // dims.ep
            if dims.ep == 1:
                p = k * n  # (token, expert) pairs, all local
                f += 16 * p  # token and order indices (int64)
                if f8:
                    f += (Q8 * h + 2 * Q8 * im + cd * h + cd + 4 * h) * p + 8 * (el + 1)
                elif ac:  # per-expert loop: bf16 casts of each segment for gate and up, outputs, weight copies
                    f += (4 * h + 8 * im + 2 * h + 2 + 4 * h) * p + wcopy(3 * el * im * h)
                else:
                    f += (4 * h + 16 * im + 4 * h + 4 + 4 * h) * p + 4 * el  # xs, SwiGLU, ys, weights, ys*w; offsets
            else:  # ep_experts_forward: rows sent and received, pairs received
                rt = routing or uniform_routing(c, dims.ep)
                s, p = rt.rows * n, rt.pairs * n
                f += (8 + k + 4 * h) * s + 16 * p  # token ids, the pairs-on-rank mask, combined rows; row, order
                if f8:
                    f += (Q8 * h + 2 * Q8 * im + cd * h + cd + 4 * h) * p + 8 * (el + 1)
                elif ac:
                    f += (4 * h + 8 * im + 2 * h + 2 + 4 * h) * p + wcopy(3 * el * im * h)
                else:
                    f += (4 * h + 16 * im + 4 * h + 4 + 4 * h) * p + 4 * el
            if c.n_shared_experts:
                per, fx = mlp(im * c.n_shared_experts / tp, True)
                f += per * n + (0 if f8 else fx)
        out["ffn"] += f
    if layers:
        out["rope"] += 4 * shape.seq_len * dr  # cos and sin of the main forward, shared by its layers
        if cp > 1:
            out["rope"] += shape.seq_len * shape.seq_len / cp  # the (T/cp, T) causal mask by position
    v = c.vocab_size
    if first:
        out["embedding"] += 8 * n  # token ids
    if last:
        ce = 4 * h * n + 4 * v * h + 8  # fused cross-entropy: grad_h (N, H), grad_w (V, H) fp32, the target count
        out["head"] += _norm(h, 4) * ns + ce
        n_mtp = c.num_nextn_predict_layers
        if n_mtp:
            out["rope"] += 4 * shape.seq_len * dr
        for _ in range(n_mtp):
            m = 8 * n + 2 * _norm(h, 4) * ns  # its embedding's ids, enorm, hnorm
            m += (8 * h if not ac else 4 * h) * ns + wcopy(2 * h * h)  # eh_proj input (cat), bf16 weight copy
            out["mtp"] += m
            out["head"] += _norm(h, 4) * ns + ce  # shared_head.norm, its cross-entropy
    return out
