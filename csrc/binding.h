// Shared by the bind_*.cpp files: tensor checks and the glue from at::Tensor to launchers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "kernels.h"

namespace fastft {

// FASTFT_CHECK(cond, pieces...): TORCH_CHECK with the message built here. TORCH_CHECK formats
// its pieces through a std::ostringstream instantiated in this library, and on the GPU machine
// a number formatted that way crashed the process instead of raising (run 104: every failed
// check with a number in its message was a segfault; one of text and a device raised). Here
// numbers go through std::to_string and the message reaches TORCH_CHECK as one string.
namespace check_detail {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) { s += std::to_string(v); }
inline void put(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
inline void put(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void put(std::string& s, const c10::Device& v) { s += v.str(); }
}  // namespace check_detail

template <typename... Pieces>
std::string check_message(const Pieces&... pieces) {
  std::string s;
  (check_detail::put(s, pieces), ...);
  return s;
}
#define FASTFT_CHECK(cond, ...) TORCH_CHECK(cond, ::fastft::check_message(__VA_ARGS__))

inline int dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default:
      FASTFT_CHECK(false, "fastft CUDA kernels take float32, float16 or bfloat16 tensors, got ",
                  t.scalar_type(), "; cast the input or use FASTFT_BACKEND=torch");
  }
  return -1;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  FASTFT_CHECK(t.is_cuda(), "fastft: ", name, " must be a CUDA tensor (got ", t.device(), ")");
}

// A [rows, hidden] view whose last dim is contiguous (rows may be strided).
inline void check_rows(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  FASTFT_CHECK(t.dim() == 2, "fastft: ", name, " must be 2-D [rows, hidden], got ", t.dim(), "-D");
  FASTFT_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "fastft: ", name,
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
  FASTFT_CHECK(err == cudaSuccess, "fastft: CUDA kernel launch failed: ", cudaGetErrorString(err),
              hint);
}

}  // namespace fastft
