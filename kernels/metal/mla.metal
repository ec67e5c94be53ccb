// MLA absorbed decode over the latent cache (DeepSeek-V3 report section 2.1.1, eq. 1-11; "absorb" in
// DeepSeek's inference code). Semantics: reference/mla.py MLA.attend_absorbed before W_UV.

// @kernel mla_decode
// One threadgroup of NSG simdgroups (32 * NSG threads) per query (b, h, t). Simdgroup j takes keys
// j, j + NSG, ... with an online softmax; each lane holds R/32 latent features (and DR/32 rope features)
// of the query and the accumulator. The NSG partial (max, sum, acc) are merged in threadgroup memory.
// Query t sees keys s <= S - TQ + t. Inputs: q_latent (B, H, TQ, R) T, q_pe (B, H, TQ, DR) T,
// c_kv (B, S, R) KT, k_pe (B, S, DR) KT, scale scalar float. Output: o_latent (B, H, TQ, R) T.
constexpr int RL = (R + 31) / 32;
constexpr int PL = (DR + 31) / 32;
uint q = threadgroup_position_in_grid.x;
uint tid = thread_position_in_threadgroup.x;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint t = q % TQ;
uint b = q / (H * TQ);
threadgroup float tmax[NSG];
threadgroup float tsum[NSG];
threadgroup float tacc[NSG * R];
float ql[RL];
float qp[PL];
float acc[RL];
for (int i = 0; i < RL; i++) {
  uint f = lane + 32 * i;
  ql[i] = f < uint(R) ? float(q_latent[q * R + f]) : 0.0f;
  acc[i] = 0.0f;
}
for (int i = 0; i < PL; i++) {
  uint f = lane + 32 * i;
  qp[i] = f < uint(DR) ? float(q_pe[q * DR + f]) : 0.0f;
}
float m = -INFINITY;
float l = 0.0f;
uint last = S - TQ + t;
for (uint s = sg; s <= last; s += NSG) {
  uint kv = b * S + s;
  float dot = 0.0f;
  for (int i = 0; i < RL; i++) {
    uint f = lane + 32 * i;
    if (f < uint(R)) {
      dot += ql[i] * float(c_kv[kv * R + f]);
    }
  }
  for (int i = 0; i < PL; i++) {
    uint f = lane + 32 * i;
    if (f < uint(DR)) {
      dot += qp[i] * float(k_pe[kv * DR + f]);
    }
  }
  dot = metal::simd_sum(dot) * scale;
  float m_new = metal::max(m, dot);
  float corr = metal::exp(m - m_new);
  float p = metal::exp(dot - m_new);
  l = l * corr + p;
  for (int i = 0; i < RL; i++) {
    uint f = lane + 32 * i;
    if (f < uint(R)) {
      acc[i] = acc[i] * corr + p * float(c_kv[kv * R + f]);
    }
  }
  m = m_new;
}
if (lane == 0) {
  tmax[sg] = m;
  tsum[sg] = l;
}
for (int i = 0; i < RL; i++) {
  uint f = lane + 32 * i;
  if (f < uint(R)) {
    tacc[sg * R + f] = acc[i];
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
float mm = -INFINITY;
for (int j = 0; j < NSG; j++) {
  mm = metal::max(mm, tmax[j]);
}
float wj[NSG];
float total = 0.0f;
for (int j = 0; j < NSG; j++) {
  wj[j] = metal::exp(tmax[j] - mm);
  total += tsum[j] * wj[j];
}
for (uint f = tid; f < uint(R); f += 32 * NSG) {
  float o = 0.0f;
  for (int j = 0; j < NSG; j++) {
    o += wj[j] * tacc[j * R + f];
  }
  o_latent[q * R + f] = T(o / total);
}
