// Knowledge distillation over a chunk of student and teacher logits (launch data: runtime_mlx/kernels/distill.py):
// per token the generalized JSD of GKD (Agarwal et al. 2024; TRL GKDTrainer / Liger's fused linear JSD) between
// p_s = softmax(z / tau) and p_t = softmax(u / tau), and the cross-entropy of the unscaled student logits z
// (forward); d/dz of both (backward). Semantics: reference/distill.py. MODE (a template constant) picks the
// divergence: 0 (beta == 0) KL(p_t || p_s); 1 (beta == 1) KL(p_s || p_t); 2 (0 < beta < 1)
// beta * KL(p_t || M) + (1 - beta) * KL(p_s || M) with M = beta * p_t + (1 - beta) * p_s.
// Everything in float32; a term p * log(...) with p == 0 (a -inf logit) is 0, never 0 * inf = NaN.

// (max, sum) of a running logsumexp after one more value v: a -inf value adds nothing (exp(-inf - -inf) is NaN).
inline float2 lse_add(float2 a, float v) {
  if (v > a.x) {
    return float2(v, a.y * metal::exp(a.x - v) + 1.0f);
  }
  if (v > -INFINITY) {
    a.y += metal::exp(v - a.x);
  }
  return a;
}

// Two running logsumexps merged.
inline float2 lse_merge(float2 a, float2 b) {
  float m = metal::max(a.x, b.x);
  if (m == -INFINITY) {
    return float2(-INFINITY, 0.0f);
  }
  float l = (a.x == -INFINITY ? 0.0f : a.y * metal::exp(a.x - m)) + (b.x == -INFINITY ? 0.0f : b.y * metal::exp(b.x - m));
  return float2(m, l);
}

// A running logsumexp merged across the 32 lanes of a simdgroup.
inline float2 lse_simd(float2 a) {
  float m = metal::simd_max(a.x);
  float l = metal::simd_sum(a.x == -INFINITY ? 0.0f : a.y * metal::exp(a.x - m));
  return float2(m, l);
}

// log(exp(a) + exp(b)), -inf when both are.
inline float log_add(float a, float b) {
  float m = metal::max(a, b);
  if (m == -INFINITY) {
    return -INFINITY;
  }
  return m + metal::log(metal::exp(a - m) + metal::exp(b - m));
}

// log M = log(beta * p_t + (1 - beta) * p_s) from the log-probabilities (lb = log(beta), l1b = log(1 - beta)).
inline float log_mix(float lps, float lpt, float lb, float l1b) {
  return log_add(lb + lpt, l1b + lps);
}

// One vocabulary entry's term of the divergence (summed over the vocabulary it is the per-token soft loss).
inline float jsd_term(float lps, float lpt, int mode, float beta, float lb, float l1b) {
  float ps = metal::exp(lps);
  float pt = metal::exp(lpt);
  if (mode == 0) {
    return pt == 0.0f ? 0.0f : pt * (lpt - lps);
  }
  if (mode == 1) {
    return ps == 0.0f ? 0.0f : ps * (lps - lpt);
  }
  float lm = log_mix(lps, lpt, lb, l1b);
  return (pt == 0.0f ? 0.0f : beta * pt * (lpt - lm)) + (ps == 0.0f ? 0.0f : (1.0f - beta) * ps * (lps - lm));
}

// One entry's term of the constant K in the backward: KL(p_s || p_t) (mode 1) or KL(p_s || M) (mode 2).
inline float ps_kl_term(float lps, float lpt, int mode, float lb, float l1b) {
  float ps = metal::exp(lps);
  if (ps == 0.0f) {
    return 0.0f;
  }
  return ps * (lps - (mode == 1 ? lpt : log_mix(lps, lpt, lb, l1b)));
}

// @kernel distill_fwd
// One threadgroup of TG threads (32..256) per token: pass 1, three strided online logsumexps over the V logits
// (z / tau, u / tau and z), merged by simd and threadgroup reductions; pass 2, the divergence summed the same
// way. Inputs: z (N, V) T student logits, u (N, V) U teacher logits, targets (N,) int32, ignore_index scalar
// int, beta scalar float, inv_temp scalar float (1 / tau). Outputs: soft (N,) float32, the divergence; hard
// (N,) float32, logsumexp(z) - z[target] (NaN for a target outside [0, V)). Both 0 on an ignored token.
constexpr int NSG = TG / 32;
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float red[6 * NSG];
threadgroup float part[NSG];
int target = targets[row];
if (target == ignore_index) {  // the same for every thread of the group: no barrier is left half-reached
  if (tid == 0) {
    soft[row] = 0.0f;
    hard[row] = 0.0f;
  }
  return;
}
float2 ms = float2(-INFINITY, 0.0f);
float2 mt = float2(-INFINITY, 0.0f);
float2 mr = float2(-INFINITY, 0.0f);
for (uint j = tid; j < uint(V); j += TG) {
  float zj = float(z[row * V + j]);
  ms = lse_add(ms, zj * inv_temp);
  mt = lse_add(mt, float(u[row * V + j]) * inv_temp);
  mr = lse_add(mr, zj);
}
ms = lse_simd(ms);
mt = lse_simd(mt);
mr = lse_simd(mr);
if (lane == 0) {
  red[sg] = ms.x;
  red[NSG + sg] = ms.y;
  red[2 * NSG + sg] = mt.x;
  red[3 * NSG + sg] = mt.y;
  red[4 * NSG + sg] = mr.x;
  red[5 * NSG + sg] = mr.y;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
ms = float2(-INFINITY, 0.0f);
mt = float2(-INFINITY, 0.0f);
mr = float2(-INFINITY, 0.0f);
for (int k = 0; k < NSG; k++) {
  ms = lse_merge(ms, float2(red[k], red[NSG + k]));
  mt = lse_merge(mt, float2(red[2 * NSG + k], red[3 * NSG + k]));
  mr = lse_merge(mr, float2(red[4 * NSG + k], red[5 * NSG + k]));
}
float ls = metal::log(ms.y);  // log p = (x - max) - log(sum): exact near the maximum, unlike x - logsumexp
float lt = metal::log(mt.y);
float lb = MODE == 2 ? metal::log(beta) : 0.0f;
float l1b = MODE == 2 ? metal::log(1.0f - beta) : 0.0f;
float acc = 0.0f;
for (uint j = tid; j < uint(V); j += TG) {
  float lps = (float(z[row * V + j]) * inv_temp - ms.x) - ls;
  float lpt = (float(u[row * V + j]) * inv_temp - mt.x) - lt;
  acc += jsd_term(lps, lpt, MODE, beta, lb, l1b);
}
acc = metal::simd_sum(acc);
if (lane == 0) {
  part[sg] = acc;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (tid == 0) {
  float total = 0.0f;
  for (int k = 0; k < NSG; k++) {
    total += part[k];
  }
  soft[row] = total;
  if (target < 0 || target >= V) {
    hard[row] = NAN;
  } else {
    hard[row] = (mr.x - float(z[row * V + target])) + metal::log(mr.y);
  }
}

// @kernel distill_bwd
// dz[n, v] = gh[n] * (softmax(z)[v] - [v == target]) + gs[n] / tau * dsoft/d(z / tau)[v], 0 on an ignored
// token, where dsoft/ds (s = z / tau) is p_s - p_t (mode 0), p_s * (log p_s - log p_t - K) with
// K = KL(p_s || p_t) (mode 1), (1 - beta) * p_s * (log p_s - log M - K) with K = KL(p_s || M) (mode 2); 0 where
// p_s == 0. The logsumexps are recomputed as in the forward (nothing is kept between the passes); modes 1 and 2
// take one more pass for K. One threadgroup of TG threads per token. Inputs: z (N, V) T, u (N, V) U, targets
// (N,) int32, gs (N,) G and gh (N,) G (the cotangents of soft and hard), ignore_index scalar int, beta and
// inv_temp scalar float. Output: dz (N, V) T.
constexpr int NSG = TG / 32;
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float red[6 * NSG];
threadgroup float part[NSG];
int target = targets[row];
if (target == ignore_index) {  // uniform over the group
  for (uint j = tid; j < uint(V); j += TG) {
    dz[row * V + j] = T(0.0f);
  }
  return;
}
float2 ms = float2(-INFINITY, 0.0f);
float2 mt = float2(-INFINITY, 0.0f);
float2 mr = float2(-INFINITY, 0.0f);
for (uint j = tid; j < uint(V); j += TG) {
  float zj = float(z[row * V + j]);
  ms = lse_add(ms, zj * inv_temp);
  mt = lse_add(mt, float(u[row * V + j]) * inv_temp);
  mr = lse_add(mr, zj);
}
ms = lse_simd(ms);
mt = lse_simd(mt);
mr = lse_simd(mr);
if (lane == 0) {
  red[sg] = ms.x;
  red[NSG + sg] = ms.y;
  red[2 * NSG + sg] = mt.x;
  red[3 * NSG + sg] = mt.y;
  red[4 * NSG + sg] = mr.x;
  red[5 * NSG + sg] = mr.y;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
ms = float2(-INFINITY, 0.0f);
mt = float2(-INFINITY, 0.0f);
mr = float2(-INFINITY, 0.0f);
for (int k = 0; k < NSG; k++) {
  ms = lse_merge(ms, float2(red[k], red[NSG + k]));
  mt = lse_merge(mt, float2(red[2 * NSG + k], red[3 * NSG + k]));
  mr = lse_merge(mr, float2(red[4 * NSG + k], red[5 * NSG + k]));
}
float ls = metal::log(ms.y);
float lt = metal::log(mt.y);
float lr = metal::log(mr.y);
float lb = MODE == 2 ? metal::log(beta) : 0.0f;
float l1b = MODE == 2 ? metal::log(1.0f - beta) : 0.0f;
float kl = 0.0f;
if (MODE != 0) {  // a template constant: every thread takes the same branch
  float acc = 0.0f;
  for (uint j = tid; j < uint(V); j += TG) {
    float lps = (float(z[row * V + j]) * inv_temp - ms.x) - ls;
    float lpt = (float(u[row * V + j]) * inv_temp - mt.x) - lt;
    acc += ps_kl_term(lps, lpt, MODE, lb, l1b);
  }
  acc = metal::simd_sum(acc);
  if (lane == 0) {
    part[sg] = acc;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  for (int k = 0; k < NSG; k++) {
    kl += part[k];
  }
}
float gsr = float(gs[row]) * inv_temp;
float ghr = float(gh[row]);
for (uint j = tid; j < uint(V); j += TG) {
  float zj = float(z[row * V + j]);
  float lps = (zj * inv_temp - ms.x) - ls;
  float lpt = (float(u[row * V + j]) * inv_temp - mt.x) - lt;
  float ps = metal::exp(lps);
  float ds;
  if (MODE == 0) {
    ds = ps - metal::exp(lpt);
  } else if (ps == 0.0f) {
    ds = 0.0f;
  } else if (MODE == 1) {
    ds = ps * (lps - lpt - kl);
  } else {
    ds = (1.0f - beta) * ps * (lps - log_mix(lps, lpt, lb, l1b) - kl);
  }
  float q = metal::exp((zj - mr.x) - lr);
  dz[row * V + j] = T(ghr * (q - (int(j) == target ? 1.0f : 0.0f)) + gsr * ds);
}
