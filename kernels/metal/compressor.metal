// DeepSeek-V4's KV compressor pooling, forward and backward (launch data: runtime_mlx/kernels/compressor.py).
// Semantics: reference/compressor.py gated_pool. V4 report section 2.3.1 eqs. 9-12 (CSA), 2.3.2 eqs. 20-23 (HCA).
// One thread per output element (b, w, d); it walks the entry's S slots (m for HCA, 2 m for CSA) with an online
// softmax in float32. Template: T (kv dtype), BATCH, N (windows), L (tokens = N M), M, D, C (kv width), S (slots),
// OVERLAP, HAS_PRIOR (bools).

// The slot j of entry w (batch b, feature d): its flat index into kv / gate (>= 0), or PRIOR_SLOT when it is the
// prior row (b, j, d) (CSA, window 0, cached prior), or NO_SLOT (CSA, window 0, no prior: weight 0).
enum : int { PRIOR_SLOT = -1, NO_SLOT = -2 };

inline int slot_index(uint b, uint w, uint d, uint j, uint L, uint M, uint D, uint C, bool overlap,
                      bool has_prior) {
  if (!overlap) {
    return int((b * L + w * M + j) * C + d);
  }
  if (j >= M) {  // window w's second half
    return int((b * L + w * M + j - M) * C + D + d);
  }
  if (w > 0) {  // window w - 1's first half
    return int((b * L + (w - 1) * M + j) * C + d);
  }
  return has_prior ? PRIOR_SLOT : NO_SLOT;
}

// @kernel gated_pool_fwd
// Inputs: kv (BATCH, L, C), gate (BATCH, L, C), bias (M, C), prior_kv (BATCH, M, D) T, prior_gate (BATCH, M, D)
// (a 1-element dummy each without HAS_PRIOR). Output: out (BATCH, N, D) T.
uint i = thread_position_in_grid.x;
if (i >= uint(BATCH * N * D)) {
  return;
}
uint d = i % uint(D);
uint w = (i / uint(D)) % uint(N);
uint b = i / uint(D * N);
float mx = -INFINITY;
float s = 0.0f;
float acc = 0.0f;
for (uint j = 0; j < uint(S); j++) {
  int at = slot_index(b, w, d, j, L, M, D, C, OVERLAP, HAS_PRIOR);
  if (at == NO_SLOT) {
    continue;
  }
  uint pi = (b * M + j) * D + d;
  float k = at >= 0 ? float(kv[at]) : float(prior_kv[pi]);
  float g = at >= 0 ? float(gate[at]) + float(bias[(uint(at) / C) % M * C + uint(at) % C]) : float(prior_gate[pi]);
  float m_new = metal::max(mx, g);
  float scale = metal::exp(mx - m_new);
  float p = metal::exp(g - m_new);
  s = s * scale + p;
  acc = acc * scale + p * k;
  mx = m_new;
}
out[i] = T(acc / s);

// @kernel gated_pool_bwd
// dkv_s = p_s dy, dgate_s = p_s dy (kv_s - out) for every slot s, written where the slot came from; the softmax is
// recomputed (first pass), out in float32. CSA: the last window's first halves feed no entry of this call, so the
// thread of that window writes their zeros. Inputs: those of gated_pool_fwd, dy (BATCH, N, D).
// Outputs: dkv (BATCH, L, C) T, dgate (BATCH, L, C) float32, dprior_kv (BATCH, M, D) T, dprior_gate (BATCH, M, D)
// float32 (1-element, unwritten, without HAS_PRIOR).
uint i = thread_position_in_grid.x;
if (i >= uint(BATCH * N * D)) {
  return;
}
uint d = i % uint(D);
uint w = (i / uint(D)) % uint(N);
uint b = i / uint(D * N);
float mx = -INFINITY;
float s = 0.0f;
float acc = 0.0f;
for (uint j = 0; j < uint(S); j++) {
  int at = slot_index(b, w, d, j, L, M, D, C, OVERLAP, HAS_PRIOR);
  if (at == NO_SLOT) {
    continue;
  }
  uint pi = (b * M + j) * D + d;
  float k = at >= 0 ? float(kv[at]) : float(prior_kv[pi]);
  float g = at >= 0 ? float(gate[at]) + float(bias[(uint(at) / C) % M * C + uint(at) % C]) : float(prior_gate[pi]);
  float m_new = metal::max(mx, g);
  float scale = metal::exp(mx - m_new);
  float p = metal::exp(g - m_new);
  s = s * scale + p;
  acc = acc * scale + p * k;
  mx = m_new;
}
float o = acc / s;
float dys = float(dy[i]) / s;
for (uint j = 0; j < uint(S); j++) {
  int at = slot_index(b, w, d, j, L, M, D, C, OVERLAP, HAS_PRIOR);
  if (at == NO_SLOT) {
    continue;
  }
  uint pi = (b * M + j) * D + d;
  float k = at >= 0 ? float(kv[at]) : float(prior_kv[pi]);
  float g = at >= 0 ? float(gate[at]) + float(bias[(uint(at) / C) % M * C + uint(at) % C]) : float(prior_gate[pi]);
  float dk = metal::exp(g - mx) * dys;
  if (at >= 0) {
    dkv[at] = T(dk);
    dgate[at] = dk * (k - o);
  } else {
    dprior_kv[pi] = T(dk);
    dprior_gate[pi] = dk * (k - o);
  }
}
if (OVERLAP && w == uint(N - 1)) {
  for (uint r = 0; r < uint(M); r++) {
    uint at = (b * L + w * M + r) * C + d;
    dkv[at] = T(0.0f);
    dgate[at] = 0.0f;
  }
}
