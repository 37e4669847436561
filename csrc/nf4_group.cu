// The small-M NF4 kernel over a group of weights of one x (nf4_gemv_group, see nf4.h): its
// own file so that its instantiations compile in parallel with nf4.cu's.
#include "nf4_kernels.cuh"

namespace fastft {
namespace {

// One launch over the weights of a group (NF4GemvGroup): segment s owns grid columns
// [first[s], first[s + 1]). One launch instead of one per weight saves each weight's fixed cost
// (launch, staging x, the first loads' latency, the epilogue), most of a small weight's time.
template <int MT, bool NESTED, typename T, int DECODE, bool LORA, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, WARPS == kV3Warps ? kV3BlocksPerSM : 1)
    nf4_gemv_v3_group_kernel(const NF4GemvGroup g) {
  int s = 0;
#pragma unroll
  for (int i = 1; i < kNF4GroupMax; ++i) s += i < g.count && (int)blockIdx.x >= g.first[i];
  v3_gemv<MT, NESTED, T, DECODE, LORA, WARPS>(g.w[s], g.a[s], g.lr[s],
                                              blockIdx.x - (unsigned)g.first[s]);
}

template <typename T, int MT, bool NESTED, int DECODE, bool LORA, int WARPS>
void launch_gemv_v3_group(const NF4GemvGroup& g, cudaStream_t stream) {
  const bool wide = WARPS != kV3Warps;
  const int smem = wide ? kV3WideSmem : kV3Smem;
  allow_dynamic_smem<nf4_gemv_v3_group_kernel<MT, NESTED, T, DECODE, LORA, WARPS>>(smem);
  const dim3 grid((unsigned)g.first[g.count], (unsigned)g.a[0].v3_splits);
  launch_kernel(nf4_gemv_v3_group_kernel<MT, NESTED, T, DECODE, LORA, WARPS>, grid, WARPS * 32,
                smem, stream, g.a[0].pdl, 1, g);
}

// f(std::true_type{}) or f(std::false_type{}): a run-time choice as a compile-time constant
template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{});
  else f(std::false_type{});
}
}  // namespace

void nf4_gemv_group(const NF4GemvGroup& g, cudaStream_t stream) {
  const NF4GemvArgs& a = g.a[0];
  if (g.count < 1 || a.M <= 0 || g.first[g.count] <= 0) return;
  // the group kernels are compiled for the plan's decodes (table: 0, half and half: 2) only
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    with_bool(a.M > 8, [&](auto two_tiles) {
      with_bool(g.w[0].nested, [&](auto nested) {
        with_bool(a.v3_decode == 2, [&](auto half) {
          with_bool(g.lr[0].xa != nullptr, [&](auto lora) {
            constexpr int MT = decltype(two_tiles)::value ? 2 : 1;
            constexpr bool NESTED = decltype(nested)::value, LORA = decltype(lora)::value;
            constexpr int DECODE = decltype(half)::value ? 2 : 0;
            if constexpr (MT == 1) {
              if (a.v3_kparts == kV3WidePartsCTA) {
                launch_gemv_v3_group<T, MT, NESTED, DECODE, LORA, 16>(g, stream);
                return;
              }
            }
            launch_gemv_v3_group<T, MT, NESTED, DECODE, LORA, kV3Warps>(g, stream);
          });
        });
      });
    });
  };
  if (a.dtype == kBF16) launch(__nv_bfloat16{});
  else launch(__half{});
}

}  // namespace fastft
