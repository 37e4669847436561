// Small device helpers shared by the kernels: dtype tags, vector loads, block reductions.
// Kept free of torch headers so that .cu files compile in seconds.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "kernels.h"

namespace fastft {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements loaded or stored as one (up to 16-byte) access; callers check alignment.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  Vec<T, N> raw = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(raw.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[N]) {
  Vec<T, N> raw;
#pragma unroll
  for (int i = 0; i < N; ++i) raw.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = raw;
}

// Raw<T, N> (load_raw, elem): N elements of T kept as 32-bit words. A 16-byte load lands in
// four registers and nothing touches them until the math widens an element. (With Vec<bf16, 8>
// ptxas unpacks each element into its own register right after the load, which waits for the
// load there and serializes the loads that follow.) Sizes that are not whole words (1-element
// 16-bit) stay Vec.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  uint32_t w[sizeof(T) * N / 4];
  __device__ __forceinline__ float f(int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[i]);
    } else {
      const uint32_t x = w[i / 2];
      const uint32_t h = (i & 1) ? (x >> 16) : (x & 0xffffu);
      if constexpr (std::is_same<T, __nv_bfloat16>::value) return __uint_as_float(h << 16);
      else return __half2float(__ushort_as_half((unsigned short)h));
    }
  }
};

template <typename T, int N>
using Raw = typename std::conditional<(sizeof(T) * N) % 4 == 0, Packed<T, N>, Vec<T, N>>::type;

template <typename T, int N>
__device__ __forceinline__ float elem(const Packed<T, N>& r, int i) { return r.f(i); }
template <typename T, int N>
__device__ __forceinline__ float elem(const Vec<T, N>& r, int i) { return to_f32(r.v[i]); }

template <typename T, int N>
__device__ __forceinline__ Raw<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Raw<T, N>*>(p);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
// Syncs on entry so it can be called back to back (and inside loops) with one scratch array.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(t);
}

// Calls f.template operator()<T>() with T the C++ type of tag `dt`.
template <typename F>
void dispatch_float(int dt, F&& f) {
  switch (dt) {
    case kF32: f(float{}); break;
    case kF16: f(__half{}); break;
    case kBF16: f(__nv_bfloat16{}); break;
  }
}

// A launch through cudaLaunchKernelEx: programmatic dependent launch allowed when `pdl` (the
// next kernel on the stream may start its CTAs as this one's finish; such a kernel waits with
// griddepcontrol.wait before it reads what the one before wrote), and the CTAs grouped in
// thread-block clusters of `cluster_y` along grid.y when it is above 1 (sm_90).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, int threads, size_t smem,
                   cudaStream_t stream, bool pdl, int cluster_y, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3((unsigned)threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[2] = {};
  unsigned n = 0;
  if (pdl) {
    attributes[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster_y > 1) {
    attributes[n].id = cudaLaunchAttributeClusterDimension;
    attributes[n].val.clusterDim.x = 1;
    attributes[n].val.clusterDim.y = (unsigned)cluster_y;
    attributes[n].val.clusterDim.z = 1;
    ++n;
  }
  config.attrs = attributes;
  config.numAttrs = n;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);  // errors: check_launch
}

}  // namespace fastft
