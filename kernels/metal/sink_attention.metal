// DeepSeek-V4's attention core: shared-KV MQA with a learned sink logit per head, over the rows each query selects
// by index. Semantics: reference/sink_attention.py sink_attention (V4 report section 2.3; Xiao et al. 2023).
// Indices reach the kernels as int32, already -1 wherever outside [0, L) (runtime_mlx/kernels/sink_attention.py).

// @kernel sink_attention_fwd
// One threadgroup of NSG simdgroups per query (b, s) and group of NSG heads: simdgroup j takes head
// (group * NSG + j), its lanes holding DL = ceil(D / 32) features of q and of the accumulator. MQA: the heads of a
// query read the same rows, so the threadgroup stages TN of them at a time (float, in threadgroup memory) and every
// simdgroup reads them from there. Online softmax over the valid rows, then the sink joins the normalizer.
// Inputs: q (B, S, H, D) T, kv (B, L, D) T, sinks (H,) float32, indices (B, S, K) int32, scale scalar float.
// Outputs: o (B, S, H, D) T, lse (B, S, H) float32 (natural log-sum-exp of [logits; sink], for the backward).
constexpr int DL = (D + 31) / 32;
uint group = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint query = group / HG;  // b * S + s
uint b = query / S;
uint h = (group % HG) * NSG + sg;
bool live = h < uint(H);
uint row = query * H + (live ? h : 0);
threadgroup float tile[TN * D];
threadgroup int rows[TN];
float qv[DL];
float acc[DL];
for (int i = 0; i < DL; i++) {
  uint f = lane + 32 * i;
  qv[i] = f < uint(D) ? float(q[row * D + f]) : 0.0f;
  acc[i] = 0.0f;
}
float m = -INFINITY;
float l = 0.0f;
for (uint c = 0; c < uint(K); c += TN) {
  uint n = metal::min(uint(TN), uint(K) - c);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // the previous tile is consumed
  if (tid < n) {
    rows[tid] = indices[query * K + c + tid];
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  for (uint e = tid; e < n * D; e += NSG * 32) {
    int r = rows[e / D];
    tile[e] = r >= 0 ? float(kv[(b * L + r) * D + e % D]) : 0.0f;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (live) {
    for (uint j = 0; j < n; j++) {
      if (rows[j] < 0) {
        continue;
      }
      float dot = 0.0f;
      for (int i = 0; i < DL; i++) {
        uint f = lane + 32 * i;
        dot += f < uint(D) ? qv[i] * tile[j * D + f] : 0.0f;
      }
      dot = metal::simd_sum(dot) * scale;
      float m_new = metal::max(m, dot);
      float corr = metal::exp(m - m_new);
      float p = metal::exp(dot - m_new);
      l = l * corr + p;
      for (int i = 0; i < DL; i++) {
        uint f = lane + 32 * i;
        acc[i] = acc[i] * corr + (f < uint(D) ? p * tile[j * D + f] : 0.0f);
      }
      m = m_new;
    }
  }
}
if (live) {
  float sink = sinks[h];
  float mf = metal::max(m, sink);
  mf = mf == -INFINITY ? 0.0f : mf;  // only with a sink of -inf and no valid row
  float alpha = metal::exp(m - mf);
  float total = l * alpha + metal::exp(sink - mf);
  float w = total > 0.0f ? alpha / total : 0.0f;
  for (int i = 0; i < DL; i++) {
    uint f = lane + 32 * i;
    if (f < uint(D)) {
      o[row * D + f] = T(acc[i] * w);
    }
  }
  if (lane == 0) {
    lse[row] = mf + metal::log(total);
  }
}

// @kernel sink_attention_bwd_dq
// dq = scale * sum_k p_k (do . kv_k - delta) kv_k with p_k = exp(scale q . kv_k - lse), for one query and NSG heads
// per threadgroup, rows staged as in sink_attention_fwd. Inputs: q, do (B, S, H, D) T, kv (B, L, D) T, indices
// (B, S, K) int32, lse, delta (B, S, H) float32 (delta = o . do), scale scalar float. Output: dq (B, S, H, D) T.
constexpr int DL = (D + 31) / 32;
uint group = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint query = group / HG;
uint b = query / S;
uint h = (group % HG) * NSG + sg;
bool live = h < uint(H);
uint row = query * H + (live ? h : 0);
threadgroup float tile[TN * D];
threadgroup int rows[TN];
float qv[DL];
float dov[DL];
float acc[DL];
for (int i = 0; i < DL; i++) {
  uint f = lane + 32 * i;
  qv[i] = f < uint(D) ? float(q[row * D + f]) : 0.0f;
  dov[i] = f < uint(D) ? float(d_o[row * D + f]) : 0.0f;
  acc[i] = 0.0f;
}
float lse_r = lse[row];
float delta_r = delta[row];
for (uint c = 0; c < uint(K); c += TN) {
  uint n = metal::min(uint(TN), uint(K) - c);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (tid < n) {
    rows[tid] = indices[query * K + c + tid];
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  for (uint e = tid; e < n * D; e += NSG * 32) {
    int r = rows[e / D];
    tile[e] = r >= 0 ? float(kv[(b * L + r) * D + e % D]) : 0.0f;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (live) {
    for (uint j = 0; j < n; j++) {
      if (rows[j] < 0) {
        continue;
      }
      float dot = 0.0f;
      float dp = 0.0f;
      for (int i = 0; i < DL; i++) {
        uint f = lane + 32 * i;
        float x = f < uint(D) ? tile[j * D + f] : 0.0f;
        dot += qv[i] * x;
        dp += dov[i] * x;
      }
      float p = metal::exp(metal::simd_sum(dot) * scale - lse_r);
      float ds = p * (metal::simd_sum(dp) - delta_r);
      for (int i = 0; i < DL; i++) {
        uint f = lane + 32 * i;
        acc[i] += f < uint(D) ? ds * tile[j * D + f] : 0.0f;
      }
    }
  }
}
if (live) {
  for (int i = 0; i < DL; i++) {
    uint f = lane + 32 * i;
    if (f < uint(D)) {
      dq[row * D + f] = T(acc[i] * scale);
    }
  }
}

// @kernel sink_attention_bwd_dkv
// One simdgroup per row (b, l) of kv, NSG rows per threadgroup; deterministic, no atomics: the queries that selected
// the row are listed (in query order) in src[b, start[b, l] .. start[b, l + 1]), and for each of them and each head
// dkv_l += p do + scale * p (do . kv_l - delta) q, p = exp(scale q . kv_l - lse). Rows nobody selected get zeros.
// Inputs: q, do (B, S, H, D) T, kv (B, L, D) T, lse, delta (B, S, H) float32, src (B, S * K) int32, start
// (B, L + 1) int32, scale scalar float. Output: dkv (B, L, D) T.
constexpr int DL = (D + 31) / 32;
uint lane = thread_index_in_simdgroup;
uint kvrow = threadgroup_position_in_grid.x * NSG + simdgroup_index_in_threadgroup;  // b * L + l
if (kvrow >= uint(B * L)) {
  return;
}
uint b = kvrow / L;
float x[DL];
float acc[DL];
for (int i = 0; i < DL; i++) {
  uint f = lane + 32 * i;
  x[i] = f < uint(D) ? float(kv[kvrow * D + f]) : 0.0f;
  acc[i] = 0.0f;
}
int first = start[kvrow + b];  // start is (B, L + 1)
int last = start[kvrow + b + 1];
for (int e = first; e < last; e++) {
  uint query = b * S + src[b * S * K + e];
  for (int h = 0; h < H; h++) {
    uint row = query * H + h;
    float dot = 0.0f;
    float dp = 0.0f;
    for (int i = 0; i < DL; i++) {
      uint f = lane + 32 * i;
      if (f < uint(D)) {
        dot += float(q[row * D + f]) * x[i];
        dp += float(d_o[row * D + f]) * x[i];
      }
    }
    float p = metal::exp(metal::simd_sum(dot) * scale - lse[row]);
    float ds = p * (metal::simd_sum(dp) - delta[row]) * scale;
    for (int i = 0; i < DL; i++) {
      uint f = lane + 32 * i;
      if (f < uint(D)) {
        acc[i] += p * float(d_o[row * D + f]) + ds * float(q[row * D + f]);
      }
    }
  }
}
for (int i = 0; i < DL; i++) {
  uint f = lane + 32 * i;
  if (f < uint(D)) {
    dkv[kvrow * D + f] = T(acc[i]);
  }
}
