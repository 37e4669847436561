// Host-side launchers of the CUDA kernels. Plain pointers and dtype tags only, so the
// torch-facing bindings (bind_*.cpp) and the kernels (*.cu) compile independently.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fastft {

// Tags passed from the bindings so that .cu files need no at::ScalarType.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

int64_t kernel_image_version(int64_t device);

// ---- norms.cu: RMSNorm (is_rms) and LayerNorm over the last dim of a [rows, hidden] view.
// x/y/dy/dx rows are `*_stride` elements apart; the last dim is contiguous.
// weight/bias may be null (LayerNorm without affine); weight dtype is x's or float32.
struct NormArgs {
  const void* x; int64_t x_stride;
  const void* weight; int w_dtype;
  const void* bias;
  void* y; int64_t y_stride;
  float* mean;   // LayerNorm only, [rows] float32
  float* rstd;   // [rows] float32
  int64_t rows; int hidden; int dtype;
  float eps; float offset;  // offset: Gemma's (1 + w)
  bool is_rms;
};
void norm_forward(const NormArgs& a, cudaStream_t stream);

struct NormBwdArgs {
  const void* dy; int64_t dy_stride;
  const void* x; int64_t x_stride;
  const void* weight; int w_dtype;
  const float* mean; const float* rstd;
  void* dx; int64_t dx_stride;
  float* dw_partial;   // [partial_rows, hidden] float32 or null (frozen weight / no affine)
  float* db_partial;   // [partial_rows, hidden] float32 or null
  int64_t rows; int hidden; int dtype;
  float offset;
  bool is_rms;
};
// Rows of dw_partial/db_partial the launch will write (sum them over dim 0 for dW / dB).
int norm_backward_partial_rows(int64_t rows, int hidden, int device_sms);
void norm_backward(const NormBwdArgs& a, int partial_rows, cudaStream_t stream);

}  // namespace fastft
