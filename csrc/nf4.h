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
// Tensor-core mma: compute capability >= 8.0 (the kernel bodies are empty below that).
// Three kernels (see nf4.cu): v1 (the default, any such shape: every weight value exactly as
// nf4_dequantize rounds it), and on request v2 (stream-K) or v3 (2 instructions per packed
// byte), both for K % 64 == 0 and blocksize >= 64: fp16 mma on the NF4 levels with the block
// scale folded into the float32 sums. nf4_gemv_plan picks.
struct NF4GemvArgs {
  const void* x; int64_t x_stride;
  const void* bias;
  void* y; int64_t y_stride;
  int M, N, K;
  int dtype;
  // In: the requested kernel (1, 2, 3, 5 / 6: v3 with v3_decode 1 / 2, or 7: v4; 0 = the
  // plan's choice: v4 or v3, see nf4_gemv_plan); the
  // plan takes v2 / v3 where they apply (see nf4_gemv_v2_ok / nf4_gemv_v3_ok), v1 otherwise.
  // Out: the kernel that runs.
  int variant;
  // v3's NF4 decode, set by nf4_gemv_plan from variant 5 / 6 (which then run as variant 3):
  // 0 = a shared-memory table lookup per packed byte, 1 = PRMT lookups in registers (no shared
  // memory), 2 = half of each step's rows each way.
  int v3_decode;
  int split;        // v1: K ranges (grid.y), set by nf4_gemv_plan
  int per_split;    // v1: 128-value chunks per K range, set by nf4_gemv_plan
  int v2_blocks;    // v2: grid size (contiguous ranges of the row-block x 64-k steps)
  int v2_steps;     // v2: the most steps one block takes
  int v3_steps;     // v3: 64-k steps per K split (grid.y), set by nf4_gemv_plan
  int v3_splits;    // v3: K splits (grid.y). In: 0 (the plan chooses) or a requested count
  // v3: parts of each CTA's K range (1, 2, 4 or 8: the CTA has 256 / parts rows; 16: a CTA of
  // 16 warps and 32 rows, M <= 8 only). In: 0 (the
  // plan chooses) or a requested count
  int v3_kparts;
  // nf4_gemv_partial_floats(a) float32 scratch when nf4_gemv_needs_scratch(a), else null
  float* partial;
  // with scratch: nf4_gemv_counters(a) 64-bit counters, 8-byte aligned, any content when the
  // launch starts (a word counts only with this launch's tag; the last arrival zeroes it); the
  // last block of each row block to count adds the partials.
  unsigned long long* counters;
  unsigned long long counter_tag;  // nf4_gemv_counter_tag(), once per call
  // Launch v1 / v3 with programmatic dependent launch (needs compute capability >= 9.0).
  bool pdl;
  // With pdl: no kernel that may still be running writes the packed weight, its scales or its
  // code (generation: fastft.ops.nf4.frozen_weights), so a CTA loads its first steps of them
  // before waiting for the previous kernel, overlapping that kernel's tail. (The wait is what
  // makes the previous kernel's writes visible, so this is wrong for a weight written there.)
  bool weights_frozen;
  // v4 (variant 7, nf4_stream.cu), set by the plan: CTAs per K part (one per SM at most), ring
  // stages, warps per step (1 or 2: a stage of 1024 or 512 values per row) and K parts (1 or
  // 2: clusters of two CTAs, each with half of K); v4_allowed: the plan may choose v4 itself
  // (the GPU has it: compute capability >= 9.0). (v4_split and v4_kparts lie in the padding
  // after v4_allowed: the other kernels' parameters keep their places.)
  int v4_ctas;
  int v4_stages;
  bool v4_allowed;
  unsigned char v4_split;
  unsigned char v4_kparts;
  // v4 with bf16 x at M = 9..16: scratch of nf4_gemv_x_half_floats(a) floats where that is not
  // 0 (else null), x in fp16 [M][K] (x_half) and then a float per token (x_undo): see
  // v4_x_half_kernel. (Last, so the fields above keep their offsets: the other kernels' SASS
  // changed in constant-bank offsets only, bench/sass_compare.py.)
  void* x_half;
  float* x_undo;
};
// Optional for nf4_gemv: a low-rank term added to y, as a LoRA adapter adds it
// (y += scale * xa bᵀ): xa [M, rank] = x Aᵀ and b [N, rank], both in x's dtype, rows 16-byte
// aligned (strides in elements), rank % 8 == 0; xa null = no term. v1 / v3 / v4 only. A kernel
// parameter of its own: the same fields in NF4GemvArgs changed the v3 kernels' code even where
// they are unused (300-500 SASS instructions fewer, and the calls without a term ran 2-8% slower
// in run 74).
struct NF4LowRank {
  const void* xa; int64_t xa_stride;
  const void* b; int64_t b_stride;
  int rank;
  float scale;
};
// Several weights of one input x (an attention layer's q, k and v; an MLP's gate and up): one v3
// launch over all of them, each writing its own y with its own bias and low-rank term. a[s] is
// filled as for nf4_gemv (the same x, M, K, dtype, variant, splits, parts and pdl; its own N, y,
// bias); the plan sets the rest.
constexpr int kNF4GroupMax = 4;
struct NF4GemvGroup {
  int count;
  int first[kNF4GroupMax + 1];  // segment s owns grid columns [first[s], first[s + 1])
  NF4Weight w[kNF4GroupMax];
  NF4GemvArgs a[kNF4GroupMax];
  NF4LowRank lr[kNF4GroupMax];
};
// A counter word is tag | arrivals (arrivals < 2^24).
constexpr unsigned long long kCounterMask = (1ull << 24) - 1;
// A fresh tag: a 40-bit call serial in bits 24..63 under a fixed top 12 bits (0xFFF: see
// arrive_is_last in nf4.cu for why leftover data cannot look like a tag).
unsigned long long nf4_gemv_counter_tag();
inline int64_t nf4_gemv_row_blocks(int64_t N) { return (N + 127) / 128; }  // v1's
// Whether v2 / v3 take this call (shape, blocksize, dtype).
bool nf4_gemv_v2_ok(const NF4Weight& w, const NF4GemvArgs& a);
bool nf4_gemv_v3_ok(const NF4Weight& w, const NF4GemvArgs& a);
// v4 (nf4_stream.cu, compute capability >= 9.0): the weight and x streamed into a ring of
// shared-memory stages by tensor-map copies, one CTA per SM, M <= 16. nf4_gemv_v4_plan: whether it
// takes the call (then a.v4_ctas / a.v4_stages / a.v4_split / a.v4_kparts are set).
bool nf4_gemv_v4_plan(const NF4Weight& w, NF4GemvArgs& a, int sms);
// Scratch floats v4 needs for this planned call (bf16 x at M = 9..16: x in fp16 and a factor
// per token), or 0: then a.x_half / a.x_undo stay null.
int64_t nf4_gemv_x_half_floats(const NF4GemvArgs& a);
// False (nothing launched) when the driver could not describe the weight to the copy engine,
// or a.x_half is null where nf4_gemv_x_half_floats(a) asks for scratch.
bool nf4_gemv_v4(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                 cudaStream_t stream);
// Chooses a.variant and its launch shape for a.M, a.N, a.K on a device with `sms` SMs.
void nf4_gemv_plan(const NF4Weight& w, NF4GemvArgs& a, int sms);
bool nf4_gemv_needs_scratch(const NF4GemvArgs& a);
int64_t nf4_gemv_partial_floats(const NF4GemvArgs& a);
int64_t nf4_gemv_counters(const NF4GemvArgs& a);  // one per row block of the chosen kernel
// A planned call's float32 scratch (split K's partials and counters, v4's fp16 copy of x),
// in floats (0: none), and a's pointers into such scratch at `at` (tag: nf4_gemv_counter_tag()).
// Not zeroed: the counters carry the call's tag, so a kernel never depends on what an earlier
// call left there, and the x copy is written before it is read.
int64_t nf4_gemv_scratch_floats(const NF4GemvArgs& a);
void nf4_gemv_point_into_scratch(NF4GemvArgs& a, float* at, unsigned long long tag);
// False only where v4 could not launch (see nf4_gemv_v4).
bool nf4_gemv(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
              cudaStream_t stream);
// True when one launch can take the group and is expected to pay (see the CTA-count rule in
// nf4.cu): every weight fits v3 (nf4_gemv_v3_ok), the scales are nested in all or none, a
// low-rank term on all or none, the variant is auto, v3 or v3h.
// Then every a[s] holds the plan (v3; K splits and parts chosen for the whole group, so that a
// segment's scratch is nf4_gemv_partial_floats(a[s]) / nf4_gemv_counters(a[s]) as for one
// call) and `first` the segments' grid columns. False: call nf4_gemv per weight.
bool nf4_gemv_group_plan(NF4GemvGroup& g, int sms);
void nf4_gemv_group(const NF4GemvGroup& g, cudaStream_t stream);

// out [M, R] = x [M, K] · a [R, K]ᵀ (nf4_low_rank.cu): the xa of NF4LowRank, a LoRA adapter's
// x·Aᵀ, at M <= 16. bf16 or f16 (`dtype`) throughout, float32 sums rounded once; K % 8 == 0,
// x and a rows 16-byte aligned. One CTA per row of a and K part, launched with programmatic
// dependent launch when `pdl`; K parts (a thread-block cluster) only when `clusters` (both:
// compute capability >= 9.0).
struct NF4LowRankInput {
  const void* x; int64_t x_stride;
  const void* a; int64_t a_stride;
  void* out; int64_t out_stride;
  int M, K, R;
  int dtype;
  bool pdl;
  bool clusters;
};
void nf4_low_rank_input(const NF4LowRankInput& p, cudaStream_t stream);

}  // namespace fastft
