// Fine-grained FP8 (e4m3fn): act_quant per 1 x BS tile, weight_dequant per BS x BS block, and the block-scaled
// GEMM fp8_gemm (float32 accumulation promoted per K block).
// Semantics: reference/fp8.py (DeepSeek-V3 report section 3.3; official inference/kernel.py).
// FP8 values travel as uint8 bit patterns of float8_e4m3fn (largest finite 448, no infinities, 0x7F = NaN).

// Round-to-nearest-even float -> e4m3fn bits, saturating at +-448 (the callers clamp first).
inline uchar e4m3_encode(float v) {
  uchar sign = uchar((as_type<uint>(v) >> 24) & 0x80u);
  float a = metal::fabs(v);
  if (a != a) {
    return uchar(0x7F);
  }
  if (a >= 448.0f) {
    return uchar(sign | 0x7Eu);
  }
  if (a < 0.015625f) {
    // subnormals: multiples of 2^-9 (8 rounds up to the smallest normal, code 0x08)
    return uchar(sign | uint(metal::rint(a * 512.0f)));
  }
  int e = int((as_type<uint>(a) >> 23) & 0xFFu) - 127;
  float step = as_type<float>(uint(e - 3 + 127) << 23);
  uint q = uint(metal::rint(a / step));  // 8..16; 16 carries into the next binade
  return uchar(sign | (uint(e + 7) * 8u + q - 8u));
}

// The smallest power of two >= s (s > 0 or NaN), exactly: s itself when its mantissa bits are 0, else 2^(e + 1)
// (the exponent field plus one); NaN stays NaN. The "ue8m0" scale format of DeepSeek's later FP8 recipes.
inline float ue8m0_ceil(float s) {
  uint bits = as_type<uint>(s);
  if (metal::isnan(s) || (bits & 0x7FFFFFu) == 0u) {
    return s;
  }
  return as_type<float>((bits & 0x7F800000u) + 0x00800000u);
}

// e4m3fn bits -> float.
inline float e4m3_decode(uchar bits) {
  uint e = (uint(bits) >> 3) & 0xFu;
  uint m = uint(bits) & 0x7u;
  float v;
  if (e == 0u) {
    v = float(m) * 0.001953125f;
  } else if (e == 15u && m == 7u) {
    v = NAN;
  } else {
    v = as_type<float>(((e + 120u) << 23) | (m << 20));
  }
  return (bits & 0x80u) ? -v : v;
}

// @kernel act_quant
// One simdgroup per 1 x BS tile (NT = N * KB tiles). Inputs: x (N, K) T, fp8_max and amax_min scalar float
// (reference/fp8.py FP8_MAX = 448 and AMAX_MIN = 1e-4). Outputs: y (N, K) uint8 e4m3 bits of
// clamp(x / s, +-fp8_max), s (N, KB) float32 = max(amax, amax_min) / fp8_max (NaN if the tile holds a NaN); with
// UE8M0, s rounded up to a power of two (ue8m0_ceil), the same s quantizing and returned.
constexpr int KB = (K + BS - 1) / BS;
uint tile = thread_position_in_grid.x / 32;
uint lane = thread_index_in_simdgroup;
if (tile >= uint(NT)) {
  return;
}
uint row = tile / KB;
uint k0 = (tile % KB) * BS;
uint len = metal::min(uint(BS), uint(K) - k0);
float amax = 0.0f;
bool has_nan = false;
for (uint j = lane; j < len; j += 32) {
  float a = metal::fabs(float(x[row * K + k0 + j]));
  has_nan = has_nan || metal::isnan(a);
  amax = metal::max(amax, a);
}
amax = metal::simd_max(amax);
has_nan = metal::simd_any(has_nan);
float sc = has_nan ? NAN : metal::max(amax, amax_min) / fp8_max;  // a NaN poisons its tile, as the reference
if (UE8M0) {
  sc = ue8m0_ceil(sc);
}
if (lane == 0) {
  s[tile] = sc;
}
for (uint j = lane; j < len; j += 32) {
  float v = float(x[row * K + k0 + j]) / sc;
  y[row * K + k0 + j] = e4m3_encode(metal::isnan(v) ? v : metal::clamp(v, -fp8_max, fp8_max));
}

// @kernel weight_dequant
// One thread per element (k, n) of the grid. Inputs: w (N, K) uint8 e4m3 bits, scale_inv (NB, KB) float32.
// Output: out (N, K) O = e4m3(w) * scale_inv[n / BS, k / BS].
constexpr int KB = (K + BS - 1) / BS;
uint k = thread_position_in_grid.x;
uint n = thread_position_in_grid.y;
if (k >= uint(K) || n >= uint(N)) {
  return;
}
out[n * K + k] = O(e4m3_decode(w[n * K + k]) * scale_inv[(n / BS) * KB + k / BS]);

// @kernel fp8_gemm
// Block-scaled FP8 GEMM c = dequant(a) @ dequant(b)^T with a float32 accumulator promoted per K block (report
// section 3.3.2): for each K block kb, acc += (a_kb @ b_kb^T) * a_s[m, kb] * b_s[n / SB, kb].
// One threadgroup of 16 x 16 threads per 64 x 64 tile of c, each thread 4 x 4 outputs (rows ty + 16 i, columns
// tx + 16 j). A K block (BS wide, the last one partial) runs in chunks of 32: the chunk's e4m3 bits of a (64 x 32)
// and b (64 x 32) are decoded into threadgroup memory (zeros past M, N or the block's end) and every thread adds its
// products into a float32 partial sum, which the block's scales then promote into the accumulator.
// Inputs: a (M, K) uint8 e4m3 bits, a_s (M, KB) float32 per-tile scales, b (N, K) uint8 e4m3 bits, b_s (NS, KB)
// float32: SB = BS for BS x BS block scales (NS = ceil(N / BS), weights) or SB = 1 for per-row 1 x BS tile
// scales (NS = N, an act_quant operand). Output: c (M, N) O. M is read from a's shape (no recompile per M).
constexpr int KB = (K + BS - 1) / BS;
const int M = a_shape[0];
constexpr int TM = 64;
constexpr int TN = 64;
constexpr int BK = 32;
constexpr int LD = BK + 1;  // padded rows
threadgroup float at[TM * LD];
threadgroup float bt[TN * LD];
uint tx = thread_position_in_threadgroup.x;
uint ty = thread_position_in_threadgroup.y;
uint tid = ty * 16 + tx;
uint m0 = threadgroup_position_in_grid.y * TM;
uint n0 = threadgroup_position_in_grid.x * TN;
float acc[4][4];
float part[4][4];
for (int i = 0; i < 4; i++) {
  for (int j = 0; j < 4; j++) {
    acc[i][j] = 0.0f;
  }
}
for (int kb = 0; kb < KB; kb++) {
  int kbeg = kb * BS;
  int kend = metal::min(kbeg + BS, K);
  for (int i = 0; i < 4; i++) {
    for (int j = 0; j < 4; j++) {
      part[i][j] = 0.0f;
    }
  }
  for (int kc = kbeg; kc < kend; kc += BK) {
    for (uint e = tid; e < uint(TM * BK); e += 256) {
      uint r = e / BK;
      int k = kc + int(e % BK);
      at[r * LD + e % BK] = (m0 + r < uint(M) && k < kend) ? e4m3_decode(a[(m0 + r) * K + k]) : 0.0f;
      bt[r * LD + e % BK] = (n0 + r < uint(N) && k < kend) ? e4m3_decode(b[(n0 + r) * K + k]) : 0.0f;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    int len = metal::min(BK, kend - kc);
    for (int kk = 0; kk < len; kk++) {
      float av[4];
      float bv[4];
      for (int i = 0; i < 4; i++) {
        av[i] = at[(ty + 16 * i) * LD + kk];
        bv[i] = bt[(tx + 16 * i) * LD + kk];
      }
      for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 4; j++) {
          part[i][j] = metal::fma(av[i], bv[j], part[i][j]);
        }
      }
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  for (int i = 0; i < 4; i++) {
    uint m = m0 + ty + 16 * i;
    if (m >= uint(M)) {
      continue;
    }
    float sa = a_s[m * KB + kb];
    for (int j = 0; j < 4; j++) {
      uint n = n0 + tx + 16 * j;
      if (n < uint(N)) {
        acc[i][j] += part[i][j] * sa * b_s[(n / SB) * KB + kb];
      }
    }
  }
}
for (int i = 0; i < 4; i++) {
  for (int j = 0; j < 4; j++) {
    uint m = m0 + ty + 16 * i;
    uint n = n0 + tx + 16 * j;
    if (m < uint(M) && n < uint(N)) {
      c[m * N + n] = O(acc[i][j]);
    }
  }
}
