// SwiGLU: silu(gate) * up, forward and backward (Shazeer 2020). Semantics: reference/swiglu.py.
// Elementwise, one thread per element, computed in float32 and rounded once to T.

// @kernel swiglu_fwd
// Inputs: gate (N,) T, up (N,) T. Output: out (N,) T.
uint i = thread_position_in_grid.x;
if (i >= uint(N)) {
  return;
}
float a = float(gate[i]);
float s = 1.0f / (1.0f + metal::exp(-a));
out[i] = T(a * s * float(up[i]));

// @kernel swiglu_bwd
// dgate = g * up * s * (1 + a * (1 - s)), dup = g * a * s with s = sigmoid(a), a = gate.
// Inputs: gate (N,) T, up (N,) T, g (N,) G. Outputs: dgate (N,) T, dup (N,) T.
uint i = thread_position_in_grid.x;
if (i >= uint(N)) {
  return;
}
float a = float(gate[i]);
float b = float(up[i]);
float d = float(g[i]);
float s = 1.0f / (1.0f + metal::exp(-a));
dgate[i] = T(d * b * s * (1.0f + a * (1.0f - s)));
dup[i] = T(d * a * s);
