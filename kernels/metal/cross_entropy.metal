// Cross-entropy over a chunk of logits: fused logsumexp + loss (forward) and dlogits (backward).
// Semantics: torch.nn.functional.cross_entropy(reduction="none", ignore_index), per token.

// @kernel cross_entropy_fwd
// One threadgroup of TG threads per row: a strided online logsumexp, merged across lanes (simd_max /
// simd_sum) and simdgroups (threadgroup memory). Inputs: logits (N, V) T, targets (N,) int32,
// ignore_index scalar int. Outputs: loss (N,) float32 (0 on ignored rows, NaN on an out-of-range target),
// lse (N,) float32.
constexpr int NSG = TG / 32;
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float tmax[NSG];
threadgroup float tsum[NSG];
float m = -INFINITY;
float l = 0.0f;
for (uint j = tid; j < uint(V); j += TG) {
  float v = float(logits[row * V + j]);
  if (v > m) {
    l = l * metal::exp(m - v) + 1.0f;
    m = v;
  } else if (v > -INFINITY) {  // a -inf logit adds nothing (and exp(-inf - -inf) would be NaN)
    l += metal::exp(v - m);
  }
}
float mg = metal::simd_max(m);
float lg = metal::simd_sum(m == -INFINITY ? 0.0f : l * metal::exp(m - mg));
if (lane == 0) {
  tmax[sg] = mg;
  tsum[sg] = lg;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (tid == 0) {
  float mm = -INFINITY;
  for (int j = 0; j < NSG; j++) {
    mm = metal::max(mm, tmax[j]);
  }
  float ll = 0.0f;
  for (int j = 0; j < NSG; j++) {
    ll += tmax[j] == -INFINITY ? 0.0f : tsum[j] * metal::exp(tmax[j] - mm);
  }
  float z = mm + metal::log(ll);
  int target = targets[row];
  lse[row] = z;
  if (target == ignore_index) {
    loss[row] = 0.0f;
  } else if (target < 0 || target >= V) {
    loss[row] = NAN;
  } else {
    loss[row] = z - float(logits[row * V + target]);
  }
}

// @kernel cross_entropy_bwd
// dlogits[n, v] = g[n] * (exp(logits[n, v] - lse[n]) - [v == targets[n]]), 0 on ignored rows: the row's
// logsumexp is recomputed as in the forward (nothing kept between the passes), then each thread writes its
// strided columns. One threadgroup of TG threads per row. Inputs: logits (N, V) T, targets (N,) int32,
// g (N,) G (the cotangent of the losses), ignore_index scalar int. Output: dlogits (N, V) T.
constexpr int NSG = TG / 32;
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float tmax[NSG];
threadgroup float tsum[NSG];
float m = -INFINITY;
float l = 0.0f;
for (uint j = tid; j < uint(V); j += TG) {
  float v = float(logits[row * V + j]);
  if (v > m) {
    l = l * metal::exp(m - v) + 1.0f;
    m = v;
  } else if (v > -INFINITY) {  // a -inf logit adds nothing (and exp(-inf - -inf) would be NaN)
    l += metal::exp(v - m);
  }
}
float mg = metal::simd_max(m);
float lg = metal::simd_sum(m == -INFINITY ? 0.0f : l * metal::exp(m - mg));
if (lane == 0) {
  tmax[sg] = mg;
  tsum[sg] = lg;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
float mm = -INFINITY;
for (int j = 0; j < NSG; j++) {
  mm = metal::max(mm, tmax[j]);
}
float ll = 0.0f;
for (int j = 0; j < NSG; j++) {
  ll += tmax[j] == -INFINITY ? 0.0f : tsum[j] * metal::exp(tmax[j] - mm);
}
float z = mm + metal::log(ll);
int target = targets[row];
float gr = target == ignore_index ? 0.0f : float(g[row]);
for (uint j = tid; j < uint(V); j += TG) {
  float p = metal::exp(float(logits[row * V + j]) - z);
  dlogits[row * V + j] = T(gr * (p - (int(j) == target ? 1.0f : 0.0f)));
}
