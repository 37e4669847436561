// x·Aᵀ for the low-rank term of the small-M NF4 kernels (NF4LowRank::xa): x [M, K] with
// M <= 16 (decoding), A [R, K] a LoRA adapter's down factor (or several stacked), both bf16 or
// fp16. cuBLAS runs this skinny product as a split-K GEMM plus a reduce kernel, ~5.7 us per
// call at decoding shapes (run 100), four times per decoder layer. One CTA per row of A
// computes its M outputs over its part of K; the parts of a row (one where M x K is small) are
// a thread-block cluster whose first CTA adds them in order: deterministic, no scratch.
// Launched with programmatic dependent launch: the small-M kernel launched after it starts its
// CTAs at once, and inside generate loads its frozen weight while this one runs
// (NF4GemvArgs::weights_frozen).
#include <cooperative_groups.h>

#include <algorithm>

#include "common.cuh"
#include "nf4.h"

namespace fastft {
namespace {

constexpr int kLowRankThreads = 256;
constexpr int kLowRankMaxM = 16;
constexpr int kLowRankMaxParts = 8;  // a portable cluster size

// One CTA per (row of a, K part): the K parts of a row form a thread-block cluster (sm_90),
// and its first CTA adds the parts' sums in part order (deterministic). Parts split the K
// range when M x K is large: alone, one CTA per row took 8.7-25 us at M = 4..16 x K = 14336
// (run 103, cuBLAS ~6.5), its loads of x, repeated for every token, too many for one SM.
template <typename T>
__global__ void __launch_bounds__(kLowRankThreads)
    low_rank_input_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ a,
                          int64_t a_stride, T* __restrict__ out, int64_t out_stride, int M,
                          int units, int units_per_part) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // the kernel after this one may start now (it waits for our results itself); x may still be
  // written by the kernel before: wait for it (both return at once without the launch attribute)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const T* row = a + (int64_t)blockIdx.x * a_stride;
  const int u0 = blockIdx.y * units_per_part, u1 = min(units, u0 + units_per_part);
  float acc[kLowRankMaxM];
#pragma unroll
  for (int m = 0; m < kLowRankMaxM; ++m) acc[m] = 0.f;
  // 8 k per 16-byte unit; thread i takes units u0 + i, + 256, ... (coalesced), each its own order
#pragma unroll 2
  for (int u = u0 + threadIdx.x; u < u1; u += kLowRankThreads) {
    const Raw<T, 8> av = load_raw<T, 8>(row + 8 * (int64_t)u);
#pragma unroll
    for (int m = 0; m < kLowRankMaxM; ++m) {
      if (m < M) {
        const Raw<T, 8> xv = load_raw<T, 8>(x + m * x_stride + 8 * (int64_t)u);
        float s = acc[m];
#pragma unroll
        for (int i = 0; i < 8; ++i) s = fmaf(elem(xv, i), elem(av, i), s);
        acc[m] = s;
      }
    }
  }
  // per token: the warps' sums, then warps 0..7 in order
  __shared__ float part[kLowRankThreads / 32][kLowRankMaxM];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < kLowRankMaxM; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == 0) part[warp][m] = v;
    }
  }
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x < M) {
#pragma unroll
    for (int w = 0; w < kLowRankThreads / 32; ++w) s += part[w][threadIdx.x];
  }
  if (gridDim.y > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // the cluster's parts: the first CTA reads every part's sums from its shared memory
    namespace cg = cooperative_groups;
    __shared__ float cta_sum[kLowRankMaxM];
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x < M) cta_sum[threadIdx.x] = s;
    cluster.sync();
    if (blockIdx.y == 0 && threadIdx.x < M) {
      s = 0.f;
      for (unsigned q = 0; q < gridDim.y; ++q) s += cluster.map_shared_rank(cta_sum, q)[threadIdx.x];
    }
    cluster.sync();  // (the other CTAs' shared memory stays until it has been read)
#endif
    if (blockIdx.y != 0) return;
  }
  if (threadIdx.x < M) out[threadIdx.x * out_stride + blockIdx.x] = from_f32<T>(s);
}

}  // namespace

void nf4_low_rank_input(const NF4LowRankInput& p, cudaStream_t stream) {
  const int units = p.K / 8;
  // K parts (a cluster, sm_90): about 16 K multiply-adds of M x K per CTA, at most 8 parts
  int parts = 1;
  if (p.clusters) {
    const int64_t work = (int64_t)p.M * p.K;
    parts = (int)std::min<int64_t>(kLowRankMaxParts, std::max<int64_t>(1, (work + 16383) / 16384));
    parts = std::min(parts, std::max(1, units));
  }
  const int units_per_part = (units + parts - 1) / parts;
  const dim3 grid((unsigned)p.R, (unsigned)parts);
  if (p.dtype == kBF16)
    launch_kernel(low_rank_input_kernel<__nv_bfloat16>, grid, kLowRankThreads, 0, stream, p.pdl,
                  parts, static_cast<const __nv_bfloat16*>(p.x), p.x_stride,
                  static_cast<const __nv_bfloat16*>(p.a), p.a_stride,
                  static_cast<__nv_bfloat16*>(p.out), p.out_stride, p.M, units, units_per_part);
  else
    launch_kernel(low_rank_input_kernel<__half>, grid, kLowRankThreads, 0, stream, p.pdl, parts,
                  static_cast<const __half*>(p.x), p.x_stride, static_cast<const __half*>(p.a),
                  p.a_stride, static_cast<__half*>(p.out), p.out_stride, p.M, units,
                  units_per_part);
}

}  // namespace fastft
