// RMSNorm and LayerNorm, forward and backward, over the last dim of a [rows, hidden] view.
//
// Fast path: one block per row (forward) with the row held in registers, 16-byte accesses,
// so each element of x is read once and y written once. Rows whose width is not a multiple
// of the vector width, misaligned rows, or rows too wide for the register cache take the
// loop path, which re-reads the row (from L1/L2) instead of caching it. The backward issues
// all of a row's x / dy / w loads before its math (see norm_bwd_vec).
#include "common.cuh"
#include "kernels.h"

namespace fastft {
namespace {

constexpr int kMaxVPT = 8;  // vectors per thread in the register cache

int pow2_ceil(int v) { int p = 1; while (p < v) p <<= 1; return p; }

// ------------------------------------------------------------------ forward

constexpr int kVecThreads = 256;  // register-cached kernels: up to 255 registers a thread

template <typename T, typename W, int VEC, int VPT, bool RMS>
__global__ void __launch_bounds__(kVecThreads) norm_fwd_vec(const NormArgs a) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int H = a.hidden;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  T* y = static_cast<T*>(a.y) + row * a.y_stride;

  float v[VPT][VEC];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * VEC;
    if (c < H) {
      load_f32<T, VEC>(x + c, v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += RMS ? v[k][i] * v[k][i] : v[k][i];
  }
  float mean = 0.f, rstd;
  if (RMS) {
    rstd = rsqrtf(block_sum(s, scratch) / H + a.eps);
  } else {
    mean = block_sum(s, scratch) / H;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c < H) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) { float d = v[k][i] - mean; q += d * d; }
      }
    }
    rstd = rsqrtf(block_sum(q, scratch) / H + a.eps);
  }
  if (threadIdx.x == 0) {
    a.rstd[row] = rstd;
    if (!RMS) a.mean[row] = mean;
  }
  const W* wp = static_cast<const W*>(a.weight);
  const W* bp = static_cast<const W*>(a.bias);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * VEC;
    if (c >= H) continue;
    float w[VEC], b[VEC], out[VEC];
    if (wp) load_f32<W, VEC>(wp + c, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float wi = wp ? w[i] + a.offset : 1.f;
      out[i] = (v[k][i] - mean) * rstd * wi;
    }
    if (bp) {
      load_f32<W, VEC>(bp + c, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] += b[i];
    }
    store_f32<T, VEC>(y + c, out);
  }
}

template <typename T, typename W, bool RMS>
__global__ void __launch_bounds__(1024) norm_fwd_loop(const NormArgs a) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int H = a.hidden;
  const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
  T* y = static_cast<T*>(a.y) + row * a.y_stride;
  const W* wp = static_cast<const W*>(a.weight);
  const W* bp = static_cast<const W*>(a.bias);
  float s = 0.f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float xv = to_f32(x[c]);
    s += RMS ? xv * xv : xv;
  }
  float mean = 0.f, rstd;
  if (RMS) {
    rstd = rsqrtf(block_sum(s, scratch) / H + a.eps);
  } else {
    mean = block_sum(s, scratch) / H;
    float q = 0.f;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
      float d = to_f32(x[c]) - mean;
      q += d * d;
    }
    rstd = rsqrtf(block_sum(q, scratch) / H + a.eps);
  }
  if (threadIdx.x == 0) {
    a.rstd[row] = rstd;
    if (!RMS) a.mean[row] = mean;
  }
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float wi = wp ? to_f32(wp[c]) + a.offset : 1.f;
    float o = (to_f32(x[c]) - mean) * rstd * wi;
    if (bp) o += to_f32(bp[c]);
    y[c] = from_f32<T>(o);
  }
}

// ------------------------------------------------------------------ backward
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w', xhat = (x - mean) * rstd
// (RMSNorm: no mean terms). dW / dB partial sums: one float32 row per block.

// N elements of T kept as 32-bit words (sizeof(T) * N a multiple of 4): a 16-byte load lands in
// four registers and nothing touches them until the math widens an element. (With Vec<bf16, 8>
// ptxas unpacks each element into its own register right after the load, which waits for the
// load there and so serializes the loads that follow.)
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  uint32_t w[sizeof(T) * N / 4];
  __device__ __forceinline__ float f(int i) const;
};
template <> __device__ __forceinline__ float Packed<float, 4>::f(int i) const {
  return __uint_as_float(w[i]);
}
template <> __device__ __forceinline__ float Packed<float, 8>::f(int i) const {
  return __uint_as_float(w[i]);
}
template <> __device__ __forceinline__ float Packed<__nv_bfloat16, 8>::f(int i) const {
  const uint32_t x = w[i / 2];
  return __uint_as_float((i & 1) ? (x & 0xffff0000u) : (x << 16));
}
template <> __device__ __forceinline__ float Packed<__half, 8>::f(int i) const {
  const uint32_t x = w[i / 2];
  return __half2float(__ushort_as_half((unsigned short)((i & 1) ? (x >> 16) : (x & 0xffffu))));
}

template <typename T, int N>
__device__ __forceinline__ Packed<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Packed<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ Packed<T, N> zero_raw() {
  Packed<T, N> r;
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) * N / 4); ++i) r.w[i] = 0u;  // 0.0 in every float format
  return r;
}

// The row stays in registers as raw 16-byte vectors (x, dy: 2 * VPT vectors), all of a row's
// loads are issued before any math (so 3 * VPT of them are in flight per thread, not one
// vector's worth at a time), one __syncthreads per row (double-buffered scratch), and the
// weight is re-read from L1 for the output pass instead of being held across the reduction.
// Elements past `hidden` load as zeros: they add nothing to the sums and are not stored.
// PARTIAL: accumulate dW / dB partial rows (a block loops over rows); without it the block
// does one row and keeps no accumulators, so the frozen-weight case stays light on registers.
// Register caps. Frozen weight, VPT <= 2: 64 registers, 4 blocks (rows) of up to 256 threads an
// SM; VPT 4: 128. PARTIAL: its grid is a multiple of the SM count (norm_backward_partial_rows), so 2 resident
// blocks a SM (<= 128 registers) or 1 (wide rows: accumulators + row cache need more) both run
// in whole waves.
template <typename T, typename W, int VEC, int VPT, bool RMS, bool PARTIAL>
__global__ void __launch_bounds__(kVecThreads, PARTIAL ? (VPT <= 2 ? 2 : 1) : (VPT <= 2 ? 4 : (VPT <= 4 ? 2 : 1)))
norm_bwd_vec(const NormBwdArgs a, int64_t rows_per_block) {
  __shared__ float scratch[2][2][32];  // [row parity][sum_gx, sum_g][warp]
  const int H = a.hidden;
  const W* wp = static_cast<const W*>(a.weight);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  constexpr int ACC = PARTIAL ? VPT : 1;
  float dw_acc[ACC][VEC], db_acc[ACC][VEC];
#pragma unroll
  for (int k = 0; k < ACC; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) { dw_acc[k][i] = 0.f; db_acc[k][i] = 0.f; }
  }
  const int64_t first = blockIdx.x * rows_per_block;
  const int64_t last = min(a.rows, first + rows_per_block);
  int parity = 0;
  // x / dy of a row as raw vectors, zero past the row end (no masks needed in the math)
  auto load_row = [&](int64_t r, Packed<T, VEC>(&xo)[VPT], Packed<T, VEC>(&dyo)[VPT]) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    const T* dy = static_cast<const T*>(a.dy) + r * a.dy_stride;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c < H) {
        xo[k] = load_raw<T, VEC>(x + c);
        dyo[k] = load_raw<T, VEC>(dy + c);
      } else {
        xo[k] = zero_raw<T, VEC>();
        dyo[k] = zero_raw<T, VEC>();
      }
    }
  };
  Packed<T, VEC> xr[VPT], dr[VPT];
  // PARTIAL blocks loop over rows with only 1-2 blocks a SM: the next row's x / dy loads are
  // issued before this row's math and reduction, so they stay in flight across it (not at
  // VPT 8, whose accumulators already fill the registers).
  constexpr bool PREFETCH = PARTIAL && VPT <= 4;
  Packed<T, VEC> xn[VPT], dn[VPT];
  for (int64_t row = first; row < last; ++row, parity ^= 1) {
    T* dx = static_cast<T*>(a.dx) + row * a.dx_stride;
    const float rstd = a.rstd[row];
    const float mean = RMS ? 0.f : a.mean[row];
    if (!PREFETCH || row == first) load_row(row, xr, dr);
    Packed<W, VEC> wr[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (wp) wr[k] = c < H ? load_raw<W, VEC>(wp + c) : zero_raw<W, VEC>();
    }
    if (PREFETCH && row + 1 < last) load_row(row + 1, xn, dn);
    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * (w + offset)
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xh = (xr[k].f(i) - mean) * rstd;
        const float g = dr[k].f(i) * (wp ? wr[k].f(i) + a.offset : 1.f);
        sum_g += g;
        sum_gx += g * xh;
      }
    }
    sum_gx = warp_sum(sum_gx);
    if (!RMS) sum_g = warp_sum(sum_g);
    if (lane == 0) {
      scratch[parity][0][warp] = sum_gx;
      if (!RMS) scratch[parity][1][warp] = sum_g;
    }
    // One barrier per row: the next row writes the other half of scratch, and a warp can only
    // reach the row after next (same half) once every warp has passed the next row's barrier,
    // i.e. has finished reading this one.
    __syncthreads();
    float t_gx = 0.f, t_g = 0.f;
    for (int w = 0; w < warps; ++w) {
      t_gx += scratch[parity][0][w];
      if (!RMS) t_g += scratch[parity][1][w];
    }
    const float c2 = t_gx / H;
    const float c1 = RMS ? 0.f : t_g / H;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c >= H) continue;
      float w[VEC], out[VEC];
      if (wp) load_f32<W, VEC>(wp + c, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float xh = (xr[k].f(i) - mean) * rstd;
        const float dyv = dr[k].f(i);
        out[i] = rstd * (dyv * (wp ? w[i] + a.offset : 1.f) - c1 - xh * c2);
        if (PARTIAL) {
          dw_acc[k % ACC][i] += dyv * xh;
          db_acc[k % ACC][i] += dyv;
        }
      }
      store_f32<T, VEC>(dx + c, out);
    }
    if (PREFETCH) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) { xr[k] = xn[k]; dr[k] = dn[k]; }
    }
  }
  if (PARTIAL) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * VEC;
      if (c >= H) continue;
      if (a.dw_partial) store_f32<float, VEC>(a.dw_partial + blockIdx.x * (int64_t)H + c, dw_acc[k % ACC]);
      if (a.db_partial) store_f32<float, VEC>(a.db_partial + blockIdx.x * (int64_t)H + c, db_acc[k % ACC]);
    }
  }
}

template <typename T, typename W, bool RMS>
__global__ void __launch_bounds__(1024) norm_bwd_loop(const NormBwdArgs a, int64_t rows_per_block) {
  __shared__ float scratch[32];
  const int H = a.hidden;
  const W* wp = static_cast<const W*>(a.weight);
  float* dwp = a.dw_partial ? a.dw_partial + blockIdx.x * (int64_t)H : nullptr;
  float* dbp = a.db_partial ? a.db_partial + blockIdx.x * (int64_t)H : nullptr;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    if (dwp) dwp[c] = 0.f;
    if (dbp) dbp[c] = 0.f;
  }
  const int64_t first = blockIdx.x * rows_per_block;
  const int64_t last = min(a.rows, first + rows_per_block);
  for (int64_t row = first; row < last; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_stride;
    T* dx = static_cast<T*>(a.dx) + row * a.dx_stride;
    const float rstd = a.rstd[row];
    const float mean = RMS ? 0.f : a.mean[row];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
      float wi = wp ? to_f32(wp[c]) + a.offset : 1.f;
      float g = to_f32(dy[c]) * wi;
      sum_g += g;
      sum_gx += g * (to_f32(x[c]) - mean) * rstd;
    }
    const float c2 = block_sum(sum_gx, scratch) / H;
    const float c1 = RMS ? 0.f : block_sum(sum_g, scratch) / H;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
      float wi = wp ? to_f32(wp[c]) + a.offset : 1.f;
      float dyv = to_f32(dy[c]);
      float xh = (to_f32(x[c]) - mean) * rstd;
      dx[c] = from_f32<T>(rstd * (dyv * wi - c1 - xh * c2));
      if (dwp) dwp[c] += dyv * xh;  // each block owns its partial row: no atomics
      if (dbp) dbp[c] += dyv;
    }
  }
}

template <typename T>
bool aligned(const void* p, int64_t stride_elems, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0 && stride_elems % vec == 0;
}

struct Plan { int threads; int vpt; int vec; };

// vec = 16-byte accesses when every row allows them, threads <= kVecThreads, vpt <= kMaxVPT;
// otherwise the loop path (vpt 0), which needs no register cache.
Plan plan_rows(int hidden, int vec, int target_vpt) {
  if (hidden % vec != 0) vec = 1;
  const int nvec = hidden / vec;
  int threads = pow2_ceil((nvec + target_vpt - 1) / target_vpt);
  threads = threads < 32 ? 32 : (threads > kVecThreads ? kVecThreads : threads);
  const int vpt = pow2_ceil((nvec + threads - 1) / threads);
  if (vec == 1) return {hidden <= 1024 ? 128 : 256, 0, 1};
  if (vpt > kMaxVPT) return {1024, 0, 1};
  return {threads, vpt, vec};
}

template <typename T, typename W, bool RMS, int VEC, int VPT>
void launch_fwd(const NormArgs& a, int threads, cudaStream_t s) {
  norm_fwd_vec<T, W, VEC, VPT, RMS><<<a.rows, threads, 0, s>>>(a);
}

template <typename T, typename W, bool RMS>
void forward_typed(const NormArgs& a, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  bool ok = aligned<T>(a.x, a.x_stride, VEC) && aligned<T>(a.y, a.y_stride, VEC) &&
            (!a.weight || aligned<W>(a.weight, 0, VEC)) && (!a.bias || aligned<W>(a.bias, 0, VEC));
  Plan p = plan_rows(a.hidden, ok ? VEC : 1, 4);
  switch (p.vpt) {
    case 1: launch_fwd<T, W, RMS, VEC, 1>(a, p.threads, s); break;
    case 2: launch_fwd<T, W, RMS, VEC, 2>(a, p.threads, s); break;
    case 4: launch_fwd<T, W, RMS, VEC, 4>(a, p.threads, s); break;
    case 8: launch_fwd<T, W, RMS, VEC, 8>(a, p.threads, s); break;
    default: norm_fwd_loop<T, W, RMS><<<a.rows, p.threads, 0, s>>>(a);
  }
}

template <typename T, typename W, bool RMS, int VEC, int VPT>
void launch_bwd(const NormBwdArgs& a, int grid, int64_t rpb, int threads, cudaStream_t s) {
  if (a.dw_partial || a.db_partial)
    norm_bwd_vec<T, W, VEC, VPT, RMS, true><<<grid, threads, 0, s>>>(a, rpb);
  else
    norm_bwd_vec<T, W, VEC, VPT, RMS, false><<<grid, threads, 0, s>>>(a, rpb);
}

template <typename T, typename W, bool RMS>
void backward_typed(const NormBwdArgs& a, int grid, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  bool ok = aligned<T>(a.x, a.x_stride, VEC) && aligned<T>(a.dy, a.dy_stride, VEC) &&
            aligned<T>(a.dx, a.dx_stride, VEC) && (!a.weight || aligned<W>(a.weight, 0, VEC));
  const int64_t rpb = (a.rows + grid - 1) / grid;
  // 2 vectors per thread: H = 4096 bf16 is 256 threads a row with 6 16-byte loads each in
  // flight and 4 rows per SM (64 registers). 4 vectors with 128 threads needs ~130 registers
  // (ptxas keeps the converted floats) and spills when capped lower.
  Plan p = plan_rows(a.hidden, ok ? VEC : 1, 2);
  switch (p.vpt) {
    case 1: launch_bwd<T, W, RMS, VEC, 1>(a, grid, rpb, p.threads, s); break;
    case 2: launch_bwd<T, W, RMS, VEC, 2>(a, grid, rpb, p.threads, s); break;
    case 4: launch_bwd<T, W, RMS, VEC, 4>(a, grid, rpb, p.threads, s); break;
    case 8: launch_bwd<T, W, RMS, VEC, 8>(a, grid, rpb, p.threads, s); break;
    default: norm_bwd_loop<T, W, RMS><<<grid, p.threads, 0, s>>>(a, rpb);
  }
}

// Runs f with (T, W): W is T or float (weights kept in float32 under mixed precision).
template <typename F>
void dispatch_xw(int dtype, int w_dtype, F&& f) {
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    if (w_dtype == kF32) f(T{}, float{});
    else f(T{}, T{});
  });
}

}  // namespace

int64_t kernel_image_version(int64_t device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) { cudaGetLastError(); return -1; }
  cudaSetDevice((int)device);
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, norm_fwd_loop<float, float, true>);
  cudaSetDevice(prev);
  if (err != cudaSuccess) { cudaGetLastError(); return -1; }
  return attr.binaryVersion;
}

void norm_forward(const NormArgs& a, cudaStream_t s) {
  if (a.rows == 0) return;
  dispatch_xw(a.dtype, a.w_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    if (a.is_rms) forward_typed<T, W, true>(a, s);
    else forward_typed<T, W, false>(a, s);
  });
}

int norm_backward_partial_rows(int64_t rows, int hidden, int device_sms) {
  // Enough blocks to fill the GPU; few enough that the float32 partial rows stay small
  // next to the [rows, hidden] tensors the kernel streams.
  int64_t g = (int64_t)device_sms * 4;
  if (g > rows) g = rows;
  return g < 1 ? 1 : (int)g;
}

void norm_backward(const NormBwdArgs& a, int grid, cudaStream_t s) {
  if (a.rows == 0) return;
  dispatch_xw(a.dtype, a.w_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    if (a.is_rms) backward_typed<T, W, true>(a, grid, s);
    else backward_typed<T, W, false>(a, grid, s);
  });
}

}  // namespace fastft
