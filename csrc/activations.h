// Host-side launchers of the gated-activation kernels (activations.cu).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fastft {

// act codes, shared with fastft/ops/activations.py and the Triton kernels.
enum GluAct : int { kSiLU = 0, kGeluErf = 1, kGeluTanh = 2 };

// h = act(gate) * up over [rows, n] views: rows `*_stride` elements apart, last dim contiguous.
struct GluFwdArgs {
  const void* gate; int64_t g_stride;
  const void* up; int64_t u_stride;
  void* out; int64_t o_stride;
  int64_t rows, n;
  int dtype, act;
};
void glu_forward(const GluFwdArgs& a, cudaStream_t stream);

// d_gate = dh * up * act'(gate), d_up = dh * act(gate), and h = act(gate) * up when h is not
// null. d_gate / d_up may be gate / up themselves and h may be dh (in place): each element is
// read and then written by the same thread. h must not share memory with gate or up.
struct GluBwdArgs {
  const void* dh; int64_t dh_stride;
  const void* gate; int64_t g_stride;
  const void* up; int64_t u_stride;
  void* d_gate; int64_t dg_stride;
  void* d_up; int64_t du_stride;
  void* h; int64_t h_stride;  // h: nullptr = not written
  int64_t rows, n;
  int dtype, act;
};
void glu_backward(const GluBwdArgs& a, cudaStream_t stream);

}  // namespace fastft
