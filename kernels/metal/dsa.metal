// DeepSeek Sparse Attention (V3.2): the lightning indexer's scores and its causal top-k.
// Semantics: reference/dsa.py Indexer.scores / Indexer.select (DeepSeek-V3.2-Exp report eq. 1, sec. 2.1).

// @kernel indexer_scores
// One thread per score (b, t, s): I = sum_h w[b,t,h] * relu(scale * q[b,t,h,:] . k[b,s,:]).
// Inputs: q (B, TQ, H, D) T, k (B, S, D) KT, w (B, TQ, H) WT, scale scalar float.
// Output: scores (B, TQ, S) float32 (unmasked).
uint i = thread_position_in_grid.x;
if (i >= uint(B * TQ * S)) {
  return;
}
uint s = i % S;
uint t = (i / S) % TQ;
uint b = i / (S * TQ);
float total = 0.0f;
for (int h = 0; h < H; h++) {
  uint qrow = ((b * TQ + t) * H + h) * D;
  float dot = 0.0f;
  for (int d = 0; d < D; d++) {
    dot += float(q[qrow + d]) * float(k[(b * S + s) * D + d]);
  }
  total += float(w[(b * TQ + t) * H + h]) * metal::max(dot * scale, 0.0f);
}
scores[i] = total;

// @kernel indexer_topk
// One threadgroup of TILE threads per query row (b, t). Query t sees the nvis = S - TQ + t + 1 first keys.
// Each visible key s counts the visible keys ranked before it (higher score, or equal score and earlier);
// scores are streamed through a TILE-float threadgroup tile; a NaN counts as +inf (torch.sort puts NaN first),
// so the ranks are a permutation of 0..nvis-1 whatever the scores. A key of rank < K writes s to slot rank;
// slots nvis..K-1 get -1. Input: scores (B, TQ, S) float32. Output: topk_idx (B, TQ, K) int32.
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint t = row % TQ;
uint nvis = S - TQ + t + 1;
threadgroup float tile[TILE];
for (uint base = 0; base < nvis; base += TILE) {
  uint s = base + tid;
  bool mine = s < nvis;
  float v = mine ? scores[row * S + s] : 0.0f;
  v = metal::isnan(v) ? INFINITY : v;  // a NaN ranks first, as in torch.sort: ranks stay a permutation
  uint rank = 0;
  for (uint cb = 0; cb < nvis; cb += TILE) {
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    if (cb + tid < nvis) {
      float u = scores[row * S + cb + tid];
      tile[tid] = metal::isnan(u) ? INFINITY : u;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    uint lim = metal::min(uint(TILE), nvis - cb);
    if (mine) {
      for (uint j = 0; j < lim; j++) {
        float u = tile[j];
        rank += (u > v || (u == v && cb + j < s)) ? 1u : 0u;
      }
    }
  }
  if (mine && rank < uint(K)) {
    topk_idx[row * K + rank] = int(s);
  }
}
for (uint j = nvis + tid; j < uint(K); j += TILE) {
  topk_idx[row * K + j] = -1;
}
