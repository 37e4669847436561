// Host-side launchers of the NF4 kernels (nf4.cu): plain pointers and dtype tags only.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"

namespace fastft {

// A bitsandbytes NF4 weight: flat, two 4-bit codes per byte (even flat index in the high
// nibble), one scale per 2^bs_log2 values. Nested scales are
//   code2[absmax_u8[b]] * absmax2[b >> bs2_log2] + offset[0]   (float32, multiply then add).
struct NF4Weight {
  const uint8_t* packed;
  const void* absmax;     // float [blocks], or uint8 [blocks] when nested
  const float* absmax2;   // nested only
  const float* code2;     // nested only, [256]
  const float* offset;    // nested only, [1]
  const float* code;      // [16] the NF4 levels
  int bs_log2;            // >= 5 (blocks of >= 32 values)
  int bs2_log2;
  bool nested;
};

// out[0 .. numel) = dequantised values in `out_dtype`, bit-exact with bitsandbytes.
void nf4_dequantize(const NF4Weight& w, int64_t numel, void* out, int out_dtype,
                    cudaStream_t stream);

// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for W [N, K], M <= 16, K % 32 == 0,
// blocksize >= 32 (each 32 consecutive k of a row inside one quantisation block), x/y/bias
// bf16 or f16 (`dtype`); x rows 16-byte aligned (x_stride % 8 == 0), packed 16-byte aligned.
// Tensor-core mma: compute capability >= 8.0 (the kernel body is empty below that).
struct NF4GemvArgs {
  const void* x; int64_t x_stride;
  const void* bias;
  void* y; int64_t y_stride;
  int M, N, K;
  int dtype;
  int split;        // K ranges (grid.y), set by nf4_gemv_plan
  int per_split;    // 128-value chunks per K range, set by nf4_gemv_plan
  float* partial;   // split > 1: [split, M, N] float32 scratch, else null
  // split > 1: nf4_gemv_row_blocks(N) counters, zero when the launch starts (the caller zeroes
  // them on the launch's stream, for this launch only: nothing is kept between calls); the
  // last block of each row block to count adds the partials.
  unsigned* counters;
};
inline int64_t nf4_gemv_row_blocks(int64_t N) { return (N + 127) / 128; }
// Chooses a.split / a.per_split for a.M, a.N, a.K on a device with `sms` SMs.
void nf4_gemv_plan(NF4GemvArgs& a, int sms);
void nf4_gemv(const NF4Weight& w, const NF4GemvArgs& a, cudaStream_t stream);

}  // namespace fastft
