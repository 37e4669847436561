// Host-side launcher of the cross-entropy kernel (cross_entropy.cu). Plain pointers and dtype
// tags only, so bind_cross_entropy.cpp and the kernel compile independently.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels.h"  // DType tags

namespace fastft {

// Per row r of the [rows, vocab] logits (last dim contiguous, rows logits_stride apart):
//   z = softcap * tanh(x * scale / softcap)      (scale 1 / softcap 0 switch a step off)
//   loss[r] = lse(z) - (1 - eps) * z[label] - eps / vocab * sum(z)   (0 for ignored rows)
// and, when grad is non-null, grad[r] = d loss[r] / d x * row_weight[r * weight_stride]
// (zeros for ignored rows). grad may be the logits themselves (written in place).
// A label outside [0, vocab) that is not ignore_index gives a NaN loss.
struct CrossEntropyArgs {
  const void* logits; int64_t logits_stride;
  const int64_t* labels;
  float* loss;
  void* grad; int64_t grad_stride;                  // null: loss only
  const float* row_weight; int64_t weight_stride;   // weight_stride 0: one weight for all rows
  int64_t rows; int64_t vocab; int dtype;
  int64_t ignore_index;
  float softcap;    // 0: off
  float scale;      // 1: off
  float smoothing;  // label smoothing eps in [0, 1]
};

// Which kernel and layout (benchmarks and tests compare them; all zeros = the defaults).
struct CrossEntropyLayout {
  // 0 = the default: on sm_90, thread-block clusters (each row split into one slice per block,
  // held in shared memory), else the one-block-per-row kernel with 1024 threads. 1 or 2 = the
  // one-block-per-row kernel with 1024 threads and up to ~226 KB of the row cached in shared
  // memory, or 512 threads and half the cache (two blocks per SM).
  int blocks_per_sm = 0;
  // 1, 2, 4 or 8 forces that many blocks per row in the cluster kernel (used only if the
  // slices fit, else the one-block-per-row kernel runs); anything else = automatic.
  int cluster_size = 0;
};

void cross_entropy_forward(const CrossEntropyArgs& a, const CrossEntropyLayout& layout,
                           cudaStream_t stream);

}  // namespace fastft
