// SwiGLU / GeGLU forward and backward: elementwise over [rows, n] views, float32 math.
//
// Each thread handles kUnroll* vectors of 16 bytes (all loads issued before any math, for
// memory-level parallelism); rows of different tensors may have different strides (the two
// halves of a fused gate_up projection). Rows whose width or stride is not a multiple of the
// vector width, or misaligned pointers, take the same kernel with 1-element vectors.
#include "activations.h"
#include "common.cuh"

namespace fastft {
namespace {

constexpr int kThreads = 256;
constexpr int kUnrollFwd = 4;  // 16-byte vectors per thread and tensor: 8 loads in flight
constexpr int kUnrollBwd = 2;  // 6 loads in flight
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kGeluTanhC = 0.044715f;

// erfc(z) for z >= 0 as t * exp(-z^2 + P(t)), t = 1 / (1 + z/2), with P the degree-9
// Chebyshev fit of Numerical Recipes' erfcc: relative error < 1.1e-7 over all z >= 0 in exact
// arithmetic (about 4e-7 absolute in float32 with the fast exp). Branch-free, one reciprocal
// and one exp: libdevice's erff takes two polynomial paths and made the erf GeGLU compute-bound.
// The same coefficients are in triton_kernels/activations.py and tests/test_activations.py.
__device__ __forceinline__ float erfc_nonneg(float z, float zz) {
  const float t = __fdividef(1.f, fmaf(0.5f, z, 1.f));
  float p = 0.17087277f;
  p = fmaf(p, t, -0.82215223f);
  p = fmaf(p, t, 1.48851587f);
  p = fmaf(p, t, -1.13520398f);
  p = fmaf(p, t, 0.27886807f);
  p = fmaf(p, t, -0.18628806f);
  p = fmaf(p, t, 0.09678418f);
  p = fmaf(p, t, 0.37409196f);
  p = fmaf(p, t, 1.00002368f);
  p = fmaf(p, t, -1.26551223f);
  return t * __expf(p - zz);
}

// Phi(g) = P(N(0,1) < g) = 0.5 * erfc(-g / sqrt 2); the lower tail is computed directly (no
// 1 - x cancellation), so GELU's negative tail keeps its relative accuracy.
__device__ __forceinline__ float normal_cdf(float g, float& zz) {
  const float z = fabsf(g) * kInvSqrt2;
  zz = z * z;
  const float half_erfc = 0.5f * erfc_nonneg(z, zz);
  return g >= 0.f ? 1.f - half_erfc : half_erfc;
}

template <int ACT>
__device__ __forceinline__ float act_fwd(float g) {
  if (ACT == kSiLU) return g / (1.f + __expf(-g));
  if (ACT == kGeluErf) { float zz; return g * normal_cdf(g, zz); }
  const float t = tanhf(kSqrt2OverPi * (g + kGeluTanhC * g * g * g));
  return 0.5f * g * (1.f + t);
}

// act(g) and act'(g)
template <int ACT>
__device__ __forceinline__ void act_bwd(float g, float& a, float& da) {
  if (ACT == kSiLU) {
    const float s = 1.f / (1.f + __expf(-g));
    a = g * s;
    da = s * (1.f + g * (1.f - s));
  } else if (ACT == kGeluErf) {
    float zz;  // g^2 / 2
    const float cdf = normal_cdf(g, zz);
    a = g * cdf;
    da = cdf + g * __expf(-zz) * kInvSqrt2Pi;
  } else {
    const float t = tanhf(kSqrt2OverPi * (g + kGeluTanhC * g * g * g));
    a = 0.5f * g * (1.f + t);
    da = 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhC * g * g);
  }
}

// Row and column of vector `idx`; flat (contiguous, rows == 1) launches skip the 64-bit division.
__device__ __forceinline__ void locate(int64_t idx, int64_t rows, int64_t nv, int vec,
                                       int64_t& row, int64_t& col) {
  if (rows == 1) {
    row = 0;
    col = idx * vec;
  } else {
    row = idx / nv;
    col = (idx - row * nv) * vec;
  }
}

template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(kThreads) glu_fwd_kernel(const GluFwdArgs a) {
  constexpr int U = kUnrollFwd;
  const int64_t nv = a.n / VEC;  // vectors per row
  const int64_t total = a.rows * nv;
  const int64_t first = (int64_t)blockIdx.x * kThreads * U + threadIdx.x;
  // Every load is issued before any math (raw 16-byte vectors: few registers).
  Raw<T, VEC> g[U], u[U];
  int64_t row[U], col[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    // past the end: re-load the last vector (not stored) rather than branch, so no join
    // makes ptxas unpack the words before the other loads are issued
    const int64_t idx = min(first + j * kThreads, total - 1);
    locate(idx, a.rows, nv, VEC, row[j], col[j]);
    g[j] = load_raw<T, VEC>(static_cast<const T*>(a.gate) + row[j] * a.g_stride + col[j]);
    u[j] = load_raw<T, VEC>(static_cast<const T*>(a.up) + row[j] * a.u_stride + col[j]);
  }
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (first + j * kThreads >= total) continue;
    float h[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) h[i] = act_fwd<ACT>(elem(g[j], i)) * elem(u[j], i);
    store_f32<T, VEC>(static_cast<T*>(a.out) + row[j] * a.o_stride + col[j], h);
  }
}

// WRITE_H: also h = act(gate) * up (the forward's output, for callers that need both; one more
// 16-byte store per vector instead of a separate forward pass that re-reads gate and up).
template <typename T, int VEC, int ACT, bool WRITE_H>
__global__ void __launch_bounds__(kThreads) glu_bwd_kernel(const GluBwdArgs a) {
  constexpr int U = kUnrollBwd;
  const int64_t nv = a.n / VEC;
  const int64_t total = a.rows * nv;
  const int64_t first = (int64_t)blockIdx.x * kThreads * U + threadIdx.x;
  Raw<T, VEC> d[U], g[U], u[U];
  int64_t row[U], col[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    const int64_t idx = min(first + j * kThreads, total - 1);  // see glu_fwd_kernel
    locate(idx, a.rows, nv, VEC, row[j], col[j]);
    d[j] = load_raw<T, VEC>(static_cast<const T*>(a.dh) + row[j] * a.dh_stride + col[j]);
    g[j] = load_raw<T, VEC>(static_cast<const T*>(a.gate) + row[j] * a.g_stride + col[j]);
    u[j] = load_raw<T, VEC>(static_cast<const T*>(a.up) + row[j] * a.u_stride + col[j]);
  }
#pragma unroll
  for (int j = 0; j < U; ++j) {
    if (first + j * kThreads >= total) continue;
    float dg[VEC], du[VEC], h[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float act, dact;
      act_bwd<ACT>(elem(g[j], i), act, dact);
      const float dh = elem(d[j], i), up = elem(u[j], i);
      dg[i] = dh * up * dact;
      du[i] = dh * act;
      h[i] = act * up;
    }
    store_f32<T, VEC>(static_cast<T*>(a.d_gate) + row[j] * a.dg_stride + col[j], dg);
    store_f32<T, VEC>(static_cast<T*>(a.d_up) + row[j] * a.du_stride + col[j], du);
    if (WRITE_H) store_f32<T, VEC>(static_cast<T*>(a.h) + row[j] * a.h_stride + col[j], h);
  }
}

bool vec_ok(const void* p, int64_t stride, int vec, int elem_bytes) {
  return reinterpret_cast<uintptr_t>(p) % (vec * elem_bytes) == 0 && stride % vec == 0;
}

unsigned grid_for(int64_t rows, int64_t n, int vec, int unroll) {
  const int64_t per_block = (int64_t)kThreads * unroll;
  return (unsigned)((rows * (n / vec) + per_block - 1) / per_block);
}

// Calls f(std::integral_constant-like tag) with the activation as a compile-time int.
template <int ACT> struct ActTag { static constexpr int value = ACT; };
template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case kSiLU: f(ActTag<kSiLU>{}); break;
    case kGeluErf: f(ActTag<kGeluErf>{}); break;
    default: f(ActTag<kGeluTanh>{}); break;
  }
}

}  // namespace

void glu_forward(const GluFwdArgs& args, cudaStream_t s) {
  if (args.rows * args.n == 0) return;
  GluFwdArgs a = args;
  if (a.g_stride == a.n && a.u_stride == a.n && a.o_stride == a.n) {  // contiguous: one row
    a.n *= a.rows;
    a.rows = 1;
    a.g_stride = a.u_stride = a.o_stride = a.n;
  }
  dispatch_float(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = a.n % VEC == 0 && vec_ok(a.gate, a.g_stride, VEC, sizeof(T)) &&
                     vec_ok(a.up, a.u_stride, VEC, sizeof(T)) &&
                     vec_ok(a.out, a.o_stride, VEC, sizeof(T));
    dispatch_act(a.act, [&](auto tag) {
      constexpr int ACT = decltype(tag)::value;
      if (vec) glu_fwd_kernel<T, VEC, ACT><<<grid_for(a.rows, a.n, VEC, kUnrollFwd), kThreads, 0, s>>>(a);
      else glu_fwd_kernel<T, 1, ACT><<<grid_for(a.rows, a.n, 1, kUnrollFwd), kThreads, 0, s>>>(a);
    });
  });
}

void glu_backward(const GluBwdArgs& args, cudaStream_t s) {
  if (args.rows * args.n == 0) return;
  GluBwdArgs a = args;
  const bool write_h = a.h != nullptr;
  if (a.dh_stride == a.n && a.g_stride == a.n && a.u_stride == a.n && a.dg_stride == a.n &&
      a.du_stride == a.n && (!write_h || a.h_stride == a.n)) {  // contiguous: one row
    a.n *= a.rows;
    a.rows = 1;
    a.dh_stride = a.g_stride = a.u_stride = a.dg_stride = a.du_stride = a.h_stride = a.n;
  }
  dispatch_float(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = a.n % VEC == 0 && vec_ok(a.dh, a.dh_stride, VEC, sizeof(T)) &&
                     vec_ok(a.gate, a.g_stride, VEC, sizeof(T)) &&
                     vec_ok(a.up, a.u_stride, VEC, sizeof(T)) &&
                     vec_ok(a.d_gate, a.dg_stride, VEC, sizeof(T)) &&
                     vec_ok(a.d_up, a.du_stride, VEC, sizeof(T)) &&
                     (!write_h || vec_ok(a.h, a.h_stride, VEC, sizeof(T)));
    dispatch_act(a.act, [&](auto tag) {
      constexpr int ACT = decltype(tag)::value;
      const unsigned grid = grid_for(a.rows, a.n, vec ? VEC : 1, kUnrollBwd);
      if (vec && write_h) glu_bwd_kernel<T, VEC, ACT, true><<<grid, kThreads, 0, s>>>(a);
      else if (vec) glu_bwd_kernel<T, VEC, ACT, false><<<grid, kThreads, 0, s>>>(a);
      else if (write_h) glu_bwd_kernel<T, 1, ACT, true><<<grid, kThreads, 0, s>>>(a);
      else glu_bwd_kernel<T, 1, ACT, false><<<grid, kThreads, 0, s>>>(a);
    });
  });
}

}  // namespace fastft
