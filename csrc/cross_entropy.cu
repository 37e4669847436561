// Cross-entropy loss and gradient over [rows, vocab] logits: one block per row, two passes.
//
// Pass 1 streams the row from HBM once (16-byte loads), keeping a per-thread online max / sum
// of exponentials, and copies the first part of the row into shared memory (up to ~226 KB: 90%
// of a 128k-vocab bf16 row). Pass 2 computes the gradient from that copy (the rest of the row
// is re-read from L2, where it still is) and writes it once. So HBM sees about one read of the
// logits and one write of the gradient. The gradient may overwrite the logits: each element is
// read (pass 1 caches it, or pass 2 reads it) before its own thread overwrites it.
#include <math.h>

#include "common.cuh"
#include "cross_entropy.h"

namespace fastft {
namespace {

constexpr int kMaxUnroll = 4;  // 16-byte loads in flight per thread

struct RowMath {
  float scale, softcap, inv_softcap;
  bool has_scale, has_softcap;

  __device__ __forceinline__ float z(float x) const {
    float v = has_scale ? x * scale : x;
    return has_softcap ? softcap * tanhf(v * inv_softcap) : v;
  }
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const Vec<T, VEC>* p, bool streaming) {
  if constexpr (sizeof(Vec<T, VEC>) == 16) {
    // Elements that go to shared memory are not needed in L2 again: evict them first.
    int4 raw = streaming ? __ldcs(reinterpret_cast<const int4*>(p))
                         : *reinterpret_cast<const int4*>(p);
    return *reinterpret_cast<Vec<T, VEC>*>(&raw);
  } else {
    return *p;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(Vec<T, VEC>* p, const Vec<T, VEC>& v) {
  if constexpr (sizeof(Vec<T, VEC>) == 16) {
    __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));  // write-once data
  } else {
    *p = v;
  }
}

// (m, s): a running max and the sum of exp(z - m). Safe when either side is empty (m = -inf).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * __expf(m - mm)) + (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mm));
  m = mm;
}

__device__ __forceinline__ void add_element(float z, float& m, float& s) {
  if (z > m) {
    s = (m == -INFINITY ? 0.f : s * __expf(m - z)) + 1.f;
    m = z;
  } else if (m != -INFINITY) {  // z <= m == -inf: z is -inf too and adds nothing
    s += __expf(z - m);
  }
}

// Gradient of one element: (softmax - smoothing/V - (1 - eps)[c == label]) * w * dz/dx.
__device__ __forceinline__ float grad_of(float x, int64_t c, const RowMath& rm, float lse,
                                         int64_t label, float on_label, float off_label,
                                         float w) {
  float v = rm.has_scale ? x * rm.scale : x;
  float dz = rm.has_scale ? rm.scale : 1.f;
  if (rm.has_softcap) {
    const float t = tanhf(v * rm.inv_softcap);
    v = rm.softcap * t;
    dz *= 1.f - t * t;
  }
  const float p = __expf(v - lse);
  return (p - (c == label ? on_label : off_label)) * w * dz;
}

constexpr float kLog2e = 1.4426950408889634f;

// TRANSFORM: a logit scale or softcap is on (else z = x and the inner loops skip that math).
template <typename T, int VEC, bool TRANSFORM>
__global__ void __launch_bounds__(1024) cross_entropy_kernel(const CrossEntropyArgs a,
                                                             int64_t cache_vecs) {
  using V = Vec<T, VEC>;
  // the transform path is compute-heavier (tanhf) and needs the registers more than the loads
  constexpr int kUnroll = TRANSFORM ? 2 : kMaxUnroll;
  extern __shared__ __align__(16) unsigned char cache_raw[];
  V* cache = reinterpret_cast<V*>(cache_raw);
  __shared__ float red_m[32], red_s[32], red_z[32];
  __shared__ float row_lse;

  const int64_t row = blockIdx.x;
  const int64_t vocab = a.vocab;
  const T* x = static_cast<const T*>(a.logits) + row * a.logits_stride;
  T* g = a.grad ? static_cast<T*>(a.grad) + row * a.grad_stride : nullptr;
  const int64_t label = a.labels[row];
  const bool valid = label != a.ignore_index;
  const int tid = threadIdx.x, nthreads = blockDim.x;

  // The row as [head scalars | nvec aligned vectors | tail scalars]; with VEC == 1 all vectors.
  int64_t head = 0;
  if (VEC > 1) {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(x) % 16;
    head = mis ? (16 - mis) / sizeof(T) : 0;
    if (head > vocab) head = vocab;
  }
  const int64_t nvec = (vocab - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int64_t nscalar = head + (vocab - tail);
  const V* xv = reinterpret_cast<const V*>(x + head);
  V* gv = g ? reinterpret_cast<V*>(g + head) : nullptr;
  const int64_t cached = g ? (cache_vecs < nvec ? cache_vecs : nvec) : 0;

  RowMath rm;
  rm.scale = a.scale; rm.softcap = a.softcap;
  rm.inv_softcap = a.softcap > 0.f ? 1.f / a.softcap : 0.f;
  rm.has_scale = a.scale != 1.f; rm.has_softcap = a.softcap > 0.f;
  const bool smoothing = a.smoothing != 0.f;

  if (valid) {
    // ---- pass 1: online max / sum of exp, sum of z (label smoothing), cache the row
    float m = -INFINITY, s = 0.f, zsum = 0.f;
    for (int64_t base = tid; base < nvec; base += (int64_t)kUnroll * nthreads) {
      V raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + (int64_t)u * nthreads;
        if (v < nvec) raw[u] = load_vec<T, VEC>(xv + v, v < cached);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + (int64_t)u * nthreads;
        if (v >= nvec) continue;
        if (v < cached) cache[v] = raw[u];
        float z[VEC];
        float vmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          z[i] = TRANSFORM ? rm.z(to_f32(raw[u].v[i])) : to_f32(raw[u].v[i]);
          vmax = fmaxf(vmax, z[i]);
        }
        if (smoothing) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) zsum += z[i];
        }
        if (vmax > m) {
          s = (m == -INFINITY) ? 0.f : s * exp2f((m - vmax) * kLog2e);
          m = vmax;
        }
        // (z - m) first: the max element then contributes exactly 1
        if (m != -INFINITY) {  // else every z so far is -inf (masked vocabulary): adds nothing
#pragma unroll
          for (int i = 0; i < VEC; ++i) s += exp2f((z[i] - m) * kLog2e);
        }
      }
    }
    for (int64_t i = tid; i < nscalar; i += nthreads) {
      const int64_t c = i < head ? i : tail + (i - head);
      const float z = rm.z(to_f32(x[c]));
      add_element(z, m, s);
      zsum += z;
    }
    // ---- block reduction of (m, s) and zsum
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge(m, s, m2, s2);
      if (smoothing) zsum += __shfl_xor_sync(0xffffffffu, zsum, o);
    }
    const int lane = tid & 31, warp = tid >> 5, warps = (nthreads + 31) >> 5;
    if (lane == 0) { red_m[warp] = m; red_s[warp] = s; red_z[warp] = zsum; }
    __syncthreads();
    if (warp == 0) {
      m = lane < warps ? red_m[lane] : -INFINITY;
      s = lane < warps ? red_s[lane] : 0.f;
      zsum = lane < warps ? red_z[lane] : 0.f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
        if (smoothing) zsum += __shfl_xor_sync(0xffffffffu, zsum, o);
      }
      if (lane == 0) {
        const float lse = m + __logf(s);
        const bool in_range = label >= 0 && label < vocab;
        // read before any thread can overwrite it (pass 2 starts after the barrier below)
        const float z_y = in_range ? rm.z(to_f32(x[label])) : NAN;
        float loss = lse - (1.f - a.smoothing) * z_y;
        if (smoothing) loss -= a.smoothing / (float)vocab * zsum;
        a.loss[row] = loss;
        row_lse = lse;
      }
    }
    __syncthreads();
  } else if (tid == 0) {
    a.loss[row] = 0.f;
  }
  if (!g) return;

  // ---- pass 2: the gradient
  if (!valid) {
    V zero;
#pragma unroll
    for (int i = 0; i < VEC; ++i) zero.v[i] = from_f32<T>(0.f);
    for (int64_t v = tid; v < nvec; v += nthreads) store_vec<T, VEC>(gv + v, zero);
    for (int64_t i = tid; i < nscalar; i += nthreads) {
      const int64_t c = i < head ? i : tail + (i - head);
      g[c] = from_f32<T>(0.f);
    }
    return;
  }
  const float lse = row_lse;
  const float w = a.row_weight[row * a.weight_stride];
  const float off_label = a.smoothing / (float)vocab;
  const float on_label = off_label + (1.f - a.smoothing);
  // d/dx = (p - off_label - (1 - eps)[c == label]) * w * dz/dx, dz/dx = scale * (1 - t^2)
  const float w_scaled = rm.has_scale ? w * rm.scale : w;
  const float label_w = (1.f - a.smoothing) * w_scaled;
  for (int64_t base = tid; base < nvec; base += (int64_t)kUnroll * nthreads) {
    V raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + (int64_t)u * nthreads;
      if (v < nvec) raw[u] = v < cached ? cache[v] : load_vec<T, VEC>(xv + v, true);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + (int64_t)u * nthreads;
      if (v >= nvec) continue;
      float gf[VEC], dz[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float z = to_f32(raw[u].v[i]);
        dz[i] = 1.f;
        if (TRANSFORM) {
          if (rm.has_scale) z *= rm.scale;
          if (rm.has_softcap) {
            const float t = tanhf(z * rm.inv_softcap);
            z = rm.softcap * t;
            dz[i] = 1.f - t * t;
          }
        }
        const float p = exp2f((z - lse) * kLog2e);
        gf[i] = (p - off_label) * (TRANSFORM ? w_scaled * dz[i] : w);
      }
      // the label's element, once per vector rather than a compare per element
      const int64_t rel = label - (head + v * VEC);
      if (rel >= 0 && rel < VEC) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (i == rel) gf[i] -= label_w * dz[i];
        }
      }
      V out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) out.v[i] = from_f32<T>(gf[i]);
      store_vec<T, VEC>(gv + v, out);
    }
  }
  for (int64_t i = tid; i < nscalar; i += nthreads) {
    const int64_t c = i < head ? i : tail + (i - head);
    g[c] = from_f32<T>(grad_of(to_f32(x[c]), c, rm, lse, label, on_label, off_label, w));
  }
}

int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

template <typename T, int VEC, bool TRANSFORM>
void launch(const CrossEntropyArgs& a, int blocks_per_sm, cudaStream_t stream) {
  int dev = 0, optin = 0, per_sm = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  // Threads: enough for ~8 vectors each on short rows, 1024 (or 512 with 2 blocks/SM) on long.
  const int64_t nvec = (a.vocab + VEC - 1) / VEC;
  const int max_threads = blocks_per_sm == 2 ? 512 : 1024;
  int threads = pow2_ceil((nvec + 7) / 8);
  threads = threads < 128 ? 128 : (threads > max_threads ? max_threads : threads);
  // Shared-memory cache for pass 2 (only when a gradient is written): as much of the row as
  // fits next to the kernel's static shared memory and the per-block reservation.
  int64_t cache_vecs = 0;
  if (a.grad) {
    // per block: its share of the SM minus the 1 KB the hardware reserves per block, and
    // 1 KB for the kernel's static shared memory and slack
    int64_t share = (int64_t)per_sm / blocks_per_sm - 1024;
    if (share > optin) share = optin;
    const int64_t budget = share - 1024;
    const int64_t fit = budget > 0 ? budget / (int64_t)sizeof(Vec<T, VEC>) : 0;
    cache_vecs = nvec + 1 < fit ? nvec + 1 : fit;
  }
  const size_t smem = (size_t)cache_vecs * sizeof(Vec<T, VEC>);
  auto kernel = cross_entropy_kernel<T, VEC, TRANSFORM>;
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  }
  kernel<<<(unsigned)a.rows, threads, smem, stream>>>(a, cache_vecs);
}

// The kernel peels each row's misaligned head, so any logits rows take 16-byte loads; the
// gradient rows must then sit at the same offset from a 16-byte boundary as the logits rows.
template <typename T>
bool vector_ok(const CrossEntropyArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  const uintptr_t lx = reinterpret_cast<uintptr_t>(a.logits);
  if (lx % sizeof(T) != 0) return false;
  if (!a.grad) return true;
  const uintptr_t lg = reinterpret_cast<uintptr_t>(a.grad);
  const bool same_offsets = a.grad_stride == a.logits_stride ||
                            (a.grad_stride % VEC == 0 && a.logits_stride % VEC == 0);
  return lg % 16 == lx % 16 && same_offsets;
}

}  // namespace

void cross_entropy_forward(const CrossEntropyArgs& a, int blocks_per_sm, cudaStream_t stream) {
  if (a.rows == 0) return;
  if (blocks_per_sm != 2) blocks_per_sm = 1;
  dispatch_float(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool transform = a.scale != 1.f || a.softcap > 0.f;
    if (vector_ok<T>(a)) {
      if (transform) launch<T, VEC, true>(a, blocks_per_sm, stream);
      else launch<T, VEC, false>(a, blocks_per_sm, stream);
    } else {
      if (transform) launch<T, 1, true>(a, blocks_per_sm, stream);
      else launch<T, 1, false>(a, blocks_per_sm, stream);
    }
  });
}

}  // namespace fastft
