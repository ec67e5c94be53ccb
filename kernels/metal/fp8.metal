// Fine-grained FP8 (e4m3fn) quantization: act_quant per 1 x BS tile, weight_dequant per BS x BS block.
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
// clamp(x / s, +-fp8_max), s (N, KB) float32 = max(amax, amax_min) / fp8_max (NaN if the tile holds a NaN).
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
