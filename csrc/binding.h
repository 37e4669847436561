// Shared by the bind_*.cpp files: tensor checks and the glue from at::Tensor to launchers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastft {

inline int dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default:
      TORCH_CHECK(false, "fastft CUDA kernels take float32, float16 or bfloat16 tensors, got ",
                  t.scalar_type(), "; cast the input or use FASTFT_BACKEND=torch");
  }
  return -1;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastft: ", name, " must be a CUDA tensor (got ", t.device(), ")");
}

// A [rows, hidden] view whose last dim is contiguous (rows may be strided).
inline void check_rows(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 2, "fastft: ", name, " must be 2-D [rows, hidden], got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fastft: ", name,
              " must have a contiguous last dim (call .contiguous())");
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline int sm_count(const at::Tensor& t) {
  int n = 0;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index());
  return n > 0 ? n : 1;
}

// `hint`: what the caller knows about a failure (how it launched, a switch that avoids it).
inline void check_launch(const char* hint = "") {
  cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastft: CUDA kernel launch failed: ", cudaGetErrorString(err),
              hint);
}

}  // namespace fastft
