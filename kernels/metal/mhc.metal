// mHC, DeepSeek-V4's manifold-constrained hyper-connections (V4 report section 2.2; Xie et al. 2026, arXiv
// 2512.24880, section 3): mhc_pre (RMS of the flattened streams, the (2 + N) N x N D projection, sigmoids, softmax,
// Sinkhorn-Knopp, collapse) and mhc_post, forward and backward. Semantics: reference/mhc.py; launch data:
// runtime_mlx/kernels/mhc.py. Per token the N streams x (N, D) are K = N D values and M = (2 + N) N mixes come
// from fn (M, K); mixes, sums and Sinkhorn in float32. N x N matrices are the plain value Sq<N> (row-major).

template <int N>
struct Sq {
  float v[N * N];
};

inline float mhc_sigmoid(float z) {
  return 1.0f / (1.0f + metal::exp(-z));
}

// Divide every row (ROWS) or column of m by its sum plus eps: one Sinkhorn-Knopp normalization.
template <int N, bool ROWS>
inline Sq<N> sk_normalize(Sq<N> m, float eps) {
  for (int a = 0; a < N; a++) {
    float s = eps;
    for (int b = 0; b < N; b++) {
      s += ROWS ? m.v[a * N + b] : m.v[b * N + a];
    }
    for (int b = 0; b < N; b++) {
      if (ROWS) {
        m.v[a * N + b] /= s;
      } else {
        m.v[b * N + a] /= s;
      }
    }
  }
  return m;
}

// The vector-Jacobian product of sk_normalize<N, ROWS> at m for the cotangent g:
// (g - sum(g * y)) / (sum(m) + eps), the sums along the normalized rows or columns, y the normalized m.
template <int N, bool ROWS>
inline Sq<N> sk_normalize_vjp(Sq<N> m, Sq<N> g, float eps) {
  for (int a = 0; a < N; a++) {
    float s = eps;
    float gy = 0.0f;
    for (int b = 0; b < N; b++) {
      int i = ROWS ? a * N + b : b * N + a;
      s += m.v[i];
    }
    for (int b = 0; b < N; b++) {
      int i = ROWS ? a * N + b : b * N + a;
      gy += g.v[i] * m.v[i] / s;
    }
    for (int b = 0; b < N; b++) {
      int i = ROWS ? a * N + b : b * N + a;
      g.v[i] = (g.v[i] - gy) / s;
    }
  }
  return g;
}

// reference.mhc.sinkhorn_knopp: the columns, then `iters - 1` times the rows and the columns.
template <int N>
inline Sq<N> sinkhorn(Sq<N> p, int iters, float eps) {
  Sq<N> m = sk_normalize<N, false>(p, eps);
  for (int it = 1; it < iters; it++) {
    m = sk_normalize<N, false>(sk_normalize<N, true>(m, eps), eps);
  }
  return m;
}

// The gradient of sinkhorn with respect to p for the cotangent g. Nothing is kept per iteration: each (rows,
// columns) pair, last first, is recomputed from p, (iters - 1)^2 / 2 pairs in all.
template <int N>
inline Sq<N> sinkhorn_vjp(Sq<N> p, Sq<N> g, int iters, float eps) {
  for (int q = iters - 1; q >= 1; q--) {
    Sq<N> m = sk_normalize<N, false>(p, eps);  // the matrix before pair q
    for (int it = 1; it < q; it++) {
      m = sk_normalize<N, false>(sk_normalize<N, true>(m, eps), eps);
    }
    g = sk_normalize_vjp<N, false>(sk_normalize<N, true>(m, eps), g, eps);
    g = sk_normalize_vjp<N, true>(m, g, eps);
  }
  return sk_normalize_vjp<N, false>(p, g, eps);
}

// @kernel mhc_pre_fwd
// One threadgroup of TG threads (a multiple of 32, <= 256) per token. Inputs: x (T, N D) X, fn (M, N D), base (M,),
// scale (3,) float32, hc_eps, rms_eps scalars; template N, D, ITERS, TG. Outputs: coll (T, D) X, post (T, N),
// comb (T, N, N) float32. The sums of squares and the M dot products with fn are reduced over the threadgroup; every
// thread then computes the N-sized math (the same values), thread 0 writes post and comb, and the threads stride
// over D for the collapse.
constexpr int M = (2 + N) * N;
constexpr int K = N * D;
constexpr int NSG = TG / 32;
uint tok = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float part[(M + 1) * NSG];
float acc[M + 1];
for (int m = 0; m <= M; m++) {
  acc[m] = 0.0f;
}
for (uint k = tid; k < uint(K); k += TG) {
  float v = float(x[tok * K + k]);
  acc[M] += v * v;
  for (int m = 0; m < M; m++) {
    acc[m] += fn[m * K + k] * v;
  }
}
for (int m = 0; m <= M; m++) {
  float s = metal::simd_sum(acc[m]);
  if (lane == 0) {
    part[m * NSG + sg] = s;
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
float mix[M + 1];
for (int m = 0; m <= M; m++) {
  float s = 0.0f;
  for (int w = 0; w < NSG; w++) {
    s += part[m * NSG + w];
  }
  mix[m] = s;
}
float r = metal::precise::rsqrt(mix[M] / float(K) + rms_eps);
float pre[N];
Sq<N> p;
for (int i = 0; i < N; i++) {
  pre[i] = mhc_sigmoid(r * mix[i] * scale[0] + base[i]) + hc_eps;
  float mx = -INFINITY;
  for (int j = 0; j < N; j++) {
    int c = 2 * N + i * N + j;
    p.v[i * N + j] = r * mix[c] * scale[2] + base[c];
    mx = metal::max(mx, p.v[i * N + j]);
  }
  float s = 0.0f;
  for (int j = 0; j < N; j++) {
    p.v[i * N + j] = metal::exp(p.v[i * N + j] - mx);
    s += p.v[i * N + j];
  }
  for (int j = 0; j < N; j++) {
    p.v[i * N + j] = p.v[i * N + j] / s + hc_eps;
  }
}
if (tid == 0) {
  Sq<N> c = sinkhorn<N>(p, ITERS, hc_eps);
  for (int i = 0; i < N; i++) {
    post[tok * N + i] = 2.0f * mhc_sigmoid(r * mix[N + i] * scale[1] + base[N + i]);
    for (int j = 0; j < N; j++) {
      comb[(tok * N + i) * N + j] = c.v[i * N + j];
    }
  }
}
for (uint d = tid; d < uint(D); d += TG) {
  float s = 0.0f;
  for (int j = 0; j < N; j++) {
    s += pre[j] * float(x[tok * K + j * D + d]);
  }
  coll[tok * D + d] = X(s);
}

// @kernel mhc_pre_bwd
// One threadgroup of TG threads per token, for the cotangents gc (T, D) G, gpost (T, N), gcomb (T, N, N) float32.
// Inputs as mhc_pre_fwd plus those; template X, G, N, D, ITERS, TG. Outputs: dx (T, N D) X; dz (T, M) float32, the
// gradient of the pre-activations (mix * scale + base); mixes (T, M) float32 (fn @ RMS(x)); rstd (T,) float32: the
// caller forms dbase, dscale and dfn from them. One pass over the token's values reduces the sum of squares, the M
// mixes and the N products dpre_j = <gc, x_j>; thread 0 runs the N-sized math forward and backward (Sinkhorn
// recomputed, sinkhorn_vjp) and shares dmix = dz * scale, pre, rstd and coef = <dmix, mixes> / K through threadgroup
// memory; then the threads stride over the K values: dx = rstd (fn^T dmix - x rstd coef) + pre_j gc.
constexpr int M = (2 + N) * N;
constexpr int K = N * D;
constexpr int NSG = TG / 32;
constexpr int R = M + 1 + N;
uint tok = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float part[R * NSG];
threadgroup float shared[M + N + 2];
float acc[R];
for (int m = 0; m < R; m++) {
  acc[m] = 0.0f;
}
for (int j = 0; j < N; j++) {
  for (uint d = tid; d < uint(D); d += TG) {
    uint k = j * D + d;
    float v = float(x[tok * K + k]);
    acc[M] += v * v;
    acc[M + 1 + j] += float(gc[tok * D + d]) * v;
    for (int m = 0; m < M; m++) {
      acc[m] += fn[m * K + k] * v;
    }
  }
}
for (int m = 0; m < R; m++) {
  float s = metal::simd_sum(acc[m]);
  if (lane == 0) {
    part[m * NSG + sg] = s;
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (tid == 0) {
  float val[R];
  for (int m = 0; m < R; m++) {
    float s = 0.0f;
    for (int w = 0; w < NSG; w++) {
      s += part[m * NSG + w];
    }
    val[m] = s;
  }
  float r = metal::precise::rsqrt(val[M] / float(K) + rms_eps);
  float mix[M];
  float dzv[M];
  for (int m = 0; m < M; m++) {
    mix[m] = r * val[m];
    mixes[tok * M + m] = mix[m];
  }
  rstd[tok] = r;
  Sq<N> soft;
  Sq<N> p;
  Sq<N> g;
  for (int i = 0; i < N; i++) {
    float sp = mhc_sigmoid(mix[i] * scale[0] + base[i]);
    float sq = mhc_sigmoid(mix[N + i] * scale[1] + base[N + i]);
    dzv[i] = val[M + 1 + i] * sp * (1.0f - sp);
    dzv[N + i] = 2.0f * gpost[tok * N + i] * sq * (1.0f - sq);
    shared[M + i] = sp + hc_eps;
    float mx = -INFINITY;
    for (int j = 0; j < N; j++) {
      int c = 2 * N + i * N + j;
      soft.v[i * N + j] = mix[c] * scale[2] + base[c];
      mx = metal::max(mx, soft.v[i * N + j]);
      g.v[i * N + j] = gcomb[(tok * N + i) * N + j];
    }
    float s = 0.0f;
    for (int j = 0; j < N; j++) {
      soft.v[i * N + j] = metal::exp(soft.v[i * N + j] - mx);
      s += soft.v[i * N + j];
    }
    for (int j = 0; j < N; j++) {
      soft.v[i * N + j] /= s;
      p.v[i * N + j] = soft.v[i * N + j] + hc_eps;
    }
  }
  g = sinkhorn_vjp<N>(p, g, ITERS, hc_eps);
  for (int i = 0; i < N; i++) {
    float gs = 0.0f;
    for (int j = 0; j < N; j++) {
      gs += g.v[i * N + j] * soft.v[i * N + j];
    }
    for (int j = 0; j < N; j++) {
      dzv[2 * N + i * N + j] = soft.v[i * N + j] * (g.v[i * N + j] - gs);
    }
  }
  float coef = 0.0f;
  for (int m = 0; m < M; m++) {
    dz[tok * M + m] = dzv[m];
    float dm = dzv[m] * scale[m < N ? 0 : (m < 2 * N ? 1 : 2)];
    shared[m] = dm;
    coef += dm * mix[m];
  }
  shared[M + N] = r;
  shared[M + N + 1] = coef / float(K);
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
float r = shared[M + N];
float coef = shared[M + N + 1];
for (int j = 0; j < N; j++) {
  float pre = shared[M + j];
  for (uint d = tid; d < uint(D); d += TG) {
    uint k = j * D + d;
    float dh = 0.0f;
    for (int m = 0; m < M; m++) {
      dh += shared[m] * fn[m * K + k];
    }
    float v = float(x[tok * K + k]);
    dx[tok * K + k] = X(r * (dh - v * r * coef) + pre * float(gc[tok * D + d]));
  }
}

// @kernel mhc_post_fwd
// One thread per output element: grid (D, N, T), thread (d, k, t). Inputs: bo (T, D) X, post (T, N), comb (T, N, N)
// float32, x (T, N, D) X; template X, N, D. Output: out (T, N, D) X = post[k] bo + sum_j comb[j, k] x_j, post and
// comb rounded to X first (as the reference), then float32 and one rounding.
uint d = thread_position_in_grid.x;
uint k = thread_position_in_grid.y;
uint tok = thread_position_in_grid.z;
float s = float(X(post[tok * N + k])) * float(bo[tok * D + d]);
for (int j = 0; j < N; j++) {
  s += float(X(comb[(tok * N + j) * N + k])) * float(x[(tok * N + j) * D + d]);
}
out[(tok * N + k) * D + d] = X(s);

// @kernel mhc_post_bwd
// One threadgroup of TG threads per token, for the cotangent g (T, N, D) G. Inputs bo, post, comb, x as
// mhc_post_fwd; template X, G, N, D, TG. Outputs: dbo (T, D) X = sum_k post[k] g_k; dx (T, N, D) X, dx_j = sum_k
// comb[j, k] g_k; dpost (T, N) float32 = <g_k, bo> and dcomb (T, N, N) float32 = <g_k, x_j>, reduced over the
// threadgroup.
constexpr int K = N * D;
constexpr int NSG = TG / 32;
constexpr int R = N + N * N;
uint tok = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float part[R * NSG];
float pv[N];
float cv[N * N];
float acc[R];
for (int k = 0; k < N; k++) {
  pv[k] = float(X(post[tok * N + k]));
  for (int j = 0; j < N; j++) {
    cv[k * N + j] = float(X(comb[(tok * N + k) * N + j]));
  }
}
for (int m = 0; m < R; m++) {
  acc[m] = 0.0f;
}
for (uint d = tid; d < uint(D); d += TG) {
  float gk[N];
  float b = float(bo[tok * D + d]);
  float s = 0.0f;
  for (int k = 0; k < N; k++) {
    gk[k] = float(g[tok * K + k * D + d]);
    s += pv[k] * gk[k];
    acc[k] += gk[k] * b;
  }
  dbo[tok * D + d] = X(s);
  for (int j = 0; j < N; j++) {
    float xj = float(x[tok * K + j * D + d]);
    float t = 0.0f;
    for (int k = 0; k < N; k++) {
      t += cv[j * N + k] * gk[k];
      acc[N + j * N + k] += gk[k] * xj;
    }
    dx[tok * K + j * D + d] = X(t);
  }
}
for (int m = 0; m < R; m++) {
  float s = metal::simd_sum(acc[m]);
  if (lane == 0) {
    part[m * NSG + sg] = s;
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
for (uint m = tid; m < uint(R); m += TG) {
  float s = 0.0f;
  for (int w = 0; w < NSG; w++) {
    s += part[m * NSG + w];
  }
  if (m < uint(N)) {
    dpost[tok * N + m] = s;
  } else {
    dcomb[tok * N * N + m - N] = s;
  }
}
