// Host-side launcher of the RoPE kernel (rope.cu). Plain pointers, strides and dtype tags.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace fastft {

// q/k and their outputs are [batch, seq, heads, head_dim] with a contiguous last dim and the
// strides below (in elements); an output may be its input (in place). cos/sin are
// [batch, seq, rot] (batch stride 0 when shared by every row), contiguous last dim, q's dtype.
// Forward:  y1 = x1*c1 - x2*s1,  y2 = x2*c2 + x1*s2
// Backward: y1 = x1*c1 + x2*s2,  y2 = x2*c2 - x1*s1   (the transpose; rotation by -theta)
// with 1/2 the two halves of the first `rot` dims. Dims rot..head_dim are copied to the
// output when copy_tail_q / copy_tail_k (out of place), else left alone.
struct RopeArgs {
  const void* q; const void* k;
  void* q_out; void* k_out;
  const void* cos; const void* sin;
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t qo_sb, qo_ss, qo_sh;
  int64_t ko_sb, ko_ss, ko_sh;
  int64_t c_sb, c_ss, s_sb, s_ss;
  int64_t batch, seq;
  int hq, hk, head_dim, rot;
  int dtype;
  bool backward, copy_tail_q, copy_tail_k;
};
void rope_apply(const RopeArgs& a, cudaStream_t stream);

}  // namespace fastft
