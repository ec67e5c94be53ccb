"""DeepSeek-V4 (V4 technical report, 2026-04-24): its hybrid attention beside MLA and DSA, its KV cache beside
V3.2's, and the cost of mHC's residual streams beside a plain residual.

Attention layer (`V4_SHAPE`): DeepSeek-V4-Flash's attention scaled down for a CPU: hidden 512 (V4-Flash 4096), 8 query
heads (64) over one shared key-value head of width 128 (512), RoPE on the last 16 features (64; the same 1/8),
q_lora_rank 128 (1024), 2 output groups of o_lora_rank 128 (8 of 1024); the sequence-side sizes are V4-Flash's own:
sliding window 128, CSA compresses 4 tokens per entry and its indexer (8 heads of 32; V4-Flash 64 of 128) keeps the
top 512 entries, HCA compresses 128 tokens per entry. MLA and DSA (`V3_SHAPE`) use the same hidden size and heads,
with DeepSeek-V3's head sizes scaled by the same 1/4: kv_lora_rank 128 (512), qk_nope 32 (128), qk_rope 16 (64),
v 32 (128), q_lora_rank 128; DSA's indexer (8 heads of 32) keeps V3.2's top 2048 tokens (the tokens V4's 512 entries
of 4 cover). One decoder layer per checkpoint (dense FFN for MLA/DSA); float32.

- `Prefill`: one layer over (1, T, 512), causal, no cache, for T in `CONTEXTS`: forward and forward+backward
  (gradients of the layer's parameters), seconds per call; ``track_peak_mib_forward``: MiB the forward needs beyond
  its inputs (`bench.common.peak_mib`). Shapes whose largest intermediates (`prefill_bytes`) would not fit the
  device's free memory are skipped.
- `Decode`: one new token (batch 1) against a cache filled to T tokens (filled `FILL_CHUNK` tokens at a time),
  forward only, seconds per step; the cache is restored after each step.
- `KVCache`: bytes per token of DeepSeek-V4-Flash's KV cache (`V4_FLASH`: 43 layers, transformers'
  ``DeepseekV4Config`` defaults, bfloat16) from the layout of `reference.v4_model.V4Cache` (`v4_cache_bytes`),
  of DeepSeek-V3.2's (`v32_cache_bytes`), and the ratio, at contexts 8k..1M (``track_``).
- `MHC` / `MHCOverhead`: mHC around one block, ``HyperConnection`` (`reference.mhc.mhc_pre`) and `mhc_post`, on
  (1, T, 4, 4096) float32 streams, against the plain residual ``x + block_out`` on (1, T, 4096): forward and
  forward+backward (gradients of the streams, the block output and the mHC parameters), and their ratio.

Backends (`BACKENDS`): ``reference`` (plain PyTorch, CUDA when present); ``cuda`` (an NVIDIA GPU):
`runtime_cuda.v4_model` (Triton sink attention and gated pooling; the indexer's scores stay torch), the Triton mHC
kernels, `runtime_cuda` for MLA/DSA; ``mlx``: `runtime_mlx.v4_model` and `runtime_mlx.kernels.mhc` (Metal kernels on
Apple silicon, pure MLX elsewhere; skipped where they do not import); ``transformers``: the peer,
``DeepseekV4Attention`` / ``DeepseekV4HyperConnection`` (``DeepseekV3Attention`` / ``DeepseekV32Attention`` for the
MLA and DSA rows). mlx-lm has no DeepSeek-V4. ``python -m bench.v4`` prints the KV table (and writes it to
``bench/results/v4_kv_cache.md``) and one timing row per component at the smallest sizes (``--quick``: smaller).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

from dsfs.bench import as_tuple

from . import attention, common
from .common import Suite, skip

SW, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_KINDS = {"sliding": SW, "csa": CSA, "hca": HCA}
KINDS = ["sliding", "csa", "hca", "mla", "dsa"]
BACKENDS = ["reference", "cuda", "mlx", "transformers"]
CONTEXTS = [1024, 4096, 16384]
FILL_CHUNK = 1024
QUICK_CONTEXT = 256  # ``python -m bench.v4 --quick``
HIDDEN = 512

V4_SHAPE = dict(vocab_size=256, hidden_size=HIDDEN, moe_intermediate_size=128, num_attention_heads=8, head_dim=128,
                partial_rotary_factor=0.125, q_lora_rank=128, o_groups=2, o_lora_rank=128, sliding_window=128,
                compress_rates={CSA: 4, HCA: 128}, index_n_heads=8, index_head_dim=32, index_topk=512,
                n_routed_experts=2, num_experts_per_tok=1, max_position_embeddings=32768)
V3_SHAPE = dict(hidden_size=HIDDEN, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32, index_n_heads=8, index_head_dim=32, index_topk=2048,
                max_position_embeddings=32768, moe_type="dense", first_k_dense_replace=1)

# DeepSeek-V4-Flash as transformers' DeepseekV4Config defaults (43 layers: 23 HCA, 20 CSA), for the KV table.
V4_FLASH = dict(vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
                num_attention_heads=64, head_dim=512, partial_rotary_factor=0.125, q_lora_rank=1024, o_groups=8,
                o_lora_rank=1024, sliding_window=128, compress_rates={CSA: 4, HCA: 128}, index_n_heads=64,
                index_head_dim=128, index_topk=512, n_routed_experts=256, num_experts_per_tok=6,
                max_position_embeddings=1048576)
# DeepSeek-V3.2's cache per token and layer: MLA's latent and shared RoPE key, and the DSA indexer's key.
V32 = dict(num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128)
KV_CONTEXTS = [8192, 32768, 131072, 524288, 1048576]
KV_ITEMSIZE = 2  # bfloat16
REPORT_RATIO_1M = 0.07  # V4 report: V4-Flash's KV cache at 1M tokens is about 7% of V3.2's

MHC_HIDDEN, HC_MULT, HC_ITERS, HC_EPS, RMS_EPS = 4096, 4, 20, 1e-6, 1e-6
MHC_KINDS = ["mhc", "residual"]
TOKENS = [256, 1024, 4096]
PREFILL_COPIES = 8  # `prefill_bytes`: float32 copies of the largest intermediate a forward+backward may hold


# ----------------------------------------------------------------------------------------------------- configs
def v4_config(kind: str, **over):
    """The one-layer `reference.v4_config.V4Config` of V4 attention ``kind`` (sliding, csa, hca) at `V4_SHAPE`."""
    from reference.v4_config import V4Config

    return V4Config(**{**V4_SHAPE, "num_hidden_layers": 1, "layer_types": [V4_KINDS[kind]],
                       "mlp_layer_types": ["moe"], **over})


def v3_config(kind: str):
    """The one-layer `reference.ModelConfig` of ``kind`` 'mla' or 'dsa' at `V3_SHAPE`."""
    over = dict(attention_type="dsa", model_type="deepseek_v32") if kind == "dsa" else dict(attention_type="mla")
    return common.config(**V3_SHAPE, **over)


_TEMP_DIRS: list = []


def v4_checkpoint(cfg, seed: int = 0) -> str:
    """Write `reference.v4_model.V4Model` of ``cfg`` (seeded ``init_weights``) as a checkpoint directory (removed when
    the process exits) and return its path."""
    import torch

    from reference.v4_model import V4Model

    torch.manual_seed(seed)
    tmp = tempfile.TemporaryDirectory(prefix="dsfs-bench-v4-")
    _TEMP_DIRS.append(tmp)
    path = os.path.join(tmp.name, "model")
    V4Model(cfg).save_pretrained(path)
    return path


def free_bytes(backend: str) -> int:
    """Free memory of the device ``backend`` runs on: CUDA's free memory for the torch backends on a GPU, else the
    host's available memory (MLX on Apple silicon shares it)."""
    if backend not in common.MLX_BACKENDS:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def prefill_bytes(backend: str, kind: str, seq_len: int) -> int:
    """A rough bound on the memory one prefill forward+backward of ``kind`` over ``seq_len`` tokens needs: the
    largest float32 intermediate times `PREFILL_COPIES`. Dense score matrices (heads x queries x keys) for
    transformers' V4 attention (a mask over the window and every compressed entry) and for MLA and DSA; our V4 layer
    gathers each query's rows (queries x selected rows x head_dim) and its logits; CSA's indexer scores every
    compressed entry (indexer heads x queries x entries)."""
    s, h = seq_len, V4_SHAPE["num_attention_heads"]
    if kind in ("mla", "dsa"):
        big = h * s * s
    else:
        m = V4_SHAPE["compress_rates"].get(V4_KINDS[kind], 0)
        entries = s // m if m else 0
        picked = {"sliding": 0, "csa": min(V4_SHAPE["index_topk"], entries), "hca": entries}[kind]
        if backend == "transformers":
            big = h * s * (s + entries)
        else:
            big = s * (V4_SHAPE["sliding_window"] + picked) * max(h, V4_SHAPE["head_dim"])
        if kind == "csa":
            big = max(big, V4_SHAPE["index_n_heads"] * s * entries)
    return PREFILL_COPIES * 4 * big


# ----------------------------------------------------------------------------------------------------- layers
def _snapshot(objs) -> list:
    """The attributes of ``objs`` (cache objects), dict-valued ones copied one level down."""
    return [(o, {k: dict(v) if isinstance(v, dict) else v for k, v in vars(o).items()}) for o in objs]


def _restore(snap) -> None:
    for o, saved in snap:
        vars(o).update({k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()})


def _chunked_fill(layer, x) -> None:
    """Run ``x`` (B, L, hidden) through ``layer`` (a `V4Layer` or `V3Layer`) into a fresh cache, `FILL_CHUNK` tokens
    per call, without gradients; sets ``layer.cache`` and ``layer.offset``."""
    layer.cache, length = layer._new_cache(), x.shape[1]
    with common.no_grad(layer.backend):
        for at in range(0, length, FILL_CHUNK):
            common.sync(layer.backend, common.first(layer._call(x[:, at:at + FILL_CHUNK], layer.cache, at)))
    layer.offset = length


def require(backend: str, what: str = "attention") -> None:
    """`bench.common.require` plus what the V4 rows need (``what``: 'attention' or 'mhc'): `runtime_cuda.v4_model`
    (``cuda``), `runtime_mlx.v4_model` or `runtime_mlx.kernels.mhc` (``mlx``), transformers' DeepSeek-V4."""
    common.require(backend)
    if backend == "cuda":
        common.import_or_skip("runtime_cuda.v4_model", "V4Model")
    elif backend == "mlx":
        common.import_or_skip(*(("runtime_mlx.v4_model", "V4Model") if what == "attention" else
                                ("runtime_mlx.kernels.mhc", "mhc_pre")))
    elif backend == "transformers":
        common.import_or_skip("transformers.models.deepseek_v4.modeling_deepseek_v4", "DeepseekV4Attention")


class V4Layer:
    """One backend's V4 attention layer of ``kind`` (sliding, csa, hca), loaded from the shared checkpoint ``path``,
    with the calls the suites time: ``prefill(x)`` (causal, no cache), ``fill(x)`` (into a fresh cache) and
    ``decode(x)`` (one step; the cache is restored after it)."""

    def __init__(self, backend: str, kind: str, path: str):
        require(backend)
        self.backend, self.kind = backend, kind
        if backend in ("reference", "cuda"):
            module = "reference.v4_model" if backend == "reference" else "runtime_cuda.v4_model"
            model = common.import_or_skip(module, "V4Model").V4Model.from_pretrained(path)
            self.model = model.to(common.torch_device()).eval()
        elif backend == "mlx":
            self.model = common.import_or_skip("runtime_mlx.v4_model", "V4Model").V4Model.from_pretrained(path)
        else:
            import logging

            import torch
            import transformers

            logging.getLogger("transformers").setLevel(logging.ERROR)
            transformers.utils.logging.disable_progress_bar()
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            self.model = self.model.to(common.torch_device()).eval()
        self.attn = self.model.model.layers[0].self_attn
        self.cache, self.offset, self.saved = None, 0, []

    def _call(self, x, cache=None, offset: int = 0):
        if self.backend != "transformers":
            return self.attn(x, offset, cache)
        import torch
        from transformers.masking_utils import create_sliding_window_causal_mask

        pos = torch.arange(offset, offset + x.shape[1], device=x.device)[None]
        rotary = self.model.model.rotary_emb
        emb = {t: rotary(x, position_ids=pos, layer_type=t) for t in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=self.model.config, inputs_embeds=x, attention_mask=None,
                                                 cache=cache, position_ids=pos)
        return self.attn(x, position_embeddings=emb, position_ids=pos, attention_mask=mask, cache=cache)[0]

    def _new_cache(self):
        if self.backend == "transformers":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        return self.model.new_cache().layers[0]

    def _cache_objects(self) -> list:
        if self.backend == "transformers":
            return list(self.cache.layers)
        return [self.cache, *self.cache.states.values()]

    def prefill(self, x):
        return self._call(x)

    def fill(self, x):
        _chunked_fill(self, x)
        self.saved = _snapshot(self._cache_objects())

    def decode(self, x):
        out = common.first(self._call(x, self.cache, self.offset))
        common.sync(self.backend, out)
        _restore(self.saved)
        return out


class V3Layer(attention.Layer):
    """`bench.attention.Layer` for the MLA and DSA rows: MLA in each backend's own form (ours: naive in prefill,
    absorbed when decoding), the cache filled `FILL_CHUNK` tokens at a time."""

    def __init__(self, backend: str, kind: str, path: str):
        super().__init__(backend, "mla_naive" if kind == "mla" else "dsa", path)
        if backend in common.OURS and kind == "mla":
            self.attn.absorb = None

    def fill(self, x):
        _chunked_fill(self, x)
        self.saved = [dict(d) for d in self._cache_state() or []]


def layer(backend: str, kind: str):
    """The `V4Layer` or `V3Layer` of ``kind`` for ``backend`` on a fresh seeded checkpoint."""
    if kind in V4_KINDS:
        return V4Layer(backend, kind, v4_checkpoint(v4_config(kind)))
    return V3Layer(backend, kind, common.checkpoint(v3_config(kind)))


class Prefill(Suite):
    """One attention layer over (1, T, 512), causal, no cache: forward and forward+backward (seconds), and the
    forward's peak memory beyond its inputs (MiB)."""

    params = [BACKENDS, KINDS, CONTEXTS]
    param_names = ["backend", "kind", "context"]

    def setup(self, backend, kind, context):
        common.require(backend)
        need, free = prefill_bytes(backend, kind, context), free_bytes(backend)
        if need > free:
            skip(f"{backend} {kind} prefill of {context} tokens: needs about {need / 2**30:.1f} GiB, "
                 f"{free / 2**30:.1f} GiB free")
        self.layer = layer(backend, kind)
        self.x = common.array(backend, (1, context, HIDDEN), seed=1)
        self.step = common.forward_backward(backend, self.layer.prefill, self.layer.attn)

    def time_forward(self, backend, kind, context):
        with common.no_grad(backend):
            common.sync(backend, common.first(self.layer.prefill(self.x)))

    def time_forward_backward(self, backend, kind, context):
        self.step(self.x)

    def track_peak_mib_forward(self, backend, kind, context):
        self.time_forward(backend, kind, context)  # warm-up: libraries and kernels loaded, caches filled
        return common.peak_mib(backend, lambda: self.time_forward(backend, kind, context))

    track_peak_mib_forward.unit = "MiB"


class Decode(Suite):
    """One decode step of one attention layer: a (1, 1, 512) token against a cache of T tokens (seconds)."""

    params = [BACKENDS, KINDS, CONTEXTS]
    param_names = ["backend", "kind", "context"]

    def setup(self, backend, kind, context):
        common.require(backend)
        self.layer = layer(backend, kind)
        self.layer.fill(common.array(backend, (1, context, HIDDEN), seed=1))
        self.x = common.array(backend, (1, 1, HIDDEN), seed=2)

    def time_decode(self, backend, kind, context):
        with common.no_grad(backend):
            self.layer.decode(self.x)


# ----------------------------------------------------------------------------------------------------- KV cache
def _compressor_elements(tokens: int, m: int, d: int, overlap: bool) -> int:
    """Elements a `reference.compressor.CompressorState` holds after ``tokens`` tokens at ``m`` tokens per entry of
    width ``d``: the closed windows' entries (tokens // m, d), the open window's projected kv and gate rows
    (tokens % m, C each; C = 2 d with ``overlap``), and with ``overlap`` (CSA) the last closed window's first halves
    of kv and gate (m, d each) once a window has closed."""
    width = 2 * d if overlap else d
    prior = 2 * m * d if overlap and tokens >= m else 0
    return tokens // m * d + 2 * (tokens % m) * width + prior


def v4_cache_bytes(cfg, tokens: int, itemsize: int = KV_ITEMSIZE) -> int:
    """Bytes `reference.v4_model.V4Cache` holds for one sequence of ``tokens`` tokens of the V4 model ``cfg``
    (`reference.v4_config.V4Config`), every tensor ``itemsize`` bytes per element (the model's dtype): per layer the
    sliding window's last min(tokens, sliding_window - 1) key-value rows of head_dim; on CSA/HCA layers the
    compressor's state (`_compressor_elements` at head_dim; overlapping windows on CSA) and on CSA layers the
    indexer's (at index_head_dim, overlapping). Equals ``V4Cache.nbytes()`` (checked in tests/test_bench_v4.py)."""
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += min(tokens, cfg.sliding_window - 1) * cfg.head_dim
        m = cfg.compress_rate(i)
        if m:
            csa = cfg.layer_type(i) == CSA
            total += _compressor_elements(tokens, m, cfg.head_dim, csa)
            if csa:
                total += _compressor_elements(tokens, m, cfg.index_head_dim, True)
    return total * itemsize


def v32_cache_bytes(tokens: int, itemsize: int = KV_ITEMSIZE, num_hidden_layers: int = V32["num_hidden_layers"],
                    kv_lora_rank: int = V32["kv_lora_rank"], qk_rope_head_dim: int = V32["qk_rope_head_dim"],
                    index_head_dim: int = V32["index_head_dim"]) -> int:
    """Bytes DeepSeek-V3.2's cache holds for one sequence of ``tokens`` tokens: per token and layer MLA's latent
    ``c_kv`` (kv_lora_rank) and shared RoPE key ``k_pe`` (qk_rope_head_dim), plus the DSA indexer's key
    (index_head_dim), all ``itemsize`` bytes per element (the layout of `reference.cache.KVCache` for DSA)."""
    return tokens * num_hidden_layers * (kv_lora_rank + qk_rope_head_dim + index_head_dim) * itemsize


def v4_flash_config():
    """`reference.v4_config.V4Config` of DeepSeek-V4-Flash (`V4_FLASH`; layer_types from the defaults)."""
    from reference.v4_config import V4Config

    return V4Config(**V4_FLASH)


def kv_rows(contexts=KV_CONTEXTS) -> list[dict]:
    """One dict per context: V4-Flash's and V3.2's bytes per token and GiB per sequence (bfloat16), and the ratio."""
    cfg, rows = v4_flash_config(), []
    for n in contexts:
        v4, v32 = v4_cache_bytes(cfg, n), v32_cache_bytes(n)
        rows.append(dict(context=n, v4_per_token=v4 / n, v32_per_token=v32 / n, v4_gib=v4 / 2**30,
                         v32_gib=v32 / 2**30, ratio=v4 / v32))
    return rows


def kv_table(rows: list[dict]) -> str:
    """The markdown table of `kv_rows`."""
    lines = ["| context | V4-Flash bytes/token | V3.2 bytes/token | V4-Flash GiB | V3.2 GiB | V4-Flash / V3.2 |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']:,} | {r['v4_per_token']:,.0f} | {r['v32_per_token']:,.0f} | "
                     f"{r['v4_gib']:.2f} | {r['v32_gib']:.2f} | {100 * r['ratio']:.2f}% |")
    return "\n".join(lines)


class KVCache(Suite):
    """KV-cache bytes per token for one sequence of T tokens (bfloat16): DeepSeek-V4-Flash (`v4_cache_bytes`) and
    DeepSeek-V3.2 (`v32_cache_bytes`), and V4-Flash's as a fraction of V3.2's."""

    params = [KV_CONTEXTS]
    param_names = ["context"]
    unit = "bytes"

    def track_v4_flash_bytes_per_token(self, context):
        return v4_cache_bytes(v4_flash_config(), context) / context

    def track_v32_bytes_per_token(self, context):
        return v32_cache_bytes(context) / context

    def track_v4_over_v32(self, context):
        return v4_cache_bytes(v4_flash_config(), context) / v32_cache_bytes(context)

    track_v4_over_v32.unit = "ratio"


# ----------------------------------------------------------------------------------------------------- mHC
class Residual:
    """One backend's residual around a block over T tokens: ``kind`` 'mhc' (the mixes of `HC_MULT` streams of width
    `MHC_HIDDEN` before the block, the post-mix after it) or 'residual' (``x + block_out``). ``call(*inputs)`` returns
    the new residual (for mHC also the block input); ``module`` holds the torch parameters whose gradients
    forward+backward computes besides the inputs' (MLX: the parameters are inputs).

    mHC per backend: reference `reference.mhc.HyperConnection` + `reference.mhc.mhc_post`; cuda
    `runtime_cuda.v4_model.HyperConnection` + `kernels.triton.mhc.mhc_post`; mlx `runtime_mlx.kernels.mhc` (Metal or
    pure MLX); transformers ``DeepseekV4HyperConnection`` + ``DeepseekV4DecoderLayer``'s stream update."""

    def __init__(self, backend: str, kind: str, tokens: int):
        require(backend, "mhc")
        self.backend, self.module = backend, None
        mlx = backend in common.MLX_BACKENDS
        n, d = HC_MULT, MHC_HIDDEN
        block_out = common.array(backend, (1, tokens, d), seed=2)
        if kind == "residual":
            self.inputs, self.call = (common.array(backend, (1, tokens, d), seed=1), block_out), _add
        else:
            m = (2 + n) * n
            params = (common.array(backend, (m, n * d), seed=3) * (n * d) ** -0.5,  # fn, base, scale
                      common.array(backend, (m,), seed=4) * 0.1, common.array(backend, (3,), seed=5) * 0.1 + 1)
            self.inputs = (common.array(backend, (1, tokens, n, d), seed=1), block_out)
            if mlx:
                self.inputs, self.call = self.inputs + params, _mhc_mlx
            else:
                self.module, self.post = _torch_hc(backend, *params)
                self.call = self._mhc_torch
        if not mlx:
            for t in self.inputs:
                t.requires_grad_(True)
        self.step = common.forward_backward(backend, self.call, self.module)

    def forward(self) -> None:
        with common.no_grad(self.backend):
            common.sync(self.backend, *as_tuple(self.call(*self.inputs)))

    def forward_backward(self) -> None:
        self.step(*self.inputs)

    def _mhc_torch(self, streams, block_out):
        post, comb, collapsed = self.module(streams)
        return self.post(block_out, post, comb, streams), collapsed


def _add(x, block_out):
    return x + block_out


def _mhc_mlx(streams, block_out, fn, base, scale):
    from runtime_mlx.kernels import mhc

    collapsed, post, comb = mhc.mhc_pre(streams, fn, base, scale, HC_ITERS, HC_EPS, RMS_EPS)
    return mhc.mhc_post(block_out, post, comb, streams), collapsed


def _hf_post(block_out, post, comb, streams):
    """transformers' mHC post-mix, inline in ``DeepseekV4DecoderLayer.forward``."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ streams


def _torch_hc(backend: str, fn, base, scale):
    """``(module, post)``: ``backend``'s mHC mapping (a torch module with the parameters ``fn``, ``base``, ``scale``,
    on `bench.common.torch_device`) and its post-mix function (see `Residual`)."""
    import torch

    if backend == "transformers":
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

        hc = DeepseekV4HyperConnection(DeepseekV4Config(hidden_size=MHC_HIDDEN, hc_mult=HC_MULT, hc_eps=HC_EPS,
                                                        hc_sinkhorn_iters=HC_ITERS, rms_norm_eps=RMS_EPS))
        post = _hf_post
    elif backend == "cuda":
        from kernels.triton.mhc import mhc_post as post
        from runtime_cuda.v4_model import HyperConnection

        hc = HyperConnection(MHC_HIDDEN, HC_MULT, HC_ITERS, HC_EPS, RMS_EPS)
    else:
        from reference.mhc import HyperConnection
        from reference.mhc import mhc_post as post

        hc = HyperConnection(MHC_HIDDEN, HC_MULT, HC_ITERS, HC_EPS, RMS_EPS)
    with torch.no_grad():
        for name, value in (("fn", fn), ("base", base), ("scale", scale)):
            getattr(hc, name).copy_(value)
    return hc.to(common.torch_device()), post


class MHC(Suite):
    """mHC around one block against a plain residual, T tokens of width 4096, 4 streams, float32: forward and
    forward+backward (seconds). The block itself is not run: its output is an input."""

    params = [BACKENDS, MHC_KINDS, TOKENS]
    param_names = ["backend", "kind", "tokens"]

    def setup(self, backend, kind, tokens):
        self.r = Residual(backend, kind, tokens)

    def time_forward(self, backend, kind, tokens):
        self.r.forward()

    def time_forward_backward(self, backend, kind, tokens):
        self.r.forward_backward()


def _median_seconds(backend: str, fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        common.sync(backend)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MHCOverhead(Suite):
    """mHC's time over the plain residual's (`MHC`), median of `REPEAT` calls each, forward and forward+backward."""

    params = [BACKENDS, TOKENS]
    param_names = ["backend", "tokens"]
    unit = "ratio"
    REPEAT = 5

    def setup(self, backend, tokens):
        self.runs = {k: Residual(backend, k, tokens) for k in MHC_KINDS}

    def _ratio(self, backend, backward: bool) -> float:
        secs = {k: _median_seconds(backend, r.forward_backward if backward else r.forward, self.REPEAT)
                for k, r in self.runs.items()}
        return secs["mhc"] / secs["residual"]

    def track_forward_ratio(self, backend, tokens):
        return self._ratio(backend, False)

    def track_forward_backward_ratio(self, backend, tokens):
        return self._ratio(backend, True)


# ----------------------------------------------------------------------------------------------------- script
RESULTS = os.path.join(os.path.dirname(__file__), "results", "v4_kv_cache.md")


def kv_markdown() -> str:
    """The KV table as written to ``bench/results/v4_kv_cache.md``."""
    rows = kv_rows()
    at_1m = next(r for r in rows if r["context"] == 1048576)
    return (f"DeepSeek-V4-Flash's KV cache against DeepSeek-V3.2's, one sequence, bfloat16 (`python -m bench.v4`).\n"
            f"V4-Flash: 43 layers (20 CSA, 23 HCA: transformers' DeepseekV4Config defaults), head_dim 512, sliding "
            f"window 128, CSA 4 / HCA 128 tokens per entry, indexer keys of 128, layout of `reference.v4_model."
            f"V4Cache`. V3.2: 61 layers, MLA latent 512 + RoPE key 64 + DSA indexer key 128 per token and layer.\n\n"
            f"{kv_table(rows)}\n\nAt 1M tokens: {100 * at_1m['ratio']:.1f}% (the V4 report: about "
            f"{100 * REPORT_RATIO_1M:.0f}%).\n")


def _timing_rows(backend: str, context: int, tokens: int) -> list[tuple[str, float, float | None]]:
    """(what, forward seconds, forward+backward seconds or None) for one call per component on ``backend``."""
    rows = []
    for kind in KINDS:
        args, pre, dec = (backend, kind, context), Prefill(), Decode()
        pre.setup(*args)
        dec.setup(*args)
        rows += [(f"prefill {kind} ({context} tokens)", _median_seconds(backend, partial(pre.time_forward, *args), 1),
                  _median_seconds(backend, partial(pre.time_forward_backward, *args), 1)),
                 (f"decode {kind} (cache {context})", _median_seconds(backend, partial(dec.time_decode, *args), 3),
                  None)]
    for kind in MHC_KINDS:
        r = Residual(backend, kind, tokens)
        rows.append((f"{kind} ({tokens} x {MHC_HIDDEN})", _median_seconds(backend, r.forward, 3),
                     _median_seconds(backend, r.forward_backward, 3)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"context {QUICK_CONTEXT} (else {CONTEXTS[0]})")
    p.add_argument("--backend", default="reference", choices=BACKENDS)
    p.add_argument("--out", default=RESULTS, help="where the KV table goes ('-': nowhere)")
    p.add_argument("--no-timing", action="store_true", help="the KV table only")
    args = p.parse_args(argv)
    text = kv_markdown()
    print(text)
    if args.out != "-":
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.no_timing:
        return
    context = QUICK_CONTEXT if args.quick else CONTEXTS[0]
    try:
        rows = _timing_rows(args.backend, context, TOKENS[0])
    except NotImplementedError as e:
        print(f"{args.backend}: skipped ({e})", file=sys.stderr)
        return
    print(f"one call each on {args.backend} ({common.torch_device() if args.backend != 'mlx' else 'mlx'}), "
          "seconds (not a benchmark: see bench/README.md)")
    print(f"{'what':<32} {'forward':>10} {'fwd+bwd':>10}")
    for what, fwd, both in rows:
        print(f"{what:<32} {fwd:>10.4f} {'' if both is None else f'{both:.4f}':>10}")


if __name__ == "__main__":
    main()
