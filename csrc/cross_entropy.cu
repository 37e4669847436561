// Cross-entropy loss and gradient over [rows, vocab] logits. Two kernels:
//
// cluster_kernel (sm_90, the default there): a thread-block CLUSTER per row. Each of the
// cluster's blocks copies its slice of the row into its own shared memory with cp.async (all of
// the slice's 16-byte loads in flight at once, no registers held), computes a partial (max, sum
// of exp, sum of z), and the partials are merged through distributed shared memory; then each
// block writes its slice's gradient from shared memory. A slice is ~32 KB for a 128k bf16 row,
// so several blocks (rows) share an SM and the read, reduction and write phases of different
// rows overlap, while HBM sees exactly one read of the logits and one write of the gradient.
//
// cross_entropy_kernel (every arch, and rows whose slices would not fit): one block per row,
// two passes. Pass 1 streams the row from HBM once (16-byte loads), keeping a per-thread online
// max / sum of exponentials, and copies the first part of the row into shared memory (up to
// ~226 KB: 90% of a 128k-vocab bf16 row). Pass 2 computes the gradient from that copy (the rest
// of the row is re-read from L2, where it still is) and writes it once.
//
// In both the gradient may overwrite the logits: each element is read (into shared memory or
// by the thread that writes it) before it is overwritten, and the label's logit is read before
// the barrier that precedes every write.
#include <math.h>

#include <cooperative_groups.h>
#include <map>
#include <mutex>
#include <tuple>

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

// ---------------------------------------------------------------- sm_90: a cluster per row

// The cluster kernel's code exists only where clusters do; elsewhere it is an empty symbol
// that the launcher never picks (it checks the device and the kernel's compiled arch).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FASTFT_CE_CLUSTER_CODE 1
#else
#define FASTFT_CE_CLUSTER_CODE 0
#endif

constexpr int kClusterThreads = 256;

#if FASTFT_CE_CLUSTER_CODE
constexpr int kClusterWarps = kClusterThreads / 32;

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Split cluster barrier: arrive once this block is done reading the others' shared memory,
// wait just before exiting (a block's shared memory must outlive the other blocks' reads).
// Relaxed: the remote values were already consumed, so the reads are complete; nothing written
// before the arrive is read by another block after the wait.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
#endif

// Grid: rows * cluster_size blocks of kClusterThreads, clusters of cluster_size along x, so
// cluster i is row i and block rank r owns vectors [r * slice_vecs, (r + 1) * slice_vecs) of the
// row's aligned part; rank 0 also owns the misaligned head and tail scalars. Every thread reads
// back (and writes the gradient of) exactly the vectors it copied, so the copy needs no block
// barrier: cp.async.wait_all makes a thread's own copies visible to it.
// 6 blocks per SM: what a 128k bf16 row's 32 KB slices allow in shared memory (40 registers;
// ptxas reports no spills). 1 where the body is empty (sm_75 could not hold 6 x 256 threads).
constexpr int kClusterMinBlocks = FASTFT_CE_CLUSTER_CODE ? 6 : 1;

template <typename T, int VEC, bool TRANSFORM>
__global__ void __launch_bounds__(kClusterThreads, kClusterMinBlocks)
    cluster_kernel(const CrossEntropyArgs a, int64_t slice_vecs) {
#if FASTFT_CE_CLUSTER_CODE
  namespace cg = cooperative_groups;
  using V = Vec<T, VEC>;
  extern __shared__ __align__(16) unsigned char cache_raw[];
  V* cache = reinterpret_cast<V*>(cache_raw);
  __shared__ float red_m[kClusterWarps], red_s[kClusterWarps], red_z[kClusterWarps];
  __shared__ float part[3];  // this block's (max, sum of exp, sum of z), read by the cluster
  __shared__ float row_lse;

  cg::cluster_group cluster = cg::this_cluster();
  const unsigned csize = cluster.num_blocks();
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.x / csize;
  const int64_t vocab = a.vocab;
  const T* x = static_cast<const T*>(a.logits) + row * a.logits_stride;
  T* g = a.grad ? static_cast<T*>(a.grad) + row * a.grad_stride : nullptr;
  const int64_t label = a.labels[row];
  const bool valid = label != a.ignore_index;
  const int tid = threadIdx.x;
  const bool owns_scalars = rank == 0;

  int64_t head = 0;
  {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(x) % 16;
    head = mis ? (16 - mis) / sizeof(T) : 0;
    if (head > vocab) head = vocab;
  }
  const int64_t nvec = (vocab - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int64_t nscalar = head + (vocab - tail);
  const int64_t v_begin = (int64_t)rank * slice_vecs;
  const int64_t v_end = v_begin + slice_vecs < nvec ? v_begin + slice_vecs : nvec;
  const int64_t my_vecs = v_end > v_begin ? v_end - v_begin : 0;
  const V* xv = reinterpret_cast<const V*>(x + head) + v_begin;

  if (!valid) {  // the whole cluster takes this branch (one row): no cluster barrier needed
    if (g) {
      V* gv = reinterpret_cast<V*>(g + head) + v_begin;
      V zero;
#pragma unroll
      for (int i = 0; i < VEC; ++i) zero.v[i] = from_f32<T>(0.f);
      for (int64_t v = tid; v < my_vecs; v += kClusterThreads) store_vec<T, VEC>(gv + v, zero);
      if (owns_scalars) {
        for (int64_t i = tid; i < nscalar; i += kClusterThreads) {
          g[i < head ? i : tail + (i - head)] = from_f32<T>(0.f);
        }
      }
    }
    if (owns_scalars && tid == 0) a.loss[row] = 0.f;
    return;
  }

  // ---- phase 1: every copy of this thread's vectors in flight at once
  for (int64_t v = tid; v < my_vecs; v += kClusterThreads) cp_async_16(cache + v, xv + v);

  RowMath rm;
  rm.scale = a.scale; rm.softcap = a.softcap;
  rm.inv_softcap = a.softcap > 0.f ? 1.f / a.softcap : 0.f;
  rm.has_scale = a.scale != 1.f; rm.has_softcap = a.softcap > 0.f;
  const bool smoothing = a.smoothing != 0.f;

  // the label's logit, read before the cluster barrier that precedes every gradient write
  float z_y = 0.f;
  if (owns_scalars && tid == 0) {
    const bool in_range = label >= 0 && label < vocab;
    z_y = in_range ? rm.z(to_f32(x[label])) : NAN;
  }
  float m = -INFINITY, s = 0.f, zsum = 0.f;
  if (owns_scalars) {  // while the copies fly
    for (int64_t i = tid; i < nscalar; i += kClusterThreads) {
      const float z = rm.z(to_f32(x[i < head ? i : tail + (i - head)]));
      add_element(z, m, s);
      zsum += z;
    }
  }
  cp_async_wait_all();
  for (int64_t v = tid; v < my_vecs; v += kClusterThreads) {
    const V raw = cache[v];
    float z[VEC];
    float vmax = -INFINITY;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      z[i] = TRANSFORM ? rm.z(to_f32(raw.v[i])) : to_f32(raw.v[i]);
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
    if (m != -INFINITY) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += exp2f((z[i] - m) * kLog2e);
    }
  }

  // ---- phase 2: block partial, then the cluster's partials merged through DSMEM
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
    if (smoothing) zsum += __shfl_xor_sync(0xffffffffu, zsum, o);
  }
  if (lane == 0) { red_m[warp] = m; red_s[warp] = s; red_z[warp] = zsum; }
  __syncthreads();
  if (warp == 0) {
    m = lane < kClusterWarps ? red_m[lane] : -INFINITY;
    s = lane < kClusterWarps ? red_s[lane] : 0.f;
    zsum = lane < kClusterWarps ? red_z[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge(m, s, m2, s2);
      if (smoothing) zsum += __shfl_xor_sync(0xffffffffu, zsum, o);
    }
    if (lane == 0) { part[0] = m; part[1] = s; part[2] = zsum; }
  }
  cluster.sync();  // every block's partial is written (release / acquire at cluster scope)
  if (warp == 0) {
    // every block merges the same partials in the same order: one lse for the whole row
    m = -INFINITY; s = 0.f; zsum = 0.f;
    if (lane < (int)csize) {
      const float* remote = cluster.map_shared_rank(part, (unsigned)lane);
      m = remote[0]; s = remote[1]; zsum = remote[2];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge(m, s, m2, s2);
      zsum += __shfl_xor_sync(0xffffffffu, zsum, o);
    }
    if (lane == 0) {
      const float lse = m + __logf(s);
      row_lse = lse;
      if (owns_scalars) {  // tid 0 of rank 0: the thread that read z_y
        float loss = lse - (1.f - a.smoothing) * z_y;
        if (smoothing) loss -= a.smoothing / (float)vocab * zsum;
        a.loss[row] = loss;
      }
    }
  }
  cluster_arrive();  // done with the other blocks' shared memory
  __syncthreads();   // row_lse

  // ---- phase 3: the gradient of this block's slice, from shared memory
  if (g) {
    const float lse = row_lse;
    const float w = a.row_weight[row * a.weight_stride];
    const float off_label = a.smoothing / (float)vocab;
    const float on_label = off_label + (1.f - a.smoothing);
    const float w_scaled = rm.has_scale ? w * rm.scale : w;
    const float label_w = (1.f - a.smoothing) * w_scaled;
    const int64_t first_col = head + v_begin * VEC;
    V* gv = reinterpret_cast<V*>(g + head) + v_begin;
    for (int64_t v = tid; v < my_vecs; v += kClusterThreads) {
      const V raw = cache[v];
      float gf[VEC], dz[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float z = to_f32(raw.v[i]);
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
      const int64_t rel = label - (first_col + v * VEC);
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
    if (owns_scalars) {
      for (int64_t i = tid; i < nscalar; i += kClusterThreads) {
        const int64_t c = i < head ? i : tail + (i - head);
        g[c] = from_f32<T>(grad_of(to_f32(x[c]), c, rm, lse, label, on_label, off_label, w));
      }
    }
  }
  cluster_wait();
#else
  __trap();  // never launched: launch_cluster checks the kernel was compiled for sm_90
#endif
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

// Slices up to this size pick the smallest cluster (4+ blocks of 256 threads per SM); a row
// whose slices exceed kClusterMaxSlice even at 8 blocks takes the one-block-per-row kernel.
constexpr int64_t kClusterTargetSlice = 64 * 1024;  // 4 blocks for a 128k bf16 row (fastest)
constexpr int64_t kClusterMaxSlice = 100 * 1024;
constexpr int kMaxClusterSize = 8;  // the portable limit

bool cluster_capable_device() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    return false;
  }
  return major >= 9;
}

// How many clusters of `csize` blocks with `smem` bytes each of `kernel` (a cluster kernel
// instance) can be resident at once on this device; 0 when none can, or when the kernel was not
// compiled for sm_90+ (its body is then empty). Decided once per (device, kernel, csize, smem)
// and cached, so that later calls (e.g. inside CUDA-graph capture, after an eager warm-up)
// make no occupancy queries.
int active_clusters(const void* kernel, int csize, size_t smem, cudaLaunchConfig_t* cfg) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const auto key = std::make_tuple(dev, kernel, csize, smem);
  std::lock_guard<std::mutex> lock(mu);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int clusters = 0;
  cudaFuncAttributes attrs{};
  // a build without sm_90 code has an empty kernel body: never launch that
  if (cudaFuncGetAttributes(&attrs, kernel) == cudaSuccess && attrs.ptxVersion >= 90 &&
      attrs.binaryVersion >= 90 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) ==
          cudaSuccess) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, cfg) != cudaSuccess) clusters = 0;
  }
  cudaGetLastError();  // a refused query leaves no error behind: the caller falls back
  if (clusters < 0) clusters = 0;
  cache[key] = clusters;
  return clusters;
}

// The cluster size for a row of `row_vecs` vectors: `forced` (1, 2, 4 or 8) when given, else
// the smallest whose slices are at most target_slice bytes, else the largest. 0 when the
// slices of that size exceed max_slice.
int pick_cluster_size(int64_t row_vecs, int64_t vec_bytes, int forced, int64_t target_slice,
                      int64_t max_slice, int64_t* slice_vecs) {
  for (int c = 1; c <= kMaxClusterSize; c *= 2) {
    const int64_t sv = (row_vecs + c - 1) / c;
    const bool pick = forced ? c == forced
                             : (sv * vec_bytes <= target_slice || c == kMaxClusterSize);
    if (pick) {
      if (sv * vec_bytes > max_slice) return 0;
      *slice_vecs = sv;
      return c;
    }
  }
  return 0;
}

// Launches `kernel` over one cluster of csize blocks per row; false (nothing launched) when it
// cannot be resident or the launch is refused.
template <typename K>
bool launch_clusters(K kernel, const CrossEntropyArgs& a, int csize, int64_t slice_vecs,
                     size_t smem, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.blockDim = dim3(kClusterThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)csize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cfg.gridDim = dim3((unsigned)csize, 1, 1);  // the occupancy query needs a valid grid
  const int resident = active_clusters(reinterpret_cast<const void*>(kernel), csize, smem, &cfg);
  if (resident < 1) return false;
  const int64_t clusters = a.rows;  // one row per cluster
  if (clusters > (int64_t)0x7fffffff / csize) return false;  // grid.x limit
  cfg.gridDim = dim3((unsigned)(clusters * csize), 1, 1);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (cudaLaunchKernelEx(&cfg, kernel, a, slice_vecs) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

// One row per cluster (cluster_kernel). Returns false (nothing launched) when the row does not
// fit, the device or the compiled code lacks clusters, or the launch is refused.
template <typename T, int VEC, bool TRANSFORM>
bool launch_cluster(const CrossEntropyArgs& a, int forced_size, cudaStream_t stream) {
  constexpr int64_t kVecBytes = sizeof(Vec<T, VEC>);
  // a row has at most vocab / VEC whole vectors (fewer when its start is misaligned)
  int64_t slice_vecs = 0;
  const int csize = pick_cluster_size(a.vocab / VEC, kVecBytes, forced_size,
                                      kClusterTargetSlice, kClusterMaxSlice, &slice_vecs);
  if (csize == 0) return false;
  const size_t smem = (size_t)(slice_vecs > 0 ? slice_vecs : 1) * kVecBytes;
  return launch_clusters(cluster_kernel<T, VEC, TRANSFORM>, a, csize, slice_vecs, smem, stream);
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

void cross_entropy_forward(const CrossEntropyArgs& a, const CrossEntropyLayout& layout,
                           cudaStream_t stream) {
  if (a.rows == 0) return;
  // blocks_per_sm 1 or 2 asks for the one-block-per-row kernel; 0 = a cluster kernel where
  // one can run
  int blocks_per_sm = layout.blocks_per_sm;
  const bool try_cluster = blocks_per_sm == 0 && cluster_capable_device();
  if (blocks_per_sm != 2) blocks_per_sm = 1;
  int cluster_size = layout.cluster_size;
  if (cluster_size != 1 && cluster_size != 2 && cluster_size != 4 && cluster_size != 8) {
    cluster_size = 0;
  }
  dispatch_float(a.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int VEC = 16 / sizeof(T);
    const bool transform = a.scale != 1.f || a.softcap > 0.f;
    if (vector_ok<T>(a)) {
      if (try_cluster) {  // a cluster per row, else the one-block-per-row kernel
        const bool launched = transform ? launch_cluster<T, VEC, true>(a, cluster_size, stream)
                                        : launch_cluster<T, VEC, false>(a, cluster_size, stream);
        if (launched) return;
      }
      if (transform) launch<T, VEC, true>(a, blocks_per_sm, stream);
      else launch<T, VEC, false>(a, blocks_per_sm, stream);
    } else {
      if (transform) launch<T, 1, true>(a, blocks_per_sm, stream);
      else launch<T, 1, false>(a, blocks_per_sm, stream);
    }
  });
}

}  // namespace fastft
