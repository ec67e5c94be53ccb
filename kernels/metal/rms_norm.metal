// RMSNorm forward and backward bodies for mx.fast.metal_kernel (launch data: runtime_mlx/kernels.py).
// Semantics: reference/rms_norm.py, out = w * T(x * rsqrt(mean(x^2) + eps)), reductions in float32.
// Zhang & Sennrich 2019; DeepSeek-V3 applies it before attention/MoE and on the MLA latents.

// @kernel rms_norm_fwd
// One threadgroup of TG threads (a multiple of 32, <= 256) per row of D elements.
// Inputs: x (N, D) T, w (D,) W, eps scalar float. Outputs: out (N, D) O, rstd (N,) float32.
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float partial[TG / 32];
float acc = 0.0f;
for (uint j = tid; j < uint(D); j += TG) {
  float v = float(x[row * D + j]);
  acc += v * v;
}
acc = metal::simd_sum(acc);
if (lane == 0) {
  partial[sg] = acc;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  float total = lane < uint(TG / 32) ? partial[lane] : 0.0f;
  total = metal::simd_sum(total);
  if (lane == 0) {
    partial[0] = total;
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
float r = metal::precise::rsqrt(partial[0] / float(D) + eps);
if (tid == 0) {
  rstd[row] = r;
}
for (uint j = tid; j < uint(D); j += TG) {
  float v = float(x[row * D + j]);
  out[row * D + j] = O(float(w[j]) * float(T(v * r)));
}

// @kernel rms_norm_bwd_dx
// dx = r * (g*w - x * r^2 * mean(g*w * x)), with r = rsqrt(mean(x^2) + eps) recomputed in the same pass (the
// forward's rstd is not kept); one threadgroup of TG threads per row, as the forward.
// Inputs: x (N, D) T, w (D,) W, g (N, D) G (the cotangent), eps scalar float.
// Outputs: dx (N, D) T, rstd (N,) float32 (for rms_norm_bwd_dw).
uint row = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
threadgroup float part_ss[TG / 32];
threadgroup float part_gx[TG / 32];
float ss = 0.0f;
float gx = 0.0f;
for (uint j = tid; j < uint(D); j += TG) {
  float v = float(x[row * D + j]);
  ss += v * v;
  gx += float(g[row * D + j]) * float(w[j]) * v;
}
ss = metal::simd_sum(ss);
gx = metal::simd_sum(gx);
if (lane == 0) {
  part_ss[sg] = ss;
  part_gx[sg] = gx;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  float a = lane < uint(TG / 32) ? part_ss[lane] : 0.0f;
  float b = lane < uint(TG / 32) ? part_gx[lane] : 0.0f;
  a = metal::simd_sum(a);
  b = metal::simd_sum(b);
  if (lane == 0) {
    part_ss[0] = a;
    part_gx[0] = b;
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
float r = metal::precise::rsqrt(part_ss[0] / float(D) + eps);
float c = part_gx[0] * r * r / float(D);
if (tid == 0) {
  rstd[row] = r;
}
for (uint j = tid; j < uint(D); j += TG) {
  float v = float(x[row * D + j]);
  float dn = float(g[row * D + j]) * float(w[j]);
  dx[row * D + j] = T(r * (dn - v * c));
}

// @kernel rms_norm_bwd_dw
// dw[j] = sum_n g[n, j] * T(x[n, j] * rstd[n]); one thread per column j, looping over the N rows.
// Inputs: x (N, D) T, g (N, D) G, rstd (N,) float32. Output: dw (D,) float32.
uint j = thread_position_in_grid.x;
if (j >= uint(D)) {
  return;
}
float acc = 0.0f;
for (uint n = 0; n < uint(N); n++) {
  acc += float(g[n * D + j]) * float(T(float(x[n * D + j]) * rstd[n]));
}
dw[j] = acc;
