"""Core ML export (``dsfs export --format coreml``): an ``.mlpackage`` for Apple devices, built with coremltools.

The package is one ML Program (``minimum_deployment_target`` iOS 18 / macOS 15, the first with model states) with
two functions that share their weights (coremltools' multifunction models: `coremltools.utils.save_multifunction`)
and their KV cache:

- ``prefill``: ``input_ids`` (1, prefill_len) int32 and ``position`` (1,) int32 -> ``logits`` (1, prefill_len,
  vocab_size) float32;
- ``decode`` (the default function): ``input_ids`` (1, 1) int32 and ``position`` (1,) int32 -> ``logits`` (1, 1,
  vocab_size) float32.

Both run the tokens at positions ``position, position + 1, ...``: they attend to the cached positions before
``position`` and causally to each other, and store their own latents in the cache. A new prompt starts at
``position`` 0; a prompt shorter than prefill_len is right-padded (any ids) and the next call starts at ``position``
= the real length, overwriting the padding's cache slots before anything reads them (padding never reaches a real
token: the mask is causal). A prompt longer than prefill_len runs as several prefill calls (``position`` 0,
prefill_len, ...), or its tail as decode steps. ``position`` + the real tokens of a call must stay within
context_len (positions past it are not stored).

The cache is Core ML state (`coremltools.StateType`, made once with ``MLModel.make_state()`` and passed to both
functions): MLA's compressed latent, not per-head keys and values (DeepSeek-V3 report section 2.1.1, eq. 1-11):
``c_kv_{i}`` (1, context_len, kv_lora_rank) and ``k_pe_{i}`` (1, context_len, qk_rope_head_dim) per decoder layer
``i``, plus the lightning indexer's key ``index_k_{i}`` (1, context_len, index_head_dim) for DSA (V3.2). Core ML
holds state in float16 only (coremltools refuses other state dtypes), so cached positions are read back rounded
to float16; the tokens of the current call use their float32 latents. Compute precision is float32 (Core ML runs
it on the CPU or GPU; the Neural Engine computes in float16 only).

The traced network is `CoreMLLM`, an export-only re-expression of `reference.Model`'s forward with static shapes and
the reference model's own weights: the absorbed MLA form over [cache; current tokens] under a position mask, the
DeepSeekMoE router (sigmoid scores, correction bias for selection, group-limited routing) as dense weights over
all experts with top-k by rank (ties to the lower index, as DESIGN.md asks), every routed expert evaluated densely
and weighted, DSA's top-k as the same rank selection. Dense experts cost ``n_routed_experts / num_experts_per_tok``
times the routed FLOPs, and DSA's rank selection compares every pair of keys (T (context_len + T)^2 per layer): this
export targets small models. The MTP modules are not exported.

`check_coreml` raises `dsfs.export.ExportError` for what this cannot express: attention other than MLA / DSA
(MHA/MQA/GQA variants), the standard softmax MoE, lengths out of range.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsfs.export import ExportError
from reference.config import ModelConfig
from reference.moe import DeepSeekMoE
from reference.swiglu import swiglu

DEFAULT_PREFILL_LEN = 64
DEFAULT_CONTEXT_LEN = 512
FUNCTIONS = ("prefill", "decode")  # the package's functions; "decode" is the default one
CACHE_DTYPE = torch.float16  # Core ML model state is float16 only


def resolve_lengths(config: ModelConfig, prefill_len: int | None, context_len: int | None) -> tuple[int, int]:
    """``(prefill_len, context_len)`` with the defaults filled in: context_len ``min(512, max_position_embeddings)``,
    prefill_len ``min(64, context_len)``. Raises `ExportError` unless both are integers with ``1 <= prefill_len <=
    context_len <= max_position_embeddings``."""
    limit = config.max_position_embeddings
    if context_len is None:
        context_len = min(DEFAULT_CONTEXT_LEN, limit)
    if not isinstance(context_len, int) or isinstance(context_len, bool) or not 1 <= context_len <= limit:
        raise ExportError(f"--context-len {context_len}: expected an integer in 1..{limit} (the model's "
                          "max_position_embeddings)")
    if prefill_len is None:
        prefill_len = min(DEFAULT_PREFILL_LEN, context_len)
    if not isinstance(prefill_len, int) or isinstance(prefill_len, bool) or not 1 <= prefill_len <= context_len:
        raise ExportError(f"--prefill-len {prefill_len}: expected an integer in 1..{context_len} (--context-len, "
                          "the positions the cache holds)")
    return prefill_len, context_len


def check_coreml(config: ModelConfig, prefill_len: int | None = None, context_len: int | None = None
                 ) -> tuple[int, int]:
    """Raise `ExportError` for a model `write_coreml` cannot express or lengths out of range (`resolve_lengths`);
    called before anything is written. Supported: MLA (DeepSeek-V3) and DSA (V3.2) attention, dense SwiGLU and
    DeepSeekMoE FFNs, any static RoPE scaling. Returns the resolved ``(prefill_len, context_len)``."""
    if config.attention_type not in ("mla", "dsa"):
        raise ExportError(f"--format coreml: attention_type={config.attention_type!r} is not supported; the Core ML "
                          "export caches MLA's latent (attention_type 'mla' or 'dsa')")
    if config.has_moe_layers and config.moe_type != "deepseek":
        raise ExportError(f"--format coreml: moe_type={config.moe_type!r} is not supported; expected DeepSeekMoE "
                          "('deepseek') or dense FFNs")
    return resolve_lengths(config, prefill_len, context_len)


def rank_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (..., N) of the ``k`` largest entries of ``x`` (..., N) along the last dim, equal values ranking
    the lower index first (DESIGN.md, "Ties in any top-k"; the indices `reference.moe.topk_indices` picks). Static
    shapes and no sort: entry ``i`` is kept when fewer than ``k`` entries beat it (larger, or equal with a lower
    index), O(N^2) comparisons. ``k >= N`` keeps everything."""
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device)
    earlier = idx[None, :] < idx[:, None]  # (i, j): j before i
    xi, xj = x[..., :, None], x[..., None, :]
    beats = torch.logical_or(xj > xi, torch.logical_and(xj == xi, earlier))
    return beats.to(torch.int32).sum(-1) < k


class CoreMLLM(nn.Module):
    """`reference.Model`'s forward with static shapes and a fixed-size latent cache: what `write_coreml` traces.

    ``forward(input_ids, position)``: ``input_ids`` (1, T) integer tokens at positions ``position[0] + t``,
    ``position`` (1,) integer -> logits (1, T, vocab_size) float32. The T tokens attend to cache slots ``< position``
    and causally to each other (so right padding after the real tokens changes no real token's logits), and their
    latents are written to cache slots ``position .. position + T - 1`` (slots past ``context_len`` are dropped).
    Equal to ``model(ids)`` and the reference's cached decode up to float rounding with ``cache_dtype`` float32;
    ``cache_dtype`` float16 (the default) is what the Core ML state holds.

    Buffers (the Core ML states, named as `state_shapes` lists them): per decoder layer ``i``, ``c_kv_{i}`` (1,
    context_len, kv_lora_rank), ``k_pe_{i}`` (1, context_len, qk_rope_head_dim), and with DSA ``index_k_{i}`` (1,
    context_len, index_head_dim). The reference model's parameters are used as they are (no copy). Raises
    `ExportError` for a model `check_coreml` refuses.
    """

    def __init__(self, model: nn.Module, context_len: int, cache_dtype: torch.dtype = CACHE_DTYPE):
        super().__init__()
        c = model.config
        check_coreml(c, 1, context_len)
        self.model = model
        self.context_len = context_len
        self.dsa = c.attention_type == "dsa"
        for name, shape in self.state_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=cache_dtype))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Cache buffer name -> shape, layer by layer."""
        c, n = self.model.config, self.context_len
        out = {}
        for i in range(c.num_hidden_layers):
            out[f"c_kv_{i}"] = (1, n, c.kv_lora_rank)
            out[f"k_pe_{i}"] = (1, n, c.qk_rope_head_dim)
            if self.dsa:
                out[f"index_k_{i}"] = (1, n, c.index_head_dim)
        return out

    @torch.no_grad()
    def reset_cache(self) -> None:
        """Zero every cache buffer (a fresh sequence; the positions argument alone already hides stale slots)."""
        for name in self.state_shapes():
            getattr(self, name).zero_()

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        m = self.model
        t = input_ids.shape[1]
        positions = position.reshape(1).to(torch.int32) + torch.arange(t, dtype=torch.int32)  # (T,)
        ang = positions.to(torch.float32)[:, None] * m.rotary.inv_freq[None, :]
        cos, sin = ang.cos() * m.rotary.amplitude, ang.sin() * m.rotary.amplitude  # (T, dr/2)
        slots = torch.arange(self.context_len, dtype=torch.int32)
        old = (slots[None, :] < positions[:1, None]).expand(t, self.context_len)  # cached keys before the call
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        visible = torch.cat((old, causal), dim=1)  # (T, context_len + T): [cache; current tokens]
        hit = (slots[:, None] == positions[None, :]).to(torch.float32)  # (context_len, T): slot <- token
        x = m.model.embed_tokens(input_ids)
        for i, layer in enumerate(m.model.layers):
            x = x + self.attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, visible, hit)
            x = x + self.ffn(layer.mlp, layer.post_attention_layernorm(x))
        return m.lm_head(m.model.norm(x))

    def cached(self, name: str, new: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """The keys [cache; current tokens] (1, context_len + T, D) float32 of cache buffer ``name`` and the current
        tokens' ``new`` (1, T, D); stores ``new`` in the slots ``hit`` (context_len, T) marks. The cache is read
        before it is written, and no visible slot is overwritten, so the order does not matter."""
        buf = getattr(self, name)
        old = buf.to(torch.float32)
        keys = torch.cat((old, new), dim=1)
        written = hit.sum(1, keepdim=True) > 0  # (context_len, 1)
        buf[:] = torch.where(written, hit @ new[0], old[0]).to(buf.dtype)[None]
        return keys

    def attention(self, i: int, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  visible: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s MLA in the absorbed form (`reference.mla.MLA.attend_absorbed`) over the cached and current
        latents; DSA restricts ``visible`` (T, S) to the indexer's top-k. ``x`` (1, T, hidden) -> (1, T, hidden)."""
        _, t, _ = x.shape
        q_nope, q_pe, c_kv, k_pe, q_latent = attn.project(x, cos, sin)
        c_all = self.cached(f"c_kv_{i}", c_kv, hit)  # (1, S, r), S = context_len + T
        pe_all = self.cached(f"k_pe_{i}", k_pe, hit)  # (1, S, dr)
        if self.dsa:
            visible = torch.logical_and(visible, self.index_select(i, attn.indexer, x, q_latent, cos, sin, visible,
                                                                   hit))
        w = attn.kv_b_proj.weight.view(attn.n_heads, attn.dn + attn.dv, attn.r)
        w_uk, w_uv = w[:, : attn.dn], w[:, attn.dn:]
        q_lat = q_nope @ w_uk  # (1, H, T, r)
        scores = (q_lat @ c_all.transpose(1, 2)[:, None] + q_pe @ pe_all.transpose(1, 2)[:, None]) * attn.scale
        probs = torch.softmax(scores.masked_fill(torch.logical_not(visible), float("-inf")), dim=-1)  # (1, H, T, S)
        o = (probs @ c_all[:, None]) @ w_uv.transpose(1, 2)  # (1, H, T, dv)
        return attn.o_proj(o.transpose(1, 2).reshape(1, t, attn.n_heads * attn.dv))

    def index_select(self, i: int, indexer: nn.Module, x, q_latent, cos, sin, visible, hit) -> torch.Tensor:
        """DSA's lightning-indexer selection (`reference.dsa.Indexer.select`): boolean (T, S), the top
        ``min(index_topk, visible keys)`` of each query's eq. 1 scores among its visible keys, by `rank_select`."""
        q, k_new, w = indexer.project(x, q_latent, cos, sin)  # (1, T, H, D), (1, T, D), (1, T, H)
        k_all = self.cached(f"index_k_{i}", k_new, hit)  # (1, S, D)
        logits = torch.relu((q @ k_all.transpose(1, 2)[:, None]) * indexer.scale)  # (1, T, H, S)
        scores = (logits * w[..., None]).sum(2)[0]  # (T, S)
        return torch.logical_and(rank_select(scores.masked_fill(torch.logical_not(visible), float("-inf")),
                                             indexer.topk), visible)

    def ffn(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The dense SwiGLU FFN as it is; DeepSeekMoE with every routed expert evaluated and weighted by `route`
        (zero outside the top-k). ``x`` (1, T, hidden) -> (1, T, hidden)."""
        if not isinstance(mlp, DeepSeekMoE):
            return mlp(x)
        flat = x.reshape(-1, x.shape[-1])
        y = dense_experts(mlp.experts, flat, route(mlp.gate, flat))
        if mlp.shared_experts is not None:
            y = y + mlp.shared_experts(flat)
        return y.view_as(x)


def route(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`reference.moe.route` of a `reference.moe.Router` as dense weights: (N, E) float32, ``topk_weight`` at the
    chosen experts and 0 elsewhere. ``x`` (N, hidden) float32.

    Scores ``sigmoid(x W^T)``; selection ranks ``scores + e_score_correction_bias``: with ``n_group > 1`` a group's
    score is the sum of its top-2 and groups outside the ``topk_group`` best are dropped (-inf); the ``top_k`` best
    experts are kept (`rank_select`); weights are their unbiased scores, divided by their sum + 1e-20 when
    ``norm_topk_prob``, times ``routed_scaling_factor`` (DeepSeek-V3 report section 2.1.2, eq. 12-16)."""
    scores = torch.sigmoid(F.linear(x, gate.weight))
    choice = scores + gate.e_score_correction_bias
    n, e = choice.shape
    if gate.n_group > 1:
        grouped = choice.view(n, gate.n_group, e // gate.n_group)
        top2 = torch.where(rank_select(grouped, 2), grouped, torch.zeros_like(grouped)).sum(-1)  # (N, G)
        keep = rank_select(top2, gate.topk_group)
        choice = grouped.masked_fill(torch.logical_not(keep[..., None]), float("-inf")).view(n, e)
    w = torch.where(rank_select(choice, gate.top_k), scores, torch.zeros_like(scores))
    if gate.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * gate.routed_scaling_factor


def dense_experts(experts: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_e weights[n, e] * expert_e(x[n])`` over every expert of a `reference.moe.Experts` (stacked SwiGLU
    weights), as three matmuls: ``x`` (N, H), ``weights`` (N, E) -> (N, H). The routing weight scales each expert's
    hidden activations before the down projection (the same sum, in another order)."""
    e, inter, h = experts.gate_proj.shape
    gate = x @ experts.gate_proj.reshape(e * inter, h).t()
    up = x @ experts.up_proj.reshape(e * inter, h).t()
    act = swiglu(gate, up).view(-1, e, inter) * weights[:, :, None]
    return act.reshape(-1, e * inter) @ experts.down_proj.transpose(1, 2).reshape(e * inter, h)


@contextlib.contextmanager
def _quiet_coremltools():
    """coremltools warns on import off macOS (no native runtime to load) and on every torch newer than it was tested
    with; these are expected here, so its logger shows errors only while we convert."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _readable_like_root(package: Path) -> None:
    """Give the package's files and folders the permissions of its top folder (coremltools' package writer makes
    some owner-only, 0600 / 0700, so another user could not load the model)."""
    mode = package.stat().st_mode & 0o777
    for p in package.rglob("*"):
        p.chmod(mode if p.is_dir() else mode & 0o666)


def _convert(ct, lm: CoreMLLM, tokens: int):
    """Export ``lm`` for ``tokens`` tokens a call (`torch.export` with static shapes: coremltools' TorchScript path
    breaks on numpy >= 2.4, which refuses ``int()`` of the 1-element arrays it makes of traced sizes) and convert it
    to a stateful ML Program (an ``MLModel``)."""
    example = (torch.zeros(1, tokens, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    with torch.no_grad():
        program = torch.export.export(lm, example).run_decompositions({})
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
              for name, shape in lm.state_shapes().items()]
    ml = ct.convert(
        program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
        inputs=[ct.TensorType(name="input_ids", shape=(1, tokens), dtype=np.int32),
                ct.TensorType(name="position", shape=(1,), dtype=np.int32)],
        outputs=[ct.TensorType(name="logits", dtype=np.float32)], states=states,
        compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    ml.input_description["input_ids"] = f"(1, {tokens}) token ids at positions position .. position + {tokens - 1}"
    ml.input_description["position"] = "(1,) position of the first token: the number of tokens already cached"
    ml.output_description["logits"] = f"(1, {tokens}, vocab_size) next-token logits of each token"
    return ml


def write_coreml(model: nn.Module, path: str | Path, prefill_len: int | None = None, context_len: int | None = None
                 ) -> dict:
    """Write ``model`` (a float32 `reference.Model`, eval mode) to the ``.mlpackage`` ``path`` (created; its parent
    must exist): functions ``prefill`` (``prefill_len`` tokens a call) and ``decode`` (one token, the default
    function) over a latent cache of ``context_len`` positions in float16 states that both functions share, float32
    compute (module docstring). Lengths default as `resolve_lengths` says.

    Returns ``{"prefill_len", "context_len", "functions", "states"}`` (``states``: the number of state tensors).
    Raises `ExportError` for a model `check_coreml` refuses, lengths out of range or a model that is not float32
    on the CPU; coremltools' own errors otherwise."""
    prefill_len, context_len = check_coreml(model.config, prefill_len, context_len)
    bad = sorted({f"{p.dtype} on {p.device}" for p in model.parameters()
                  if p.dtype != torch.float32 or p.device.type != "cpu"})
    if bad:
        raise ExportError(f"--format coreml: expected a float32 model on the CPU, got parameters in {', '.join(bad)}")
    c = model.config
    lm = CoreMLLM(model, context_len).eval()
    with _quiet_coremltools(), tempfile.TemporaryDirectory(prefix="dsfs-coreml-") as tmp:
        import coremltools as ct

        desc = ct.utils.MultiFunctionDescriptor()
        for name, tokens in zip(FUNCTIONS, (prefill_len, 1), strict=True):
            part = Path(tmp) / f"{name}.mlpackage"
            _convert(ct, lm, tokens).save(str(part))
            desc.add_function(str(part), src_function_name="main", target_function_name=name)
        desc.default_function_name = "decode"
        merged = Path(tmp) / "merged.mlpackage"
        ct.utils.save_multifunction(desc, str(merged))  # weights shared by the functions are stored once
        ml = ct.models.MLModel(str(merged), skip_model_load=True)
        ml.short_description = (
            f"{c.model_type} causal LM exported by dsfs: 'prefill' runs {prefill_len} tokens, 'decode' one, at "
            f"positions position.. over a float16 MLA latent cache of {context_len} positions (state from "
            "make_state(), shared by both functions); right-pad a short prompt and continue at its real length")
        meta = ml.user_defined_metadata
        meta["dsfs.model_type"], meta["dsfs.vocab_size"] = c.model_type, str(c.vocab_size)
        meta["dsfs.prefill_len"], meta["dsfs.context_len"] = str(prefill_len), str(context_len)
        ml.save(str(path))
    _readable_like_root(Path(path))
    return {"prefill_len": prefill_len, "context_len": context_len, "functions": list(FUNCTIONS),
            "states": len(lm.state_shapes())}
