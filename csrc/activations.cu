// SwiGLU / GeGLU forward and backward: elementwise over [rows, n] views, float32 math.
//
// Each thread handles UNROLL vectors of 16 bytes (all loads issued before any math, for
// memory-level parallelism); rows of different tensors may have different strides (the two
// halves of a fused gate_up projection). Rows whose width or stride is not a multiple of the
// vector width, or misaligned pointers, take the same kernel with 1-element vectors.
#include "activations.h"
#include "common.cuh"

namespace fastft {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kGeluTanhC = 0.044715f;

template <int ACT>
__device__ __forceinline__ float act_fwd(float g) {
  if (ACT == kSiLU) return g / (1.f + __expf(-g));
  if (ACT == kGeluErf) return 0.5f * g * (1.f + erff(g * kInvSqrt2));
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
    const float cdf = 0.5f * (1.f + erff(g * kInvSqrt2));
    a = g * cdf;
    da = cdf + g * __expf(-0.5f * g * g) * kInvSqrt2Pi;
  } else {
    const float t = tanhf(kSqrt2OverPi * (g + kGeluTanhC * g * g * g));
    a = 0.5f * g * (1.f + t);
    da = 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhC * g * g);
  }
}

template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(kThreads) glu_fwd_kernel(const GluFwdArgs a) {
  const int64_t nv = a.n / VEC;  // vectors per row
  const int64_t total = a.rows * nv;
  const int64_t first = (int64_t)blockIdx.x * kThreads * kUnroll + threadIdx.x;
  float g[kUnroll][VEC], u[kUnroll][VEC];
  int64_t row[kUnroll], col[kUnroll];
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const int64_t idx = first + j * kThreads;
    row[j] = idx / nv;
    col[j] = (idx - row[j] * nv) * VEC;
    if (idx < total) {
      load_f32<T, VEC>(static_cast<const T*>(a.gate) + row[j] * a.g_stride + col[j], g[j]);
      load_f32<T, VEC>(static_cast<const T*>(a.up) + row[j] * a.u_stride + col[j], u[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    if (first + j * kThreads >= total) continue;
    float h[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) h[i] = act_fwd<ACT>(g[j][i]) * u[j][i];
    store_f32<T, VEC>(static_cast<T*>(a.out) + row[j] * a.o_stride + col[j], h);
  }
}

template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(kThreads) glu_bwd_kernel(const GluBwdArgs a) {
  const int64_t nv = a.n / VEC;
  const int64_t total = a.rows * nv;
  const int64_t first = (int64_t)blockIdx.x * kThreads * kUnroll + threadIdx.x;
  float d[kUnroll][VEC], g[kUnroll][VEC], u[kUnroll][VEC];
  int64_t row[kUnroll], col[kUnroll];
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const int64_t idx = first + j * kThreads;
    row[j] = idx / nv;
    col[j] = (idx - row[j] * nv) * VEC;
    if (idx < total) {
      load_f32<T, VEC>(static_cast<const T*>(a.dh) + row[j] * a.dh_stride + col[j], d[j]);
      load_f32<T, VEC>(static_cast<const T*>(a.gate) + row[j] * a.g_stride + col[j], g[j]);
      load_f32<T, VEC>(static_cast<const T*>(a.up) + row[j] * a.u_stride + col[j], u[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    if (first + j * kThreads >= total) continue;
    float dg[VEC], du[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float act, dact;
      act_bwd<ACT>(g[j][i], act, dact);
      dg[i] = d[j][i] * u[j][i] * dact;
      du[i] = d[j][i] * act;
    }
    store_f32<T, VEC>(static_cast<T*>(a.d_gate) + row[j] * a.dg_stride + col[j], dg);
    store_f32<T, VEC>(static_cast<T*>(a.d_up) + row[j] * a.du_stride + col[j], du);
  }
}

bool vec_ok(const void* p, int64_t stride, int vec, int elem_bytes) {
  return reinterpret_cast<uintptr_t>(p) % (vec * elem_bytes) == 0 && stride % vec == 0;
}

unsigned grid_for(int64_t rows, int64_t n, int vec) {
  const int64_t per_block = (int64_t)kThreads * kUnroll;
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
      if (vec) glu_fwd_kernel<T, VEC, ACT><<<grid_for(a.rows, a.n, VEC), kThreads, 0, s>>>(a);
      else glu_fwd_kernel<T, 1, ACT><<<grid_for(a.rows, a.n, 1), kThreads, 0, s>>>(a);
    });
  });
}

void glu_backward(const GluBwdArgs& args, cudaStream_t s) {
  if (args.rows * args.n == 0) return;
  GluBwdArgs a = args;
  if (a.dh_stride == a.n && a.g_stride == a.n && a.u_stride == a.n && a.dg_stride == a.n &&
      a.du_stride == a.n) {  // contiguous: one row
    a.n *= a.rows;
    a.rows = 1;
    a.dh_stride = a.g_stride = a.u_stride = a.dg_stride = a.du_stride = a.n;
  }
  dispatch_float(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = a.n % VEC == 0 && vec_ok(a.dh, a.dh_stride, VEC, sizeof(T)) &&
                     vec_ok(a.gate, a.g_stride, VEC, sizeof(T)) &&
                     vec_ok(a.up, a.u_stride, VEC, sizeof(T)) &&
                     vec_ok(a.d_gate, a.dg_stride, VEC, sizeof(T)) &&
                     vec_ok(a.d_up, a.du_stride, VEC, sizeof(T));
    dispatch_act(a.act, [&](auto tag) {
      constexpr int ACT = decltype(tag)::value;
      if (vec) glu_bwd_kernel<T, VEC, ACT><<<grid_for(a.rows, a.n, VEC), kThreads, 0, s>>>(a);
      else glu_bwd_kernel<T, 1, ACT><<<grid_for(a.rows, a.n, 1), kThreads, 0, s>>>(a);
    });
  });
}

}  // namespace fastft
