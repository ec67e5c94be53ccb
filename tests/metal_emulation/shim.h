// Metal emulation shim: lets the bodies of kernels/metal (written for mx.fast.metal_kernel) compile with g++ and
// run on the CPU. See README.md for the supported subset. Everything outside it fails to compile or raises.
//
// Execution model: the driver (driver.py) generates a C++ function with the same parameters MLX would generate,
// buffers become bounds-checked views (emu::Buf), and emu::run executes the grid: threadgroups one after another
// (in a seeded random order), the threads of a group as fibers (ucontext) scheduled in a seeded random order.
// A fiber runs until it reaches threadgroup_barrier or a simd_* function, where it waits for its threadgroup or
// its simdgroup; so a read of threadgroup memory that lacks its barrier sees another thread's progress (or the
// poison) and the result moves with the seed.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned long ulong;
typedef _Float16 half;
typedef _Float16 float16_t;

// ---- address spaces -------------------------------------------------------------------------------------------
// Buffers are the generated parameters (bounds-checked views); a body may not declare raw device/constant
// pointers (that would bypass the bounds checks): `device` is left undefined on purpose, so using it fails to
// compile with an error naming it. `threadgroup` arrays are function statics in the emu_tg section: the
// threadgroups run one after another, so a static is exactly one group's shared memory; the driver poisons the
// section (0xFF bytes: NaN floats) before every group.
#define device EMU_UNSUPPORTED_device_address_space_in_a_body__index_the_buffer_by_name
#define constant static const
#define thread
#define threadgroup static __attribute__((section("emu_tg")))

namespace emu {

struct Fault {
  std::string msg;
};

[[noreturn]] inline void fault(const std::string& msg) { throw Fault{msg}; }

// A bounds-checked view of one buffer: x[i] and x + i (a view at an offset) as in the Metal body.
template <class T>
struct Buf {
  T* base;
  long long n;
  long long off;
  const char* name;
  T& operator[](long long i) const {
    long long j = off + i;
    if (j < 0 || j >= n) {
      fault(std::string("out-of-bounds access: ") + name + "[" + std::to_string(j) + "], buffer has " +
            std::to_string(n) + " elements");
    }
    return base[j];
  }
  T& operator*() const { return (*this)[0]; }
  Buf operator+(long long d) const { return Buf{base, n, off + d, name}; }
  Buf operator-(long long d) const { return Buf{base, n, off - d, name}; }
};

}  // namespace emu

// ---- bfloat16 (storage type; arithmetic in float) ---------------------------------------------------------------
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  template <class U, class = typename std::enable_if<std::is_arithmetic<U>::value>::type>
  bfloat16_t(U v) { set(float(v)); }
  bfloat16_t(_Float16 v) { set(float(v)); }
  void set(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

// ---- vector types -----------------------------------------------------------------------------------------------
struct uint2 {
  uint x, y;
};
struct uint3 {
  uint x, y, z;
};

#define EMU_VEC_OPS(V, N)                                                        \
  inline V operator+(V a, V b) { V r; for (int i = 0; i < N; i++) r[i] = a[i] + b[i]; return r; } \
  inline V operator-(V a, V b) { V r; for (int i = 0; i < N; i++) r[i] = a[i] - b[i]; return r; } \
  inline V operator*(V a, V b) { V r; for (int i = 0; i < N; i++) r[i] = a[i] * b[i]; return r; } \
  inline V operator/(V a, V b) { V r; for (int i = 0; i < N; i++) r[i] = a[i] / b[i]; return r; } \
  inline V operator*(V a, float s) { V r; for (int i = 0; i < N; i++) r[i] = a[i] * s; return r; } \
  inline V operator*(float s, V a) { return a * s; }                                                \
  inline V operator/(V a, float s) { V r; for (int i = 0; i < N; i++) r[i] = a[i] / s; return r; } \
  inline V operator+(V a, float s) { V r; for (int i = 0; i < N; i++) r[i] = a[i] + s; return r; } \
  inline V operator-(V a, float s) { V r; for (int i = 0; i < N; i++) r[i] = a[i] - s; return r; } \
  inline V& operator+=(V& a, V b) { return a = a + b; }                                            \
  inline V& operator*=(V& a, float s) { return a = a * s; }

struct float2 {
  float x, y;
  float2() = default;
  explicit float2(float s) : x(s), y(s) {}
  float2(float a, float b) : x(a), y(b) {}
  float& operator[](int i) { return i == 0 ? x : y; }
  float operator[](int i) const { return i == 0 ? x : y; }
};
EMU_VEC_OPS(float2, 2)

struct float4 {
  float x, y, z, w;
  float4() = default;
  explicit float4(float s) : x(s), y(s), z(s), w(s) {}
  float4(float a, float b, float c, float d) : x(a), y(b), z(c), w(d) {}
  float& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  float operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};
EMU_VEC_OPS(float4, 4)

template <class To, class From>
inline To as_type(From f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of equal size");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// ---- the scheduler ----------------------------------------------------------------------------------------------
namespace emu {

enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };

struct Attrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid, dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup;
};

struct Fiber {
  ucontext_t ctx;
  State st;
  Attrs a;
  int lane, sg;
};

struct SimdState {
  int nwait = 0;
  bool waiting[32];
  int op[32];
  int arg[32];
  unsigned char in[32][16];
  unsigned char out[32][16];
  void (*complete)(SimdState&) = nullptr;
};

struct Runner {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<SimdState> simds;
  std::vector<int> runnable;
  ucontext_t sched;
  Fiber* cur = nullptr;
  void (*thread_fn)(const Attrs&) = nullptr;
  std::string fault;
  unsigned long long rng = 1;
  unsigned long long next() {  // xorshift64*
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
  }
};

inline Runner*& runner() {
  static Runner* r = nullptr;
  return r;
}

inline void yield() {
  Runner& r = *runner();
  swapcontext(&r.cur->ctx, &r.sched);
}

// Release a simdgroup whose every live lane waits at a simd function: compute all results at once.
inline void try_complete(int sg) {
  Runner& r = *runner();
  SimdState& s = r.simds[sg];
  int live = 0;
  for (int i = 0; i < 32; i++) {
    size_t f = size_t(sg) * 32 + i;
    if (f < r.fibers.size() && r.fibers[f].st != DONE) live++;
  }
  if (s.nwait == 0 || s.nwait != live) return;
  int op = -1;
  for (int i = 0; i < 32; i++) {
    if (!s.waiting[i]) continue;
    if (op >= 0 && s.op[i] != op) fault("divergent simdgroup: lanes wait at different simd functions");
    op = s.op[i];
  }
  s.complete(s);
  for (int i = 0; i < 32; i++) {
    if (s.waiting[i]) {
      s.waiting[i] = false;
      r.fibers[size_t(sg) * 32 + i].st = RUNNABLE;
      r.runnable.push_back(sg * 32 + i);
    }
  }
  s.nwait = 0;
}

template <class T, class Op>
void complete(SimdState& s) {
  T v[32];
  for (int i = 0; i < 32; i++) {
    if (s.waiting[i]) std::memcpy(&v[i], s.in[i], sizeof(T));
  }
  for (int i = 0; i < 32; i++) {
    if (!s.waiting[i]) continue;
    T res = Op::apply(v, s.waiting, i, s.arg[i]);
    std::memcpy(s.out[i], &res, sizeof(T));
  }
}

template <class T, class Op>
T simd_call(T x, int arg) {
  static_assert(sizeof(T) <= 16, "simd functions take scalars");
  Runner& r = *runner();
  Fiber& f = *r.cur;
  SimdState& s = r.simds[f.sg];
  std::memcpy(s.in[f.lane], &x, sizeof(T));
  s.arg[f.lane] = arg;
  s.op[f.lane] = Op::code * 64 + int(sizeof(T));
  s.waiting[f.lane] = true;
  s.complete = &complete<T, Op>;
  s.nwait++;
  f.st = AT_SIMD;
  try_complete(f.sg);
  yield();
  T res;
  std::memcpy(&res, s.out[f.lane], sizeof(T));
  return res;
}

inline void barrier() {
  runner()->cur->st = AT_BARRIER;
  yield();
}

template <class T>
inline T inactive_lane(int src) {
  fault("simd shuffle reads lane " + std::to_string(src) + ", which is not active");
}

struct OpSum {
  static constexpr int code = 1;
  template <class T>
  static T apply(const T* v, const bool* on, int, int) {
    T acc = T(0);
    for (int i = 0; i < 32; i++) if (on[i]) acc = T(acc + v[i]);
    return acc;
  }
};
struct OpMax {
  static constexpr int code = 2;
  template <class T>
  static T apply(const T* v, const bool* on, int, int) {
    bool first = true;
    T acc = T(0);
    for (int i = 0; i < 32; i++) {
      if (on[i] && (first || v[i] > acc || acc != acc)) acc = v[i];
      if (on[i]) first = false;
    }
    return acc;
  }
};
struct OpMin {
  static constexpr int code = 3;
  template <class T>
  static T apply(const T* v, const bool* on, int, int) {
    bool first = true;
    T acc = T(0);
    for (int i = 0; i < 32; i++) {
      if (on[i] && (first || v[i] < acc || acc != acc)) acc = v[i];
      if (on[i]) first = false;
    }
    return acc;
  }
};
struct OpPrefixExclusiveSum {
  static constexpr int code = 4;
  template <class T>
  static T apply(const T* v, const bool* on, int lane, int) {
    T acc = T(0);
    for (int i = 0; i < lane; i++) if (on[i]) acc = T(acc + v[i]);
    return acc;
  }
};
struct OpShuffle {  // simd_shuffle / simd_broadcast: arg = source lane
  static constexpr int code = 5;
  template <class T>
  static T apply(const T* v, const bool* on, int, int src) {
    if (src < 0 || src >= 32 || !on[src]) return inactive_lane<T>(src);
    return v[src];
  }
};
struct OpShuffleXor {
  static constexpr int code = 6;
  template <class T>
  static T apply(const T* v, const bool* on, int lane, int mask) {
    return OpShuffle::apply(v, on, lane, (lane ^ mask) & 31);
  }
};
struct OpShuffleDown {  // lanes past the end keep their own value
  static constexpr int code = 7;
  template <class T>
  static T apply(const T* v, const bool* on, int lane, int delta) {
    int src = lane + delta;
    return src < 32 ? OpShuffle::apply(v, on, lane, src) : v[lane];
  }
};
struct OpShuffleUp {
  static constexpr int code = 8;
  template <class T>
  static T apply(const T* v, const bool* on, int lane, int delta) {
    int src = lane - delta;
    return src >= 0 ? OpShuffle::apply(v, on, lane, src) : v[lane];
  }
};
struct OpAny {
  static constexpr int code = 9;
  static bool apply(const bool* v, const bool* on, int, int) {
    for (int i = 0; i < 32; i++) if (on[i] && v[i]) return true;
    return false;
  }
};
struct OpAll {
  static constexpr int code = 10;
  static bool apply(const bool* v, const bool* on, int, int) {
    for (int i = 0; i < 32; i++) if (on[i] && !v[i]) return false;
    return true;
  }
};

inline void trampoline(int idx) {
  Runner& r = *runner();
  Fiber& f = r.fibers[size_t(idx)];
  try {
    r.thread_fn(f.a);
    f.st = DONE;
    try_complete(f.sg);
  } catch (const Fault& e) {
    if (r.fault.empty()) {
      char where[160];
      std::snprintf(where, sizeof where, " (thread_position_in_grid (%u, %u, %u))", f.a.thread_position_in_grid.x,
                    f.a.thread_position_in_grid.y, f.a.thread_position_in_grid.z);
      r.fault = e.msg + where;
    }
    f.st = DONE;
  }
}

// Run the grid: ``grid`` total threads per dimension (MLX dispatches threads: an edge group may be partial),
// ``tg`` threads per group. Returns 0, or 1 with ``err`` holding the first fault.
inline int run(const long* grid, const long* tg, unsigned long long seed, void (*thread_fn)(const Attrs&),
               char* tg_begin, char* tg_end, char* err, int errlen) {
  Runner r;
  runner() = &r;
  r.thread_fn = thread_fn;
  r.rng = seed * 0x9E3779B97F4A7C15ull + 0x1234567ull;
  long tsize = tg[0] * tg[1] * tg[2];
  if (tsize <= 0 || tsize > 1024) {
    std::snprintf(err, size_t(errlen), "threadgroup of %ld threads: Metal allows 1 to 1024", tsize);
    return 1;
  }
  long ng[3];
  for (int d = 0; d < 3; d++) ng[d] = (grid[d] + tg[d] - 1) / tg[d];
  long ngroups = ng[0] * ng[1] * ng[2];
  std::vector<long> order(size_t(ngroups > 0 ? ngroups : 0));
  for (long i = 0; i < ngroups; i++) order[size_t(i)] = i;
  for (long i = ngroups - 1; i > 0; i--) std::swap(order[size_t(i)], order[r.next() % uint64_t(i + 1)]);
  const size_t stack_size = 256 * 1024;
  r.stacks.assign(size_t(tsize), std::vector<char>(stack_size));
  for (long gi : order) {
    long g[3] = {gi % ng[0], (gi / ng[0]) % ng[1], gi / (ng[0] * ng[1])};
    long sz[3];
    for (int d = 0; d < 3; d++) sz[d] = std::min(tg[d], grid[d] - g[d] * tg[d]);
    long n = sz[0] * sz[1] * sz[2];
    if (tg_end > tg_begin) std::memset(tg_begin, 0xFF, size_t(tg_end - tg_begin));
    r.fibers.assign(size_t(n), Fiber());
    r.simds.assign(size_t((n + 31) / 32), SimdState());
    for (auto& s : r.simds) std::memset(s.waiting, 0, sizeof s.waiting);
    r.runnable.clear();
    for (long i = 0; i < n; i++) {
      Fiber& f = r.fibers[size_t(i)];
      long lx = i % sz[0], ly = (i / sz[0]) % sz[1], lz = i / (sz[0] * sz[1]);
      Attrs& a = f.a;
      a.thread_position_in_threadgroup = {uint(lx), uint(ly), uint(lz)};
      a.threadgroup_position_in_grid = {uint(g[0]), uint(g[1]), uint(g[2])};
      a.thread_position_in_grid = {uint(g[0] * tg[0] + lx), uint(g[1] * tg[1] + ly), uint(g[2] * tg[2] + lz)};
      a.threads_per_threadgroup = {uint(sz[0]), uint(sz[1]), uint(sz[2])};
      a.dispatch_threads_per_threadgroup = {uint(tg[0]), uint(tg[1]), uint(tg[2])};
      a.threadgroups_per_grid = {uint(ng[0]), uint(ng[1]), uint(ng[2])};
      a.threads_per_grid = {uint(grid[0]), uint(grid[1]), uint(grid[2])};
      a.thread_index_in_threadgroup = uint(i);
      a.thread_index_in_simdgroup = uint(i % 32);
      a.simdgroup_index_in_threadgroup = uint(i / 32);
      a.simdgroups_per_threadgroup = uint((n + 31) / 32);
      a.threads_per_simdgroup = 32;
      f.lane = int(i % 32);
      f.sg = int(i / 32);
      f.st = RUNNABLE;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = r.stacks[size_t(i)].data();
      f.ctx.uc_stack.ss_size = stack_size;
      f.ctx.uc_link = &r.sched;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&trampoline), 1, int(i));
      r.runnable.push_back(int(i));
    }
    while (r.fault.empty()) {
      if (r.runnable.empty()) {
        long done = 0, at_bar = 0, at_simd = 0;
        for (auto& f : r.fibers) {
          done += f.st == DONE;
          at_bar += f.st == AT_BARRIER;
          at_simd += f.st == AT_SIMD;
        }
        if (done == n) break;
        if (at_simd) {
          r.fault = "deadlock: " + std::to_string(at_simd) + " threads wait at a simd function while " +
                    std::to_string(at_bar) + " wait at threadgroup_barrier (divergent control flow)";
          break;
        }
        if (done) {
          r.fault = "threadgroup_barrier reached by " + std::to_string(at_bar) + " of " + std::to_string(n) +
                    " threads: the others returned first";
          break;
        }
        for (long i = 0; i < n; i++) {
          r.fibers[size_t(i)].st = RUNNABLE;
          r.runnable.push_back(int(i));
        }
        continue;
      }
      size_t k = size_t(r.next() % r.runnable.size());
      int idx = r.runnable[k];
      r.runnable[k] = r.runnable.back();
      r.runnable.pop_back();
      r.cur = &r.fibers[size_t(idx)];
      swapcontext(&r.sched, &r.cur->ctx);
    }
    if (!r.fault.empty()) break;
  }
  runner() = nullptr;
  if (!r.fault.empty()) {
    std::snprintf(err, size_t(errlen), "%s", r.fault.c_str());
    return 1;
  }
  return 0;
}

}  // namespace emu

// ---- the metal namespace: barriers, simd functions, math, atomics ----------------------------------------------
namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags) { emu::barrier(); }
inline void simdgroup_barrier(mem_flags);  // defined below, after the simd functions

template <class T> T simd_sum(T x) { return emu::simd_call<T, emu::OpSum>(x, 0); }
template <class T> T simd_max(T x) { return emu::simd_call<T, emu::OpMax>(x, 0); }
template <class T> T simd_min(T x) { return emu::simd_call<T, emu::OpMin>(x, 0); }
template <class T> T simd_prefix_exclusive_sum(T x) { return emu::simd_call<T, emu::OpPrefixExclusiveSum>(x, 0); }
template <class T> T simd_shuffle(T x, ushort lane) { return emu::simd_call<T, emu::OpShuffle>(x, int(lane)); }
template <class T> T simd_broadcast(T x, ushort lane) { return emu::simd_call<T, emu::OpShuffle>(x, int(lane)); }
template <class T> T simd_shuffle_xor(T x, ushort mask) { return emu::simd_call<T, emu::OpShuffleXor>(x, int(mask)); }
template <class T> T simd_shuffle_down(T x, ushort d) { return emu::simd_call<T, emu::OpShuffleDown>(x, int(d)); }
template <class T> T simd_shuffle_up(T x, ushort d) { return emu::simd_call<T, emu::OpShuffleUp>(x, int(d)); }
inline bool simd_any(bool x) { return emu::simd_call<bool, emu::OpAny>(x, 0); }
inline bool simd_all(bool x) { return emu::simd_call<bool, emu::OpAll>(x, 0); }
inline void simdgroup_barrier(mem_flags) { emu::simd_call<bool, emu::OpAll>(true, 0); }  // a simdgroup sync point

// Math: float in, float out (half/bfloat arguments are promoted by the caller's float() conversion).
#define EMU_MATH_NS                                                          \
  inline float exp(float x) { return std::exp(x); }                        \
  inline float exp2(float x) { return std::exp2(x); }                      \
  inline float log(float x) { return std::log(x); }                        \
  inline float log2(float x) { return std::log2(x); }                      \
  inline float sqrt(float x) { return std::sqrt(x); }                      \
  inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }              \
  inline float tanh(float x) { return std::tanh(x); }                      \
  inline float pow(float x, float y) { return std::pow(x, y); }            \
  inline float sin(float x) { return std::sin(x); }                        \
  inline float cos(float x) { return std::cos(x); }                        \
  inline float divide(float x, float y) { return x / y; }
EMU_MATH_NS
namespace precise {
EMU_MATH_NS
}
namespace fast {
EMU_MATH_NS
}
inline float fabs(float x) { return std::fabs(x); }
inline float abs(float x) { return std::fabs(x); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float rint(float x) { return std::rint(x); }
inline float round(float x) { return std::round(x); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float copysign(float a, float b) { return std::copysign(a, b); }
inline float ldexp(float x, int e) { return std::ldexp(x, e); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
inline bool isfinite(float x) { return std::isfinite(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
template <class T, class = typename std::enable_if<std::is_integral<T>::value>::type>
inline T max(T a, T b) { return a > b ? a : b; }
template <class T, class = typename std::enable_if<std::is_integral<T>::value>::type>
inline T min(T a, T b) { return a < b ? a : b; }
inline float clamp(float x, float lo, float hi) { return std::fmin(std::fmax(x, lo), hi); }
template <class T, class = typename std::enable_if<std::is_integral<T>::value>::type>
inline T clamp(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
using ::as_type;

// Device atomics. The fibers of a launch share one OS thread, so every operation is atomic; the type has the
// layout of T (outputs declared with atomic_outputs=True are views of T arrays).
enum memory_order { memory_order_relaxed };
template <class T>
struct atomic {
  T v;
};
typedef atomic<float> atomic_float;
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
template <class T> T atomic_fetch_add_explicit(atomic<T>* a, T x, memory_order) { T o = a->v; a->v = o + x; return o; }
template <class T> T atomic_fetch_sub_explicit(atomic<T>* a, T x, memory_order) { T o = a->v; a->v = o - x; return o; }
template <class T> T atomic_fetch_max_explicit(atomic<T>* a, T x, memory_order) {
  T o = a->v;
  a->v = o > x ? o : x;
  return o;
}
template <class T> T atomic_fetch_min_explicit(atomic<T>* a, T x, memory_order) {
  T o = a->v;
  a->v = o < x ? o : x;
  return o;
}
template <class T> T atomic_exchange_explicit(atomic<T>* a, T x, memory_order) { T o = a->v; a->v = x; return o; }
template <class T> T atomic_load_explicit(atomic<T>* a, memory_order) { return a->v; }
template <class T> void atomic_store_explicit(atomic<T>* a, T x, memory_order) { a->v = x; }

}  // namespace metal

using namespace metal;  // as MLX's preamble: its generated signatures name atomic<T> unqualified
