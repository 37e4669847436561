// x·Aᵀ for the low-rank term of the small-M NF4 kernels (NF4LowRank::xa): x [M, K] with
// M <= 16 (decoding), A [R, K] a LoRA adapter's down factor (or several stacked), both bf16 or
// fp16. cuBLAS runs this skinny product as a split-K GEMM plus a reduce kernel, ~5.7 us per
// call at decoding shapes (run 100), four times per decoder layer. One CTA per row of A
// computes its M outputs over the whole K range, so no cross-CTA sum is needed and the result
// is deterministic. Launched with programmatic dependent launch: the small-M kernel launched
// after it starts its CTAs at once, and inside generate loads its frozen weight while this one
// runs (NF4GemvArgs::weights_frozen).
#include "common.cuh"
#include "nf4.h"

namespace fastft {
namespace {

constexpr int kLowRankThreads = 256;
constexpr int kLowRankMaxM = 16;

template <typename T>
__global__ void __launch_bounds__(kLowRankThreads)
    low_rank_input_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ a,
                          int64_t a_stride, T* __restrict__ out, int64_t out_stride, int M,
                          int units) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // the kernel after this one may start now (it waits for our results itself); x may still be
  // written by the kernel before: wait for it (both return at once without the launch attribute)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const T* row = a + (int64_t)blockIdx.x * a_stride;
  float acc[kLowRankMaxM];
#pragma unroll
  for (int m = 0; m < kLowRankMaxM; ++m) acc[m] = 0.f;
  // 8 k per 16-byte unit; thread i takes units i, i + 256, ... (coalesced), each its own order
#pragma unroll 2
  for (int u = threadIdx.x; u < units; u += kLowRankThreads) {
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
  // per token: the warps' sums, then warp 0..7 in order (deterministic)
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
  if (threadIdx.x < M) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kLowRankThreads / 32; ++w) s += part[w][threadIdx.x];
    out[threadIdx.x * out_stride + blockIdx.x] = from_f32<T>(s);
  }
}

}  // namespace

void nf4_low_rank_input(const NF4LowRankInput& p, cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3((unsigned)p.R);
  config.blockDim = dim3(kLowRankThreads);
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = p.pdl ? 1 : 0;
  const int units = p.K / 8;
  if (p.dtype == kBF16)
    cudaLaunchKernelEx(&config, low_rank_input_kernel<__nv_bfloat16>,
                       static_cast<const __nv_bfloat16*>(p.x), p.x_stride,
                       static_cast<const __nv_bfloat16*>(p.a), p.a_stride,
                       static_cast<__nv_bfloat16*>(p.out), p.out_stride, p.M, units);
  else
    cudaLaunchKernelEx(&config, low_rank_input_kernel<__half>, static_cast<const __half*>(p.x),
                       p.x_stride, static_cast<const __half*>(p.a), p.a_stride,
                       static_cast<__half*>(p.out), p.out_stride, p.M, units);
}

}  // namespace fastft
