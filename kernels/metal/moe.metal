// DeepSeekMoE router (noaux_tc): sigmoid scores, group-limited top-k with the correction bias.
// Semantics: reference/moe.py Router (DeepSeek-V3 report section 2.1.2, eq. 12-16).

// @kernel moe_route
// One thread per token; its E scores live in registers. Template: E experts, K chosen, G groups,
// KG kept groups, NORM (renormalize the weights), N tokens.
// Inputs: logits (N, E) T, bias (E,) float32. Outputs: topk_idx (N, K) int32 (descending biased score,
// ties to the lower id, a NaN above every number as in torch.topk), topk_weight (N, K) float32 (unscaled: the caller multiplies by
// routed_scaling_factor), scores (N, E) float32 = sigmoid(logits).
uint n = thread_position_in_grid.x;
if (n >= uint(N)) {
  return;
}
float s[E];
float c[E];
for (int e = 0; e < E; e++) {
  s[e] = 1.0f / (1.0f + metal::exp(-float(logits[n * E + e])));
  c[e] = s[e] + bias[e];
  if (metal::isnan(c[e])) {
    c[e] = INFINITY;  // a NaN ranks first, as in torch.topk: its expert is picked and its NaN weight shows
  }
  scores[n * E + e] = s[e];
}
if (G > 1) {
  constexpr int GS = E / G;
  float gscore[G];
  bool gkeep[G];
  for (int g = 0; g < G; g++) {
    float m1 = -INFINITY;
    float m2 = -INFINITY;
    for (int j = 0; j < GS; j++) {
      float v = c[g * GS + j];
      if (v > m1) {
        m2 = m1;
        m1 = v;
      } else if (v > m2) {
        m2 = v;
      }
    }
    gscore[g] = m1 + m2;
    gkeep[g] = false;
  }
  for (int kk = 0; kk < KG; kk++) {
    int best = -1;
    for (int g = 0; g < G; g++) {
      if (!gkeep[g] && (best < 0 || gscore[g] > gscore[best])) {
        best = g;
      }
    }
    gkeep[best] = true;
  }
  for (int e = 0; e < E; e++) {
    if (!gkeep[e / GS]) {
      c[e] = -INFINITY;
    }
  }
}
bool taken[E];
for (int e = 0; e < E; e++) {
  taken[e] = false;
}
float wsum = 0.0f;
for (int kk = 0; kk < K; kk++) {
  int best = -1;
  for (int e = 0; e < E; e++) {
    if (!taken[e] && (best < 0 || c[e] > c[best])) {
      best = e;
    }
  }
  taken[best] = true;
  topk_idx[n * K + kk] = best;
  topk_weight[n * K + kk] = s[best];
  wsum += s[best];
}
if (NORM) {
  for (int kk = 0; kk < K; kk++) {
    topk_weight[n * K + kk] = topk_weight[n * K + kk] / (wsum + 1e-20f);
  }
}
