// The NF4 kernels' device code (nf4.cu's comment has the numerics), shared by nf4.cu
// (dequantisation, the one-weight small-M kernels, the host plans) and nf4_group.cu (the
// small-M kernel over a group of weights): two files that compile in parallel, since
// the v3 kernels' many instantiations are most of the extension's build time.
#pragma once
#include <algorithm>
#include <atomic>
#include <utility>
#include <type_traits>

#include "common.cuh"
#include "nf4.h"

namespace fastft {
namespace {

// A block's scale in two halves, so that callers can issue the loads early: its parts (nested:
// the 8-bit absmax and absmax2; plain: the float32 scale itself), then the scale from them
// (nested: code2[q] * absmax2 + offset, multiply then add, each rounded, as bitsandbytes).
__device__ __forceinline__ void load_scale_parts(const NF4Weight& w, int64_t blk, int& q,
                                                 float& part) {
  if (w.nested) {
    q = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
    part = __ldg(w.absmax2 + (blk >> w.bs2_log2));
  } else {
    q = 0;
    part = __ldg(static_cast<const float*>(w.absmax) + blk);
  }
}

// `offset` is w.offset[0] when nested (callers load it once).
__device__ __forceinline__ float scale_from_parts(const NF4Weight& w, int q, float part,
                                                  float offset) {
  return w.nested ? __fadd_rn(__fmul_rn(__ldg(w.code2 + q), part), offset) : part;
}

__device__ __forceinline__ float block_scale(const NF4Weight& w, int64_t blk, float offset) {
  int q;
  float part;
  load_scale_parts(w, blk, q, part);
  return scale_from_parts(w, q, part, offset);
}

__device__ __forceinline__ float nested_offset(const NF4Weight& w) {
  return w.nested ? __ldg(w.offset) : 0.f;
}

// The 16 levels in shared memory: per-thread lookups with a dynamic index.
__device__ __forceinline__ void load_levels(const float* code, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(code + threadIdx.x);
  __syncthreads();
}

// Split-K arrival without zeroed counters, so a call needs no memset (a second graph node,
// 1.7 us per call on the H200, run 29). A counter is a 64-bit word: the launch's tag (low 24
// bits zero) | arrivals. A word without this launch's tag counts as 0 arrivals, so the scratch
// may hold anything when the launch starts; the last arrival writes 0 back, so a CUDA graph
// replaying the launch (same tag, same scratch) starts from 0 again. Tags (see
// nf4_gemv_counter_tag) are unique per call and their top 12 bits are set: as float64 that is
// -inf or a negative NaN, as a float32 pair a negative NaN in the high half. GPU arithmetic
// writes only the positive canonical NaN, and -inf (the first call's tag, count 0) counts as
// 0 arrivals anyway, so leftover data cannot pose as a counter. Called by one thread per CTA,
// after the CTA's partials are fenced.
__device__ __forceinline__ bool arrive_is_last(unsigned long long* counter,
                                               unsigned long long tag, unsigned arrivals) {
  // first guess 0 (our own reset, or fresh memory): one atomic round trip when it is right;
  // otherwise the failed CAS returns the word, as a separate read would
  unsigned long long seen = 0ull, expected;
  unsigned count;
  do {
    expected = seen;
    count = (expected & ~kCounterMask) == tag ? (unsigned)(expected & kCounterMask) + 1u : 1u;
    seen = atomicCAS(counter, expected, tag | count);
  } while (seen != expected);
  if (count != arrivals) return false;
  *counter = 0ull;  // every arrival is in: nothing else touches it in this launch
  return true;
}

// Programmatic dependent launch (sm_90; launched with the attribute when a.pdl, see
// launch_kernel): the next kernel on the stream may start its CTAs while this one finishes,
// which hides its launch behind our tail. A CTA calls this before it touches global memory at
// all (x and the weight may still be written by the kernel before, y and the scratch may
// still be read by it), or, with a.weights_frozen, after loading its first weight steps, scales
// and code only. Without the launch attribute it returns at once.
__device__ __forceinline__ void gemv_wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Phase timestamps of v3's CTAs for bench/nf4_timeline.cu, which defines FASTFT_NF4_TIMELINE
// before including this file; elsewhere the marks compile to nothing. The probe numbers its
// calls in a.counter_tag's serial bits (24..35). Slots per CTA: see kTimeline* below.
#ifdef FASTFT_NF4_TIMELINE
constexpr int kTimelineSlots = 320, kTimelineCtas = 1024, kTimelineCalls = 16;
constexpr int kTimelineIters = 8;  // loop iterations (groups of 4 steps) timed per warp
enum TimelineSlot {
  kTimelineStartNs = 0, kTimelineSm = 1, kTimelineStart = 2, kTimelineWaited = 3,
  kTimelineTable = 4, kTimelineStaged = 5, kTimelineSummed = 6, kTimelineEnd = 7,
  kTimelineEndNs = 8,
  kTimelineExtra = 9,  // + 0..6: a kernel's own finer marks (v4: its prologue, windows 0 and last)
  kTimelineWarpLoopEnd = 16,  // + warp
  // + (warp * kTimelineIters + iteration) * 2: the iteration's start, then its scales computed
  kTimelineIter = 32
};
__device__ unsigned long long nf4_timeline[kTimelineCalls * kTimelineCtas * kTimelineSlots];
__device__ __forceinline__ void timeline_mark(const NF4GemvArgs& a, int slot) {
  const unsigned call = (unsigned)(a.counter_tag >> 24) & 0xFFFu;
  const unsigned cta = blockIdx.y * gridDim.x + blockIdx.x;
  if (call >= (unsigned)kTimelineCalls || cta >= (unsigned)kTimelineCtas) return;
  unsigned long long v;
  if (slot == kTimelineStartNs || slot == kTimelineEndNs)
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
  else if (slot == kTimelineSm)
    asm volatile("{ .reg .u32 s; mov.u32 s, %%smid; cvt.u64.u32 %0, s; }" : "=l"(v));
  else
    v = clock64();
  nf4_timeline[((size_t)call * kTimelineCtas + cta) * kTimelineSlots + slot] = v;
}
#define NF4_MARK(cond, slot) \
  do { if (cond) timeline_mark(a, slot); } while (0)
#else
#define NF4_MARK(cond, slot) do {} while (0)
#endif

// The optional low-rank term of y (NF4LowRank): scale * sum_r xa[m, r] b[n, r],
// in float32 with r ascending, 8 values per 16-byte load. add_low_rank adds it to an element of
// y this thread has just written (a read-modify-write once the sums' registers are free: added
// to the float32 sums instead, ptxas reported more spilled registers in v3's M 9..16 kernels):
// y = round(round(x Wᵀ + bias) + term), the roundings of adding it with a second GEMM.
template <typename T> __device__ __forceinline__ float2 to_f32x2(uint32_t v);
template <> __device__ __forceinline__ float2 to_f32x2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}
template <> __device__ __forceinline__ float2 to_f32x2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

template <typename T>
__device__ __forceinline__ float lora_term(const NF4LowRank& lr, int m, int64_t n) {
  const uint4* xr = reinterpret_cast<const uint4*>(static_cast<const T*>(lr.xa) + m * lr.xa_stride);
  const uint4* br = reinterpret_cast<const uint4*>(static_cast<const T*>(lr.b) + n * lr.b_stride);
  float s = 0.f;
  for (int q = 0; q < lr.rank / 8; ++q) {
    const uint4 xv = __ldg(xr + q), bv = __ldg(br + q);
    const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, bw[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 xf = to_f32x2<T>(xw[i]), bf = to_f32x2<T>(bw[i]);
      s = fmaf(xf.x, bf.x, s);
      s = fmaf(xf.y, bf.y, s);
    }
  }
  return lr.scale * s;
}

template <typename T>
__device__ __forceinline__ void add_low_rank(const NF4LowRank& lr, T* y, int64_t y_stride, int m,
                                             int64_t n) {
  T* p = y + m * y_stride + n;
  *p = from_f32<T>(to_f32(*p) + lora_term<T>(lr, m, n));
}

// The term for one thread's outputs of the mma tiles, after the kernel has written them: tokens
// mt * 8 + 2t and + 1 (mt < token_tiles), rows rows_at + 16 tl and + 8 (tl < tiles: rows g and
// g + 8 of each m16 tile).
template <typename T>
__device__ __forceinline__ void add_low_rank_tile(const NF4GemvArgs& a, const NF4LowRank& lr,
                                                  T* y, int64_t rows_at, int tiles, int t,
                                                  int token_tiles) {
  for (int mt = 0; mt < token_tiles; ++mt)
    for (int j = 0; j < 2; ++j) {
      const int m = mt * 8 + 2 * t + j;
      if (m >= a.M) continue;
      for (int r = 0; r < 2 * tiles; ++r) {
        const int64_t n = rows_at + (r & 1) * 8 + (r >> 1) * 16;
        if (n < a.N) add_low_rank<T>(lr, y, a.y_stride, m, n);
      }
    }
}

// After the PDL wait (the kernel before may write xa): asks L1 for the low-rank term's rows of
// this CTA (B rows [n0, n0 + rows), xa's M rows), so that the epilogue, where nothing hides a
// DRAM or L2 round trip, finds them there. One thread per row, each row's first and last line.
template <typename T>
__device__ __forceinline__ void lora_prefetch(const NF4GemvArgs& a, const NF4LowRank& lr,
                                              int64_t n0, int rows) {
#if defined(__CUDA_ARCH__)
  const int i = threadIdx.x;
  const int64_t row_bytes = (int64_t)lr.rank * sizeof(T);
  const char* p = nullptr;
  if (i < rows && n0 + i < a.N)
    p = reinterpret_cast<const char*>(static_cast<const T*>(lr.b) + (n0 + i) * lr.b_stride);
  else if (i >= rows && i < rows + a.M)
    p = reinterpret_cast<const char*>(static_cast<const T*>(lr.xa) + (i - rows) * lr.xa_stride);
  if (p != nullptr) {
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p));
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p + row_bytes - 1));
  }
#endif
}

// ------------------------------------------------------------------ dequantisation

constexpr int kThreads = 256;
constexpr int kUnits = 4;  // units per thread, kThreads apart: coalesced loads and stores

// One unit of nf4_dequant_vec: the values of one 16-byte store of T (8 of a 16-bit type from a
// 4-byte word, 4 float32 from a 2-byte one), so that a warp's store covers 512 contiguous bytes.
// (Run 273: with 8 float32 values a unit, two 16-byte stores 32 bytes apart per lane, float32
// out took 107-127 us at 14336x4096, 50-61% of copy, against Triton's 71 us.)
template <typename T>
struct DequantUnit {
  static constexpr int kValues = 16 / sizeof(T);
  using Word = std::conditional_t<kValues == 8, uint32_t, uint16_t>;  // its packed bytes
};

// Values [0, units * kValues): packed aligned to a Word, out 16-byte aligned.
// A block lives for one round trip and its stores, so every global load of a thread is issued
// before the levels' barrier and the first value: 0.5-0.7 us faster at 14336x4096 bf16 than
// with the levels first (run 277: 40.2-40.4 vs 40.7-40.9 us), ~0.7 us from the same loads and
// stores with no decode at all (bench/nf4_dequant_probe.cu, runs 275-277). Indices past the end
// are clamped and only the stores conditional: ptxas sinks a load below a branch (or an exit)
// to its first use.
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequant_vec(const NF4Weight w, int64_t units,
                                                            T* __restrict__ out) {
  constexpr int kValues = DequantUnit<T>::kValues;
  using Word = typename DequantUnit<T>::Word;
  __shared__ float lut[16];
  const Word* words = reinterpret_cast<const Word*>(w.packed);
  const int64_t first = (int64_t)blockIdx.x * (kThreads * kUnits) + threadIdx.x;
  uint32_t word[kUnits];
  int q[kUnits];        // nested: the unit's 8-bit absmax
  float part[kUnits];   // nested: absmax2 of the unit's block; plain: the block's scale
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {  // units kThreads apart: coalesced loads and stores
    const int64_t i = min(first + (int64_t)u * kThreads, units - 1);
    word[u] = __ldg(words + i);
    // a unit's values lie in one block (blocksize >= 32 > kValues, both powers of two)
    load_scale_parts(w, (i * kValues) >> w.bs_log2, q[u], part[u]);
  }
  const float offset = nested_offset(w);
  load_levels(w.code, lut);
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const int64_t i = first + (int64_t)u * kThreads;
    const float scale = scale_from_parts(w, q[u], part[u], offset);
    float v[kValues];
#pragma unroll
    for (int j = 0; j < kValues / 2; ++j) {
      const uint32_t byte = (word[u] >> (8 * j)) & 0xFFu;
      v[2 * j] = __fmul_rn(lut[byte >> 4], scale);  // even index: high nibble
      v[2 * j + 1] = __fmul_rn(lut[byte & 15u], scale);
    }
    if (i < units) store_f32<T, kValues>(out + i * kValues, v);
  }
}

// Values [start, numel) one at a time: the tail, and any alignment.
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequant_scalar(const NF4Weight w, int64_t start,
                                                               int64_t numel, T* out) {
  __shared__ float lut[16];
  load_levels(w.code, lut);
  const float offset = nested_offset(w);
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = start + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += step) {
    const uint32_t byte = w.packed[i >> 1];
    const uint32_t nib = (i & 1) ? (byte & 15u) : (byte >> 4);
    out[i] = from_f32<T>(__fmul_rn(lut[nib], block_scale(w, i >> w.bs_log2, offset)));
  }
}

// ------------------------------------------------------------------ fused small-M matmul
//
// Tensor-core GEMV for M <= 16 rows of x, reading the packed weight once, straight from
// bitsandbytes' layout.
//
// Work split: a block is kGemvWarps warps x 16 weight rows each (128 rows) over one K range
// (blockIdx.y of a.split ranges of whole 128-value chunks; with split > 1 each block writes
// float32 partials and the last block of each row block to finish adds them, see below). The block's x[:, range] is staged once in shared memory;
// each warp then streams its 16 rows chunk by chunk, kAhead chunks of packed bytes and their
// scale inputs in flight per thread (a register ring), and runs mma.m16n8k16 with A = the
// dequantised weight (16 rows x 16 k) and B = x^T (16 k x 8 tokens; MT = 2 tiles for M > 8).
//
// The k permutation (a dot product is invariant under any permutation of k applied to both
// operands). Lane = 4g + t (g = 0..7, t = 0..3). In a 128-value chunk, thread (g, t) owns
// k = 32t .. 32t+31 (16 packed bytes: one 16-byte load per row) of weight rows g and g+8.
// For mma step s = 0..7 it feeds
//   A slots (row, 2t), (row, 2t+1)   <- packed byte 2s     = k 32t+4s, 32t+4s+1
//   A slots (row, 2t+8), (row, 2t+9) <- packed byte 2s + 1 = k 32t+4s+2, 32t+4s+3
//   B slots (2t, 2t+1) / (2t+8, 2t+9) of token column g <- x[token][same k]
// so over the 8 steps the chunk's 128 k are each used exactly once. x for thread (g, t) is
// x[token][32t .. 32t+31]: four 16-byte shared loads; step s takes 32-bit words 2s, 2s+1.
// bitsandbytes' byte order: the EVEN flat index is the HIGH nibble, so a byte decodes to the
// pair (code[hi], code[lo]) with code[hi] in the low 16 bits (the lower k, like x's word).
//
// Scales: 32 consecutive k starting at a multiple of 32 (K % 32 == 0, blocksize >= 32 and a
// power of two) lie in one quantisation block, so each thread needs one float32 scale per row
// and chunk. Each weight value is then computed exactly as nf4_dequantize computes it: the
// float32 level times the float32 scale, one rounded multiply, rounded to x's dtype. A packed
// byte's two levels come from one 8-byte shared load: a table of the 256 byte values' level
// pairs, 16 copies so that the 16 lanes of a half-warp (lane & 15) read 16 distinct bank pairs
// whatever the bytes are (conflict-free: 2 wavefronts per warp load). The mma
// therefore sees bit-for-bit the dequantised W. (An earlier version multiplied the level and
// the scale after rounding each to bf16: the rounding of the 16 levels is the same for every
// weight, a systematic bias that made sums over many outputs ~1% off.)
//
// x in shared memory: token rows of `xs_stride` elements (stride in bytes = 32 mod 128) and
// inside each 128-value chunk the 16-byte unit u stored at u ^ ((u >> 3) & 1): each quarter
// warp's 16-byte loads then hit 8 distinct bank groups.
constexpr int kGemvWarps = 8;
constexpr int kTileRows = 16;                              // weight rows per warp (mma M)
constexpr int kBlockRows = kGemvWarps * kTileRows;         // 128
static_assert(kBlockRows == 128, "nf4_gemv_row_blocks in nf4.h assumes 128-row blocks");
constexpr int kChunk = 128;                                // k per warp step
constexpr int kAhead = 4;                                  // chunks in flight per warp
constexpr int kPairCopies = 16;                            // level-pair table copies
constexpr int kLevelBytes = 256 * kPairCopies * 8;         // float2 [256][16]: 32 KB
constexpr int kCode2Bytes = 256 * 4;
constexpr int kMaxXBytes = 64 * 1024;                      // x staging per block

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The two values of one packed byte, level * scale rounded once in float32 and then to the
// dtype (round to nearest even), as nf4_dequantize: the high nibble (lower k) in the low half.
// pairs_lane: the level-pair table at this lane's copy (pairs + (lane & 15)).
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t byte, const float2* pairs_lane,
                                                 float s) {
  const float2 l = pairs_lane[byte * kPairCopies];  // (code[byte >> 4], code[byte & 15])
  return pack2<T>(__fmul_rn(l.x, s), __fmul_rn(l.y, s));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Read-once data (the packed weight): don't let it evict what L1 holds (scales).
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#else
  v = __ldg(static_cast<const uint4*>(p));
#endif
  return v;
}

// One thread's inputs for one chunk: 16 packed bytes of rows g and g+8 and the raw scale
// inputs of their blocks (nested: absmax index + absmax2; plain: the float32 absmax bits in q).
struct ChunkIn {
  uint4 wa, wb;
  uint32_t qa, qb;
  float a2a, a2b;
};

struct GemvRows {
  const uint8_t* pa;  // row g, at this thread's first byte of the block's K range
  const uint8_t* pb;  // row g + 8
  int64_t blk_a, blk_b;  // flat value index of the same points
  int64_t k_first;       // global k of this thread's first value (chunk 0)
  bool va, vb;           // rows inside N
};

// One row's 16 packed bytes at p and the raw scale inputs of the block holding flat value
// index `value` (see ChunkIn).
__device__ __forceinline__ void load_row_chunk(const NF4Weight& w, const uint8_t* p, int64_t value,
                                               uint4& packed, uint32_t& q, float& a2) {
  packed = load_stream16(p);
  const int64_t blk = value >> w.bs_log2;
  if (w.nested) {
    q = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
    a2 = __ldg(w.absmax2 + (blk >> w.bs2_log2));
  } else {
    q = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + blk));
  }
}

__device__ __forceinline__ ChunkIn load_chunk_in(const NF4Weight& w, const GemvRows& r, int c,
                                                 int nch, int K) {
  ChunkIn in;
  in.wa = in.wb = make_uint4(0u, 0u, 0u, 0u);
  in.qa = in.qb = 0u;  // plain: scale 0.0f for what is outside the weight
  in.a2a = in.a2b = 0.f;
  const int64_t k = r.k_first + (int64_t)c * kChunk;
  if (c >= nch || k >= K) return in;
  const int64_t off = (int64_t)c * (kChunk / 2);
  const int64_t dv = (int64_t)c * kChunk;
  if (r.va) load_row_chunk(w, r.pa + off, r.blk_a + dv, in.wa, in.qa, in.a2a);
  if (r.vb) load_row_chunk(w, r.pb + off, r.blk_b + dv, in.wb, in.qb, in.a2b);
  return in;
}

// The float32 scale of one row's block (bitsandbytes' order for nested scales). Rows / chunks
// outside the weight have scale 0 (nested: they also skip the offset) so their A values are 0.
__device__ __forceinline__ float row_scale(const NF4Weight& w, uint32_t q, float a2, bool valid,
                                           const float* code2_s, float offset) {
  if (w.nested) return valid ? __fadd_rn(__fmul_rn(code2_s[q], a2), offset) : 0.f;
  return __uint_as_float(q);
}

// One 128-value chunk: 8 mma steps per token tile.
template <typename T, int MT>
__device__ __forceinline__ void gemv_chunk(const NF4Weight& w, const ChunkIn& in, bool valid_k,
                                           bool va, bool vb, const float2* pairs_lane,
                                           const float* code2_s, float offset,
                                           const T* xs_chunk, int xs_stride, int g, int t,
                                           float (&acc)[MT][4]) {
  const float sa = row_scale(w, in.qa, in.a2a, valid_k && va, code2_s, offset);
  const float sb = row_scale(w, in.qb, in.a2b, valid_k && vb, code2_s, offset);
  uint32_t xw[MT][16];  // x[token mt*8 + g][32t .. 32t + 31] as 16 words of two values
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const T* row = xs_chunk + (mt * 8 + g) * xs_stride;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int u = (4 * t + j) ^ ((t >> 1) & 1);  // the swizzled 16-byte unit
      const uint4 v = *reinterpret_cast<const uint4*>(row + 8 * u);
      xw[mt][4 * j] = v.x; xw[mt][4 * j + 1] = v.y; xw[mt][4 * j + 2] = v.z; xw[mt][4 * j + 3] = v.w;
    }
  }
  const uint32_t wa[4] = {in.wa.x, in.wa.y, in.wa.z, in.wa.w};
  const uint32_t wb[4] = {in.wb.x, in.wb.y, in.wb.z, in.wb.w};
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int word = s >> 1, sh = 16 * (s & 1);  // bytes 2s, 2s+1 of the 16
    const uint32_t a_lo = (wa[word] >> sh) & 0xFFu, a_hi = (wa[word] >> (sh + 8)) & 0xFFu;
    const uint32_t b_lo = (wb[word] >> sh) & 0xFFu, b_hi = (wb[word] >> (sh + 8)) & 0xFFu;
    // {row g, slots 2t..}, {row g+8, 2t..}, {row g, 2t+8..}, {row g+8, 2t+8..}
    const uint32_t frag[4] = {
        dequant_pair<T>(a_lo, pairs_lane, sa), dequant_pair<T>(b_lo, pairs_lane, sb),
        dequant_pair<T>(a_hi, pairs_lane, sa), dequant_pair<T>(b_hi, pairs_lane, sb)};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt], frag, xw[mt][2 * s], xw[mt][2 * s + 1]);
  }
}

// Chunks [first, first + count) of the K range of split `split` (count may be short or 0).
__host__ __device__ __forceinline__ int split_first(int split, int per_split) {
  return split * per_split;
}

// MT: token tiles of 8 rows of x (1 for M <= 8, 2 for M <= 16); LORA: lr.xa is set (a
// compile-time switch, so that a call without the low-rank term runs exactly the code it ran
// before there was one). Dynamic shared memory:
// level pairs (kLevelBytes) | code2 (kCode2Bytes) | xs [MT * 8][xs_stride] of T.
template <typename T, int MT, bool LORA>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
    nf4_gemv_kernel(const NF4Weight w, const NF4GemvArgs a, int per_split, int xs_stride,
                    const NF4LowRank lr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  float2* pairs = reinterpret_cast<float2*>(smem);
  float* code2_s = reinterpret_cast<float*>(smem + kLevelBytes);
  T* xs = reinterpret_cast<T*>(smem + kLevelBytes + kCode2Bytes);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int K = a.K;
  const int chunks_total = (K + kChunk - 1) / kChunk;
  const int c_first = split_first(blockIdx.y, per_split);
  const int nch = max(0, min(per_split, chunks_total - c_first));  // this block's chunks
  const int64_t k0 = (int64_t)c_first * kChunk;

  GemvRows r;
  const int64_t ra = (int64_t)blockIdx.x * kBlockRows + warp * kTileRows + g, rb = ra + 8;
  r.va = ra < a.N;
  r.vb = rb < a.N;
  r.k_first = k0 + 32 * t;
  r.pa = w.packed + (ra * K + r.k_first) / 2;
  r.pb = w.packed + (rb * K + r.k_first) / 2;
  r.blk_a = ra * K + r.k_first;
  r.blk_b = rb * K + r.k_first;

  if (!a.weights_frozen) gemv_wait_for_previous();

  // Weight bytes first, so their latency overlaps the table and x staging below.
  ChunkIn ring[kAhead];
#pragma unroll
  for (int i = 0; i < kAhead; ++i) ring[i] = load_chunk_in(w, r, i, nch, K);
  // pairs[e * 16 + copy] = (code[e >> 4], code[e & 15]) for every byte value e; consecutive
  // threads write consecutive 8-byte entries
  auto stage_levels = [&]() {
    for (int i = threadIdx.x; i < 256 * kPairCopies; i += kGemvWarps * 32) {
      const int e = i / kPairCopies;
      pairs[i] = make_float2(__ldg(w.code + (e >> 4)), __ldg(w.code + (e & 15)));
    }
    if (w.nested) code2_s[threadIdx.x] = __ldg(w.code2 + threadIdx.x);  // 256 threads
  };
  if (a.weights_frozen) {
    stage_levels();
    gemv_wait_for_previous();
  }

  {
    // x[token][k0 + kk] for kk < nch * 128 in 16-byte units, copied asynchronously (all in
    // flight at once, no registers; issued before the table so both latencies overlap);
    // units outside M and K are zero-filled (source size 0)
    const T* x = static_cast<const T*>(a.x);
    const int units_per_row = nch * (kChunk / 8);
    const int units = MT * 8 * units_per_row;
    for (int i = threadIdx.x; i < units; i += blockDim.x) {
      const int tok = i / units_per_row, uu = i % units_per_row;
      const int64_t k = k0 + (int64_t)uu * 8;
      const bool inside = tok < a.M && k < K;
      const T* src = inside ? x + tok * a.x_stride + k : x;  // a valid address either way
      const int c = uu >> 4, u = uu & 15;
      T* dst = xs + tok * xs_stride + c * kChunk + 8 * (u ^ ((u >> 3) & 1));
      const uint32_t dst_s = (uint32_t)__cvta_generic_to_shared(dst);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_s), "l"(src),
                   "r"(inside ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  if (!a.weights_frozen) stage_levels();  // after x's copies are issued: both latencies overlap
  if (LORA) lora_prefetch<T>(a, lr, (int64_t)blockIdx.x * kBlockRows, kBlockRows);
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  const float offset = nested_offset(w);

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

  for (int c0 = 0; c0 < nch; c0 += kAhead) {
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int c = c0 + i;
      if (c >= nch) break;
      const ChunkIn cur = ring[i];
      ring[i] = load_chunk_in(w, r, c + kAhead, nch, K);
      const bool valid_k = r.k_first + (int64_t)c * kChunk < K;
      gemv_chunk<T, MT>(w, cur, valid_k, r.va, r.vb, pairs + (lane & 15), code2_s, offset,
                        xs + c * kChunk, xs_stride, g, t, acc);
    }
  }

  // acc[mt][0], [1]: weight row ra, tokens mt*8 + 2t, + 1; acc[mt][2], [3]: row rb
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = mt * 8 + 2 * t + (i & 1);
      const int64_t n = i < 2 ? ra : rb;
      if (m >= a.M || n >= a.N) continue;
      float v = acc[mt][i];
      if (a.partial) {  // split K: the splits' sum (+ bias, + low-rank term) is written below
        a.partial[((int64_t)blockIdx.y * a.M + m) * a.N + n] = v;
      } else {
        if (bias) v += to_f32(bias[n]);
        y[m * a.y_stride + n] = from_f32<T>(v);
      }
    }
  }
  if (a.partial == nullptr) {
    if (LORA) add_low_rank_tile<T>(a, lr, y, ra, 1, t, MT);
    return;
  }
  // Split K in one kernel: the last of the row block's `split` blocks to finish adds the
  // partials in split order (deterministic).
  __shared__ bool last;
  __threadfence();  // this block's partials visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0)
    last = arrive_is_last(a.counters + blockIdx.x, a.counter_tag, (unsigned)a.split);
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int64_t n0 = (int64_t)blockIdx.x * kBlockRows;
  const int64_t mn = (int64_t)a.M * a.N;
  for (int idx = threadIdx.x; idx < a.M * kBlockRows; idx += blockDim.x) {
    const int m = idx / kBlockRows;
    const int64_t n = n0 + idx % kBlockRows;
    if (n >= a.N) continue;
    const float* p = a.partial + (int64_t)m * a.N + n;
    float sum = 0.f;
    for (int sp = 0; sp < a.split; ++sp) sum += __ldcg(p + sp * mn);  // L2: other SMs wrote
    if (bias) sum += to_f32(bias[n]);
    y[m * a.y_stride + n] = from_f32<T>(sum);
    if (LORA) add_low_rank<T>(lr, y, a.y_stride, m, n);
  }
#endif
}


// bf16 x into fp16 for v2 / v3's fp16 mma: each token's values times a power of two 2^shift
// that puts the token's largest |x| in [2^14, 2^15). bf16's 8 significant bits fit fp16's 11,
// so a value is exact in fp16 unless it is ~2^31 or more times smaller than that largest |x|
// (fp16's subnormals then drop its low bits: far below the sum's rounding). max_bits: the
// largest |x|'s bf16 bits (monotonic in |x| for non-negative values).
__device__ __forceinline__ int x_scale_shift(unsigned max_bits) {
  const int e = (int)(max_bits >> 7) - 127;  // unbiased exponent of the largest |x|
  return max(-126, min(126, 14 - e));
}
// The largest |x| of 8 bf16 values as bits (monotonic for non-negative values, NaN largest):
// what x_scale_shift takes, per 16-byte unit.
__device__ __forceinline__ uint32_t bf16x8_max_abs_bits(uint4 v) {
  const uint32_t m4 = __vmaxu2(__vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu),
                               __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
  return max(m4 & 0xFFFFu, m4 >> 16);  // per-half maxima -> one
}

__device__ __forceinline__ float pow2f(int e) { return __int_as_float((127 + e) << 23); }

// 8 bf16 values (one 16-byte unit) times 2^shift, as 8 fp16 values.
__device__ __forceinline__ uint4 bf16x8_scaled_to_fp16(uint4 v, int shift) {
  const float f = pow2f(shift);
  uint32_t* words = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float lo = __uint_as_float(words[j] << 16) * f;
    const float hi = __uint_as_float(words[j] & 0xFFFF0000u) * f;
    const __half2 h = __floats2half2_rn(lo, hi);
    words[j] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return v;
}

// ------------------------------------------------------------------ fused small-M matmul, v2
//
// Why a second kernel: v1 spends ~440 SASS instructions per KB of packed weight (its loop:
// per byte an 8-byte table load, two float32 multiplies and a convert, plus 64-bit address
// arithmetic and split-K bookkeeping) at 16 warps per SM, so it is bound by issue and latency,
// not by DRAM (29.5 us at M = 1 where 29.36 MB at copy speed takes 7 us). v2 needs about
// 2 instructions per packed byte plus per-step overhead:
//
// * fp16 mma with the NF4 levels themselves as the A operand (levels rounded to fp16: 2^-11
//   relative, 8x finer than bf16 levels, so no visible systematic bias) and the block scale
//   folded into the float32 accumulation: each mma k-step of 16 lies inside one 64-value
//   quantisation block, 4 mma = one block, then acc += scale * tmp (one FFMA per accumulator
//   per block). Needs K % 64 == 0 and blocksize >= 64 (a power of two).
// * one byte -> fp16x2 level pair per 4-byte shared load from a 256-entry table with 32
//   copies (entry e, copy = lane: every lane reads its own bank, conflict-free for any bytes),
//   at a 32 KB-aligned shared address so that the address is one LOP3 of a shifted word:
//   (byte << 7) | (table + lane * 4): a shift, a LOP3 and the load per byte.
// * x as fp16: bf16 x is staged in shared memory and converted there, each token's values
//   multiplied by a power of two (per block, from that token's largest |x| in the block's K
//   range) so that they fit fp16's range exactly (bf16's 8-bit mantissa fits in fp16's 11);
//   the sums are multiplied back by the inverse power of two (exact).
// * lane (g, t) of a warp loads 8 bytes of weight rows g and g+8 at byte 8t of the rows'
//   current 32-byte (64-value) block: a quad reads one whole block of a row (one sector).
//   A register ring keeps kV2Ahead steps of loads in flight per thread.
// * stream-K work split: the weight is row blocks (kV2Rows rows, one 16-row tile per warp) x
//   K/64 steps; W = row_blocks * steps is cut into gridDim.x contiguous ranges of equal size
//   (+-1), one per block, gridDim.x = the resident blocks of the whole GPU (one wave, every SM
//   busy to the end). A block whose range covers a whole row block writes y; a row block
//   shared by several blocks gets float32 partials (slot b + r: unique because b and r both
//   grow along the flattened order) and the last of its blocks to finish (a counter per row
//   block: arrive_is_last) adds them in block order: deterministic.
//
// Cost (ptxas 13.0, sm_90a, no-flush path of one loop iteration = 4 steps = 2 KB per warp):
// ~470 (M <= 8) / ~540 (M 9..16) SASS instructions for plain absmax, ~500 / ~565 nested, i.e.
// 235..282 per KB of packed weight (v1: ~440). Of a 4-step group: 64 table loads + 128
// shift/LOP3 for the addresses (the decode, ~40%), 16 (32) HMMA + FFMA, 8 SHFL, ~50 for the
// loads' addresses and ~150 loop control, cursor and register moves. 80 registers
// (__launch_bounds__(384, 2)), 24 warps per SM, ~49 KB of weight loads in flight per SM.
//
// k permutation of one block step (64 values; the dot product is invariant under any
// permutation applied to both operands): lane (g, t) holds values 16t .. 16t+15 of the block
// (8 bytes; byte j = values 2j (high nibble), 2j+1). mma step s = 0..3 takes byte 2s (values
// 4s, 4s+1) into A slots (row, 2t), (row, 2t+1) and byte 2s+1 (values 4s+2, 4s+3) into
// (row, 2t+8), (row, 2t+9); B (x) slots likewise, i.e. x[token][16t + 4s .. 16t + 4s + 3],
// 32-bit words 2s and 2s+1 of the lane's 16 x values (two 16-byte shared loads per token).
constexpr int kV2Warps = 12;
constexpr int kV2Threads = kV2Warps * 32;
constexpr int kV2Rows = kV2Warps * kTileRows;       // 192 weight rows per row block
constexpr int kV2Step = 64;                         // k per step (one quantisation block)
constexpr int kV2Ahead = 4;                         // steps of weight loads in flight
constexpr int kV2BlocksPerSM = 2;                   // the occupancy the plan assumes
constexpr int kV2MaxXBytes = 44 * 1024;             // x staging per block (2 blocks per SM)

// Steps of x one block can stage for `tokens` rows (row stride = steps * 128 + 16 bytes).
__host__ __device__ __forceinline__ int v2_max_steps(int tokens) {
  return (kV2MaxXBytes / tokens - 16) / (kV2Step * 2);
}

__device__ __forceinline__ uint2 load_stream8(const uint8_t* p) {
  uint2 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0,%1}, [%2];\n"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
#else
  v = __ldg(reinterpret_cast<const uint2*>(p));
#endif
  return v;
}

__device__ __forceinline__ void mma_f16_16816(float (&c)[4], uint32_t a0, uint32_t a1,
                                              uint32_t a2, uint32_t a3, uint32_t b0,
                                              uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm(  // no side effects: free to schedule
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

constexpr int kV2TableBytes = 256 * 32 * 4;         // 32 KB, at a 32 KB-aligned address
// Dynamic shared memory: up to 32 KB to reach the table's 32 KB alignment, the table, x.
constexpr int kV2MaxSmem = 2 * kV2TableBytes + kV2MaxXBytes;

// fp16x2 (code[byte >> 4], code[byte & 15]) of byte J (0..3) of `word` from the table (entry
// e, copy c at shared address table + e * 128 + c * 4); lane_addr = table + lane * 4 with
// table % 32768 == 0, so the byte's bits go in with an OR.
template <int J>
__device__ __forceinline__ uint32_t v2_pair(uint32_t word, uint32_t lane_addr) {
  const uint32_t off = (J == 0 ? (word << 7) : (word >> (8 * J - 7))) & 0x7F80u;
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(off | lane_addr));
  return v;
}

// One step's weight bytes for one thread: 8 bytes of rows a and b.
struct V2In {
  uint2 wa, wb;
};

// The raw scale inputs of rows a and b for one step (plain: the float32 absmax bits in qa,
// qb; nested: qa = absmax[a] | absmax[b] << 8 and the two absmax2 values). The 4 lanes of a
// quad share rows: lane t loads them for step 4q + t of each group of 4 steps, and each step
// takes its two scales from the quad's lane with a shuffle (a quarter of the loads and scale
// arithmetic per thread).
struct V2Scale {
  uint32_t qa, qb;
  float a2a, a2b;
};

// Where one thread reads: rows a = tile row g, b = g + 8 of the current row block at the
// current k-step, as the flat value index of the thread's first value in row a (32-bit:
// nf4_gemv_v2_ok asks (N + kV2Rows) * K < 2^31). Rows past N read the weight's last 16
// values instead (in bounds; their sums are never written).
struct V2Cursor {
  uint32_t va;
  int ks;
};

// One k-step on: the next 64 values of the rows, or row block r + 1's first (wrap).
__device__ __forceinline__ void v2_advance(V2Cursor& c, int U, uint32_t wrap) {
  if (++c.ks == U) {
    c.ks = 0;
    c.va += wrap;
  } else {
    c.va += kV2Step;
  }
}

__device__ __forceinline__ V2In v2_load(const NF4Weight& w, uint32_t va, uint32_t row8,
                                        uint32_t last16) {
  V2In in;
  in.wa = load_stream8(w.packed + (min(va, last16) >> 1));
  in.wb = load_stream8(w.packed + (min(va + row8, last16) >> 1));
  return in;
}

template <bool NESTED>
__device__ __forceinline__ V2Scale v2_load_scale(const NF4Weight& w, uint32_t va, uint32_t row8,
                                                 uint32_t last16) {
  V2Scale sc;
  // the lane's 16 values lie in one quantisation block (64-aligned run, blocksize >= 64)
  const uint32_t ba = min(va, last16) >> w.bs_log2, bb = min(va + row8, last16) >> w.bs_log2;
  if (NESTED) {
    sc.qa = (uint32_t)__ldg(static_cast<const uint8_t*>(w.absmax) + ba) |
            (uint32_t)__ldg(static_cast<const uint8_t*>(w.absmax) + bb) << 8;
    sc.qb = 0u;
    sc.a2a = __ldg(w.absmax2 + (ba >> w.bs2_log2));
    sc.a2b = __ldg(w.absmax2 + (bb >> w.bs2_log2));
  } else {
    sc.qa = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + ba));
    sc.qb = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + bb));
    sc.a2a = sc.a2b = 0.f;
  }
  return sc;
}

// The block owning flattened step s of W steps cut into nb ranges [s_b, s_{b+1}),
// s_b = floor(b * W / nb).
__device__ __forceinline__ int v2_owner(int64_t s, int64_t W, int nb) {
  return (int)(((s + 1) * nb - 1) / W);
}

// The last block of a shared row block rr: y[:, rr's rows] = the sum of the partials of blocks
// b_first..b_last (slot b + rr) in block order (deterministic), + bias. Not inlined: its
// registers must not count against the main loop's. 4 consecutive outputs per thread and
// pass, 8 blocks' partials loaded at once (it runs at the kernel's end, where nothing else
// hides its latency).
template <typename T>
__device__ __noinline__ void v2_reduce_row_block(const float* partial, int rr, int b_first,
                                                 int b_last, int M, int N, const T* bias,
                                                 T* y, int64_t y_stride) {
  constexpr int kQuads = kV2Rows / 4;
  const int64_t slot_stride = (int64_t)M * kV2Rows;  // from slot b + rr to slot b + 1 + rr
  for (int u = threadIdx.x; u < M * kQuads; u += blockDim.x) {
    const int m = u / kQuads, q = u - m * kQuads;
    const float* base = partial + ((int64_t)rr * M + m) * kV2Rows + 4 * q;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int b0 = b_first; b0 <= b_last; b0 += 8) {
      float4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        v[j] = b0 + j <= b_last
                   ? __ldcg(reinterpret_cast<const float4*>(base + (b0 + j) * slot_stride))
                   : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (b0 + j > b_last) break;
        sum.x += v[j].x; sum.y += v[j].y; sum.z += v[j].z; sum.w += v[j].w;
      }
    }
    const float r4[4] = {sum.x, sum.y, sum.z, sum.w};
    const int n0 = rr * kV2Rows + 4 * q;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (n0 + c >= N) break;
      float v = r4[c];
      if (bias) v += to_f32(bias[n0 + c]);
      y[m * y_stride + n0 + c] = from_f32<T>(v);
    }
  }
}

// Dynamic shared memory (kV2MaxSmem at most): the level-pair table at the first 32 KB-aligned
// shared address, then x as fp16 [MT * 8][xs_stride] (xs_stride halves: 16 bytes mod 128,
// conflict-free 16-byte loads).
template <typename T, int MT, bool NESTED>
__global__ void __launch_bounds__(kV2Threads, kV2BlocksPerSM)
    nf4_gemv_v2_kernel(const NF4Weight w, const NF4GemvArgs a, int xs_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t smem_addr = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t table_addr = (smem_addr + kV2TableBytes - 1) & ~(uint32_t)(kV2TableBytes - 1);
  unsigned char* table = smem + (table_addr - smem_addr);
  __half* xs = reinterpret_cast<__half*>(table + kV2TableBytes);
  __shared__ float code_s[16];
  __shared__ float code2_s[256];
  __shared__ unsigned tok_max[16];  // largest |x| bits per token (bf16 x)
  __shared__ bool last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int N = a.N, K = a.K, M = a.M;
  const int U = K / kV2Step;                            // steps per row
  const int row_blocks = (N + kV2Rows - 1) / kV2Rows;
  const int64_t W = (int64_t)row_blocks * U;
  const int nb = gridDim.x;
  const int64_t s0 = (int64_t)blockIdx.x * W / nb, s1 = (int64_t)(blockIdx.x + 1) * W / nb;
  const int count = (int)(s1 - s0);
  const int row_in_block = warp * kTileRows + g;
  const uint32_t last16 = (uint32_t)N * (uint32_t)K - 16;  // K % 64 == 0: a 16-value run
  const uint32_t row8 = 8u * (uint32_t)K;
  const uint32_t wrap = (uint32_t)(kV2Rows - 1) * (uint32_t)K + kV2Step;  // to the next row block

  // Weight loads first: their DRAM latency overlaps the table and x staging below.
  int r = (int)(s0 / U), ks = (int)(s0 % U);
  V2Cursor ld;
  ld.va = (uint32_t)(r * kV2Rows + row_in_block) * (uint32_t)K + (uint32_t)(ks * kV2Step + 16 * t);
  ld.ks = ks;
  // this lane's scale steps: t, t + 4, t + 8, ... of the block's range
  V2Cursor sl = ld;
  for (int q = 0; q < t; ++q) v2_advance(sl, U, wrap);
  V2Scale scale_raw = v2_load_scale<NESTED>(w, sl.va, row8, last16);  // steps 0..3
#pragma unroll
  for (int q = 0; q < 4; ++q) v2_advance(sl, U, wrap);
  V2In ring[kV2Ahead];
#pragma unroll
  for (int i = 0; i < kV2Ahead; ++i) {
    if (i < count) {
      ring[i] = v2_load(w, ld.va, row8, last16);
      v2_advance(ld, U, wrap);
    }
  }

  if (tid < 16) {
    code_s[tid] = __ldg(w.code + tid);
    tok_max[tid] = 0u;
  }
  if (NESTED && tid < 256) code2_s[tid] = __ldg(w.code2 + tid);
  {
    // x[token][k-step (s0 + i) % U] for the block's steps i, 16-byte units, asynchronously;
    // tokens >= M are zero-filled (source size 0)
    const T* x = static_cast<const T*>(a.x);
    const int units_per_row = count * (kV2Step / 8);
    const int units = MT * 8 * units_per_row;
    for (int i = tid; i < units; i += kV2Threads) {
      const int tok = i / units_per_row, uu = i % units_per_row;
      const int step = uu >> 3, u = uu & 7;
      const int kstep = (ks + step) % U;  // ks = s0 % U (32-bit: no 64-bit division)
      const bool inside = tok < M;
      const T* src = inside ? x + tok * a.x_stride + kstep * kV2Step + 8 * u : x;
      const uint32_t dst = (uint32_t)__cvta_generic_to_shared(xs + tok * xs_stride +
                                                               step * kV2Step + 8 * u);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                   "r"(inside ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  }
  __syncthreads();  // code_s, tok_max
  if (tid < 256) {
    // the pair table: thread e writes entry e's 32 copies as 8 16-byte stores, rotated by e
    // so that the 8 threads of a store phase hit 8 different bank groups
    const int e = tid;
    const __half2 h = __floats2half2_rn(code_s[e >> 4], code_s[e & 15]);
    const uint32_t v = *reinterpret_cast<const uint32_t*>(&h);
    uint4* entry = reinterpret_cast<uint4*>(table + e * 128);
#pragma unroll
    for (int j = 0; j < 8; ++j) entry[(j + e) & 7] = make_uint4(v, v, v, v);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  const int tokens = MT * 8;
  const int units8 = count * (kV2Step / 8);  // 8-value units per token row
  if (std::is_same<T, __nv_bfloat16>::value) {
    // per token: the largest |x| (as bits: monotonic for non-negative floats, NaN largest)
    for (int i = tid; i < tokens * units8; i += kV2Threads) {
      const int tok = i / units8, uu = i % units8;
      const uint32_t m =
          bf16x8_max_abs_bits(*reinterpret_cast<const uint4*>(xs + tok * xs_stride + 8 * uu));
      if (m) atomicMax(&tok_max[tok], m);
    }
    __syncthreads();
    // x * 2^shift with the token's largest |x| in [2^14, 2^15), as fp16
    for (int i = tid; i < tokens * units8; i += kV2Threads) {
      const int tok = i / units8, uu = i % units8;
      uint4* p = reinterpret_cast<uint4*>(xs + tok * xs_stride + 8 * uu);
      *p = bf16x8_scaled_to_fp16(*p, x_scale_shift(tok_max[tok]));
    }
    __syncthreads();
  }
  const float offset = NESTED ? __ldg(w.offset) : 0.f;
  const uint32_t lane_addr = table_addr + (uint32_t)lane * 4;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);

  // Row block rr is done for this block (a row block ends, or the block's range does): each
  // thread writes its sums to y (row block not shared) or to the block's partial slot.
  auto flush = [&](int rr) {
    const int64_t first = (int64_t)rr * U;
    const bool whole = v2_owner(first, W, nb) == v2_owner(first + U - 1, W, nb);
    const int ra = rr * kV2Rows + row_in_block;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = mt * 8 + 2 * t + (i & 1);
        const int n = ra + (i < 2 ? 0 : 8);
        if (m < M && n < N) {
          float v = acc[mt][i];
          if (std::is_same<T, __nv_bfloat16>::value)  // undo the token's power of two
            v *= pow2f(-x_scale_shift(tok_max[m]));
          if (whole) {
            if (bias) v += to_f32(bias[n]);
            y[m * a.y_stride + n] = from_f32<T>(v);
          } else {
            a.partial[(((int64_t)blockIdx.x + rr) * M + m) * kV2Rows + (n - rr * kV2Rows)] = v;
          }
        }
        acc[mt][i] = 0.f;
      }
    }
  };
  // After flush(rr) by every thread: a shared row block's last block to finish adds the
  // partials (in block order: deterministic). Called by all threads (it syncs).
  auto settle = [&](int rr) {
    const int64_t first = (int64_t)rr * U;
    const int b_first = v2_owner(first, W, nb), b_last = v2_owner(first + U - 1, W, nb);
    if (b_first == b_last) return;
    __threadfence();  // this block's partials visible device-wide before it is counted
    __syncthreads();
    if (tid == 0)
      last = arrive_is_last(a.counters + rr, a.counter_tag, (unsigned)(b_last - b_first + 1));
    __syncthreads();
    if (!last) return;
    __threadfence();
    v2_reduce_row_block<T>(a.partial, rr, b_first, b_last, M, N, bias, y, a.y_stride);
  };

  // U >= kV2Ahead (nf4_gemv_v2_ok): at most one row block ends inside a group of kV2Ahead
  // steps, so the group's body only flushes and the syncing part runs after the group.
  static_assert(kV2Ahead == 4, "the loop's groups of kV2Ahead steps are the scale groups of 4");
  for (int i0 = 0; i0 < count; i0 += kV2Ahead) {
    int ended = -1;
    // this lane's step (i0 + t) scales, then the next group's loads (clamped in bounds past
    // the block's range: harmless)
    float my_sa, my_sb;
    if (NESTED) {
      my_sa = __fadd_rn(__fmul_rn(code2_s[scale_raw.qa & 0xFFu], scale_raw.a2a), offset);
      my_sb = __fadd_rn(__fmul_rn(code2_s[scale_raw.qa >> 8], scale_raw.a2b), offset);
    } else {
      my_sa = __uint_as_float(scale_raw.qa);
      my_sb = __uint_as_float(scale_raw.qb);
    }
    if (i0 + 4 < count) {
      scale_raw = v2_load_scale<NESTED>(w, sl.va, row8, last16);
#pragma unroll
      for (int q = 0; q < 4; ++q) v2_advance(sl, U, wrap);
    }
#pragma unroll
    for (int j = 0; j < kV2Ahead; ++j) {
      const int i = i0 + j;
      if (i >= count) break;
      const V2In cur = ring[j];
      if (i + kV2Ahead < count) {
        ring[j] = v2_load(w, ld.va, row8, last16);
        v2_advance(ld, U, wrap);
      }
      // step i's scales: computed by lane j of this quad
      const float sa = __shfl_sync(0xffffffffu, my_sa, (lane & ~3) | j);
      const float sb = __shfl_sync(0xffffffffu, my_sb, (lane & ~3) | j);
      // level pairs of bytes 0..7 of rows a and b
      uint32_t pa[8], pb[8];
      pa[0] = v2_pair<0>(cur.wa.x, lane_addr); pa[1] = v2_pair<1>(cur.wa.x, lane_addr);
      pa[2] = v2_pair<2>(cur.wa.x, lane_addr); pa[3] = v2_pair<3>(cur.wa.x, lane_addr);
      pa[4] = v2_pair<0>(cur.wa.y, lane_addr); pa[5] = v2_pair<1>(cur.wa.y, lane_addr);
      pa[6] = v2_pair<2>(cur.wa.y, lane_addr); pa[7] = v2_pair<3>(cur.wa.y, lane_addr);
      pb[0] = v2_pair<0>(cur.wb.x, lane_addr); pb[1] = v2_pair<1>(cur.wb.x, lane_addr);
      pb[2] = v2_pair<2>(cur.wb.x, lane_addr); pb[3] = v2_pair<3>(cur.wb.x, lane_addr);
      pb[4] = v2_pair<0>(cur.wb.y, lane_addr); pb[5] = v2_pair<1>(cur.wb.y, lane_addr);
      pb[6] = v2_pair<2>(cur.wb.y, lane_addr); pb[7] = v2_pair<3>(cur.wb.y, lane_addr);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // x of this step: token mt * 8 + g, values 16t .. 16t + 15 (8 words)
        const uint4* p = reinterpret_cast<const uint4*>(xs + (mt * 8 + g) * xs_stride +
                                                        i * kV2Step + 16 * t);
        const uint4 x0 = p[0], x1 = p[1];
        float tmp[4] = {0.f, 0.f, 0.f, 0.f};
        mma_f16_16816(tmp, pa[0], pb[0], pa[1], pb[1], x0.x, x0.y);
        mma_f16_16816(tmp, pa[2], pb[2], pa[3], pb[3], x0.z, x0.w);
        mma_f16_16816(tmp, pa[4], pb[4], pa[5], pb[5], x1.x, x1.y);
        mma_f16_16816(tmp, pa[6], pb[6], pa[7], pb[7], x1.z, x1.w);
        acc[mt][0] = fmaf(sa, tmp[0], acc[mt][0]);
        acc[mt][1] = fmaf(sa, tmp[1], acc[mt][1]);
        acc[mt][2] = fmaf(sb, tmp[2], acc[mt][2]);
        acc[mt][3] = fmaf(sb, tmp[3], acc[mt][3]);
      }
      if (++ks == U) {  // uniform over the block
        flush(r);
        ended = r;
        ks = 0;
        ++r;
      }
    }
    if (ended >= 0) settle(ended);
  }
  if (ks != 0) {  // the block's range ends inside row block r
    flush(r);
    settle(r);
  }
#endif
}

// ------------------------------------------------------------------ fused small-M matmul, v3
//
// Why a third kernel: v1 (~440) and v2 (235..282) issue too many SASS instructions per KB of
// packed weight to stream it at DRAM speed with 16..24 warps per SM. v3 keeps v2's numerics
// (fp16 mma on the NF4 levels, float32 block scale folded into the float32 sums, bf16 x scaled
// per token by a power of two into fp16) and cuts the loop to ~2 instructions per packed byte:
//
// * Decode = one PRMT + one LDS per packed byte. The level-pair table (byte e -> fp16x2
//   (code[e >> 4], code[e & 15])) has 32 copies, copy = lane (conflict-free for any bytes), at
//   shared address anchor + e * 256 + lane * 4: PRMT copies byte J of the weight word into byte
//   1 of the lane's constant lane * 4, and the LDS adds `anchor`, a static shared array whose
//   address ptxas knows, as a uniform register: LDS R, [R + UR]. (A table reached through a
//   dynamic-shared-memory pointer costs one more IADD per byte: checked in the SASS.) The table
//   spans 64 KB (entries 256 bytes apart, 128 used): the static anchor holds entry 0, the
//   dynamic shared memory, which the hardware places right after the static (checked at run
//   time: a trap, never silent misuse), holds the rest.
// * x lives in the table's holes: bytes 128..255 of entry e are 64 fp16 values = one 64-k step
//   of one token (hole h = step * tokens + token). The CTA's K range is therefore at most
//   256 / tokens steps (32 for M <= 8, 16 for M <= 16). Inside a hole the 16-byte unit u is
//   stored at u ^ (token & 1): the 8 lanes of a quarter warp (tokens g, g+1 x t = 0..3) hit
//   8 distinct bank groups.
// * Each warp owns 32 weight rows (two m16 tiles) over the CTA's K range, so each x fragment
//   (two 16-byte LDS per token tile and step) feeds both tiles: the shared-memory wavefronts
//   per KB are 32 (decode) + 8 * MT (x), not 32 + 16 * MT.
// * Loads: lane (g, t) reads 8 bytes (16 values, LDG.64) of each of its rows g, g+8, g+16,
//   g+24 per 64-k step: a quad reads one 32-byte sector per row, i.e. the step's whole block.
//   (Not 16-byte loads: every mma k-slice must lie in one quantisation block for the scale
//   fold, and a quad's 16 k per mma come from all 4 lanes, so a lane can hold only 16 values
//   of a block; LDG.64 costs 4 instructions per KB, and whole sectors are read either way.)
//   kV3Ahead = 4 steps of loads in flight per thread: 128 bytes, 16 warps per SM (2 CTAs of
//   8 warps): 64 KB of weight loads in flight per SM.
// * Whole lines (the 16-warp CTA only): each load instruction asks L2 for 8 rows x one 32-byte
//   sector above; v3's loads alone then stream at ~10 us for 4096 x 14336, whole 128-byte lines
//   per instruction at ~8.4 (runs 115, 119, 120). So in the 16-warp CTA a lane loads 16 bytes
//   (8 lanes = one row's 4 steps, 128 bytes) and the 8 loads of a group of 4 steps cover the
//   warp's 32 rows: load q, row 4q + lane / 8, at 16 (lane % 8 ^ 4 (q & 1)). A quad then holds
//   one step pair (64 bytes) of a row: quad g holds rows rho(g) + 8i (rho(g) = 4 (g & 1) + g / 2)
//   for steps 0-1 and its partner quad's rows rho(g) ^ 4 + 8i for steps 2-3, so it keeps two
//   sets of sums, added by one shfl.xor 4 at the end. Per group: 32 SEL pick each lane's pair
//   from its two loads, v3_pair_exchange moves half of each pair between lanes t and t ^ 2
//   (48 SEL + 16 SHFL), and each tile's x fragments are read once per tile (twice per step).
//   That is ~720 SASS instructions per group against 509: the loop's load waits shrink but its
//   decode per group grows from 1.8 to 2.6 us (run 120), so it pays only where the loads were
//   the bound: 14336 -> 4096 at M = 1 and 2 (16 K parts, one CTA per SM) ran 6-10% faster
//   (run 121), and 4096 -> 14336 with two 8-warp CTAs per SM 4-6% slower (run 119).
// * Scales: lane L of a warp computes the scale of the warp's row L for the 4 steps of a group
//   (raw inputs loaded one group ahead); each step takes its 4 row scales by SHFL.
// * Work split: CTA (x, y) = rows [R x, R x + R) x steps [y * steps, (y + 1) * steps) of
//   K / 64, R = 256 / P: the 8 warps are 8 / P tiles of 32 rows x P parts of the CTA's steps
//   (a.v3_kparts = P: 1, 2, 4 or 8; P = 16: a CTA of 16 warps on one tile, R = 32, see
//   kV3WidePartsCTA). The parts' sums are added in shared memory at the end, in
//   part order; K split across CTAs (grid.y > 1) instead costs float32 partials, a fence, a
//   counter and a last CTA that adds them (the counters as for v1: arrive_is_last), all at the
//   kernel's end where nothing hides them. nf4_gemv_plan picks P and the CTA split from a cost
//   model (the most work any SM gets); the sums are deterministic either way.
//
// Cost (ptxas 13.0, sm_90a; one loop iteration = 4 steps = 4 KB of packed weight per warp):
// 435 / 468 SASS instructions (M <= 8, plain / nested scales) and 513 / 547..550 (M 9..16),
// i.e. 109 / 117 and 128 / 137 per KB (v2: 235..282, v1: ~440). Per KB: 32 PRMT + 32 LDS
// (decode), 8 (16) HMMA + 8 (16) FFMA, 2 (4) x LDS.128, 4 SHFL, 4 LDG.64, the rest scales and
// loop. 128 registers (__launch_bounds__(256, 2); only fp16 x, nested, M 9..16 spills: 8
// bytes), 2 CTAs = 16 warps per SM, 2 x 65 KB of shared memory; weight loads in flight:
// 16 warps x 32 lanes x 4 steps x 32 bytes = 64 KB per SM. Shared-memory wavefronts per KB:
// 32 (table) + 8 * MT (x).
// Known costs not in the loop: with K split in s parts the float32 partials are s * M * N * 4
// bytes (L2), e.g. 4 MB at M = 16, 4096 x 14336 (s = 16), summed by the last CTA of each row
// group at the end (v3_sum_splits).
//
// k permutation, as v2 (the dot product is invariant under a permutation applied to both
// operands): lane (g, t) holds values 16t .. 16t+15 of a 64-value step (8 bytes; byte j =
// values 2j (high nibble), 2j+1). mma s = 0..3 takes byte 2s into A slots (row, 2t), (row,
// 2t+1) and byte 2s+1 into (row, 2t+8), (row, 2t+9); B takes x values 16t+4s .. 16t+4s+3, i.e.
// 32-bit words 2s and 2s+1 of the lane's 16 x values.
//
// Exactness (same as v2): W enters as fp16(level) * scale with the scale applied in float32 to
// the float32 sum of 4 mma. fp16 rounds a level by at most 2^-11 relative (the levels are in
// [-1, 1], all normal in fp16 but 0), so each weight is within 2^-11 |W| of the float32 W,
// 8x finer than nf4_dequantize's bf16 rounding (2^-8 relative) and about as fine as its fp16
// rounding; the tests hold v3 to "float32 W with fp16 levels" (see check_fused_gpu). x: bf16
// has 8 significant bits, fp16 11, so a bf16 value times a power of two is exact in fp16 while
// it lies in fp16's normal range; each token's largest |x| in the CTA's K range is put in
// [2^14, 2^15), so only values ~2^31 or more times smaller lose bits (fp16 subnormals), far
// below the sum's own rounding.
constexpr int kV3Warps = 8;
constexpr int kV3WarpRows = 32;                          // two m16 tiles
constexpr int kV3Step = 64;                              // k per step (one scale block)
constexpr int kV3Ahead = 4;                              // steps of weight loads in flight
constexpr int kV3BlocksPerSM = 2;                        // __launch_bounds__ and the plan
// 16 K parts: a CTA of 16 warps (one per SM), all on one tile of 32 rows, each warp a sixteenth
// of the CTA's K range. One CTA then holds an SM's 64 KB of loads in flight alone, so a deep
// weight (14336 -> 4096 at M = 1: 128 tiles, 224 steps) needs no K split across CTAs, whose
// partials, fence and last-CTA sum cost ~3-4 us at the kernel's end (run 70).
constexpr int kV3WidePartsCTA = 16;
__host__ __device__ constexpr int v3_cta_warps(int parts) {
  return parts == kV3WidePartsCTA ? 16 : kV3Warps;
}
__host__ __device__ constexpr int v3_cta_rows(int parts) {
  return v3_cta_warps(parts) / parts * kV3WarpRows;
}
constexpr int kV3TableSpan = 256 * 256;                  // entries 256 bytes apart
constexpr int kV3AnchorBytes = 128;                      // static: entry 0's 32 copies
// dynamic shared memory: the rest of the table span, then code2 [256] and tok_shift [16]
constexpr int kV3Smem = kV3TableSpan - kV3AnchorBytes + 256 * 4 + 32 * 4;

// x slots per step in the table's holes: M tokens (M <= 8: the lanes of absent tokens load
// nothing), or the second tile's 16 (M 9..16: a tile's lanes all load, and the slots of absent
// tokens feed only mma columns that are never written, so they may hold anything, but they
// must lie inside the table).
__host__ __device__ constexpr int v3_slots(int M) { return M <= 8 ? M : 16; }
// Steps of x one CTA can hold in the table's 256 holes.
__host__ __device__ constexpr int v3_max_steps(int M) { return 256 / v3_slots(M); }
// A 16-warp CTA (one per SM) has shared memory to spare: its x may take holes past the
// table's 256 entries (entries of x alone, bytes 128..255 used), up to kV3WideHoles, so that
// 14336 -> 4096 (224 steps) fits one CTA's K range at 1 or 2 tokens: no K split. Its span
// (table + extra entries) ends where code2, tok_max and the flag begin. (896 holes, for 4
// tokens, ran 34% slower at M = 4 in run 78 than 8-warp CTAs with a K split: 224 KB of shared
// memory leaves L1, which the scales are read through, ~30 KB; and 3 tokens 5% slower.)
constexpr int kV3WideHoles = 512;
__host__ __device__ constexpr int v3_wide_max_steps(int M) { return kV3WideHoles / v3_slots(M); }
// (a fixed span, whatever the call's K range: code2 at a run-time offset cost one more register
// in the loop, and ptxas spilled in the nested-scale LoRA kernels; two 8-warp CTAs take as much)
constexpr int kV3WideSpan = 256 * kV3WideHoles;
constexpr int kV3WideSmem = kV3WideSpan - kV3AnchorBytes + 256 * 4 + 32 * 4;

// The fp16x2 level pair of byte J of `word`: lane4 = lane * 4, table at `anchor`. `anchor + off`
// reaches past the 128-byte static array into the dynamic shared memory on purpose (see the
// kernel's check); it stays a plain C++ load because that is what lets ptxas fold the anchor's
// address into the LDS as a uniform register (an asm ld.shared from a register base costs one
// IADD per byte: checked in the SASS of nvcc 13.0).
template <int J>
__device__ __forceinline__ uint32_t v3_pair(const unsigned char* anchor, uint32_t word,
                                            uint32_t lane4) {
  // offset bytes: [0] = lane4's byte 0, [1] = word's byte J, [2], [3] = lane4's (zero)
  const uint32_t off = __byte_perm(word, lane4, 0x7604 | (J << 4));
  return *reinterpret_cast<const uint32_t*>(anchor + off);
}

// The NF4 levels as fp16, split into low and high bytes for __byte_perm lookups: lo[r] byte i =
// low byte of level 4r + i, hi[r] likewise with the high bytes.
struct V3Levels {
  uint32_t lo[4], hi[4];
};

// v3_pair<0..3> of `word` without shared memory: byte lookups by __byte_perm (PRMT) in the
// level bytes. Each PRMT looks up 4 nibbles' low 3 bits among 8 levels; bit 3 of each nibble
// chooses between the two halves of the table (a byte mask made by PRMT's sign-replicate mode
// from the nibble's bit 3, which sits at bit 7 of a byte of `word` or of `word << 4`). 22
// instructions per word, no shared-memory traffic (checked exhaustively against the table in
// a Python model of PRMT).
// prmt.b32 in its default mode, whose selector nibbles' bit 3 replicates the chosen byte's sign
// bit (written out: __byte_perm documents only the 3-bit byte choice).
__device__ __forceinline__ uint32_t prmt_sign_mode(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
}

__device__ __forceinline__ void v3_pairs_reg(const V3Levels& lv, uint32_t word, uint32_t (&p)[4]) {
  const uint32_t shifted = word << 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t s = (half ? word >> 16 : word) & 0x7777u;
    const uint32_t mask = prmt_sign_mode(shifted, word, half ? 0xFBEAu : 0xD9C8u);
    const uint32_t lo_a = __byte_perm(lv.lo[0], lv.lo[1], s), lo_b = __byte_perm(lv.lo[2], lv.lo[3], s);
    const uint32_t hi_a = __byte_perm(lv.hi[0], lv.hi[1], s), hi_b = __byte_perm(lv.hi[2], lv.hi[3], s);
    const uint32_t lo = (lo_a & ~mask) | (lo_b & mask), hi = (hi_a & ~mask) | (hi_b & mask);
    // pair j = (level of byte j's high nibble, level of its low nibble), as v3_pair
    p[2 * half] = __byte_perm(lo, hi, 0x4051);
    p[2 * half + 1] = __byte_perm(lo, hi, 0x6273);
  }
}

__device__ __forceinline__ void v3_store16(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// Entry e of the level-pair table at `table` (v3, v4; entries 256 bytes apart): 32 copies of
// fp16x2 (hi, lo) = (code[e >> 4], code[e & 15]) as 8 16-byte stores, rotated by e so that the
// 8 threads of a store phase hit 8 different bank groups.
__device__ __forceinline__ void v3_store_level_pair(uint32_t table, int e, float hi, float lo) {
  const __half2 h = __floats2half2_rn(hi, lo);
  const uint32_t v = *reinterpret_cast<const uint32_t*>(&h);
  const uint32_t entry = table + (uint32_t)e * 256u;
#pragma unroll
  for (int j = 0; j < 8; ++j) v3_store16(entry + 16u * ((j + e) & 7), make_uint4(v, v, v, v));
}

// One step's packed bytes of one lane's 4 rows (g, g+8, g+16, g+24).
struct V3In {
  uint2 w[4];
};

// c ? a : b, word by word, kept where it is written: before the ring slots it reads are
// reloaded (as a plain select, the compiler sank it past the loop's exits, behind the reloads,
// and then copied the whole ring to other registers first: 32 moves per group)
__device__ __forceinline__ uint4 select4(bool c, uint4 a, uint4 b) {
  uint4 r;
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %8, 0;\n"
      "selp.b32 %0, %4, %9, p;\nselp.b32 %1, %5, %10, p;\n"
      "selp.b32 %2, %6, %11, p;\nselp.b32 %3, %7, %12, p;\n}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"((uint32_t)c), "r"(b.x), "r"(b.y), "r"(b.z),
        "r"(b.w));
  return r;
}

// Whole lines: a quad's 4 lanes hold one row's 64 bytes of a step pair (lane t: 16 bytes at
// 16 t, i.e. values 32 t' .. 32 t' + 31 of step t >> 1, t' = t & 1). Lanes t and t ^ 2 swap
// half of them, after which lane t holds 8 bytes (16 values at 0 / 32 / 16 / 48 for t = 0..3)
// of each step: s0 (the pair's first step) and s1, as the mma's k slots need (every lane's
// values of one mma from one quantisation block).
__device__ __forceinline__ void v3_pair_exchange(uint4 d, bool hi_lane, uint2& s0, uint2& s1) {
  const uint32_t r0 = __shfl_xor_sync(0xffffffffu, hi_lane ? d.x : d.z, 2);
  const uint32_t r1 = __shfl_xor_sync(0xffffffffu, hi_lane ? d.y : d.w, 2);
  s0 = hi_lane ? make_uint2(r0, r1) : make_uint2(d.x, d.y);
  s1 = hi_lane ? make_uint2(d.z, d.w) : make_uint2(r0, r1);
}

// The last CTA of a row group: y[:, n] = the K splits' partials of row n (one row per thread)
// added in split order (deterministic), + bias. Every load of 4 splits x all tokens is issued
// before the sums use them (64 in flight per thread at M = 16): this runs at the kernel's end,
// where nothing hides its latency.
template <typename T, bool LORA>
__device__ __forceinline__ void v3_sum_splits(const NF4LowRank& lr, const float* partial, int n,
                                              int M, int N, int splits, const T* bias, T* y,
                                              int64_t y_stride) {
  if (n >= N) return;
  const int64_t mn = (int64_t)M * N;
  float sum[16];
#pragma unroll
  for (int m = 0; m < 16; ++m) sum[m] = 0.f;
  for (int sp0 = 0; sp0 < splits; sp0 += 4) {
    float v[4][16];
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int m = 0; m < 16; ++m)
        v[q][m] = (sp0 + q < splits && m < M)
                      ? __ldcg(partial + (sp0 + q) * mn + (int64_t)m * N + n)  // L2: other SMs
                      : 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int m = 0; m < 16; ++m) sum[m] += v[q][m];  // + 0 past the end: exact
  }
  const float b = bias ? to_f32(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < 16; ++m)
    if (m < M) y[m * y_stride + n] = from_f32<T>(sum[m] + b);
  if (LORA)
    for (int m = 0; m < M; ++m) add_low_rank<T>(lr, y, y_stride, m, n);
}

// LORA: lr.xa is set (compile-time, as for nf4_gemv_kernel). WARPS: 8 (two CTAs per SM), or
// 16 for 16 K parts (one CTA per SM, see kV3WidePartsCTA).
// The v3 kernel's body (nf4_gemv_v3_kernel: one weight; nf4_gemv_v3_group_kernel: several
// weights that share x, one launch). row_group: the CTA's group of rows in its weight.
template <int MT, bool NESTED, typename T, int DECODE, bool LORA, int WARPS>
__device__ __forceinline__ void v3_gemv(const NF4Weight& w, const NF4GemvArgs& a,
                                        const NF4LowRank& lr, const unsigned row_group) {
  static_assert(WARPS == kV3Warps || WARPS == 16, "v3 CTAs have 8 or 16 warps");
  // the table, code2 and the x units are written by the first 256 threads' indices
  constexpr bool kWide = WARPS != kV3Warps;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(128) unsigned char anchor[kV3AnchorBytes];
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t anchor_addr = (uint32_t)__cvta_generic_to_shared(anchor);
  // the table and x are addressed from `anchor` across the static/dynamic boundary
  if ((uint32_t)__cvta_generic_to_shared(smem) != anchor_addr + kV3AnchorBytes) __trap();
  float* code2_s = reinterpret_cast<float*>(smem + (kWide ? kV3WideSpan : kV3TableSpan) -
                                            kV3AnchorBytes);
  unsigned* tok_max = reinterpret_cast<unsigned*>(code2_s + 256);  // [16] bf16 x: max |x| bits
  unsigned* last = tok_max + 16;  // the K split's last-CTA flag
  // (no other static shared variable: `anchor` must be the whole static part)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int N = a.N, K = a.K, M = a.M;
  const int S = K / kV3Step;
  // x slots per step (v3_slots): a run-time M for one token tile, 16 for two
  const int slots = MT == 1 ? M : 16;
  const uint32_t step_bytes = 256u * (uint32_t)slots;  // from one step's holes to the next's
  // the CTA: rows [rows_cta * x, + rows_cta) x steps [s0, s0 + count); this warp: tile `wt` of
  // the CTA's rows x part `part` of its steps: [s0 + p0, s0 + p0 + wcount), wcount maybe 0
  // (two token tiles: one part, a compile-time 1: the K parts' few registers made MT = 2 spill
  // more, 5-7% slower in run 65, and more parts never paid there)
  const int parts = MT == 1 ? a.v3_kparts : 1, tiles = WARPS / parts;
  const int rows_cta = tiles * kV3WarpRows;
  const int part = parts == 1 ? 0 : warp / tiles, wt = warp - part * tiles;
  const int s0 = blockIdx.y * a.v3_steps;
  const int count = min(a.v3_steps, S - s0);  // >= 1 (the plan's split is exact)
  const int per_part = (count + parts - 1) / parts;
  const int p0 = min(count, part * per_part);
  const int wcount = min(count, p0 + per_part) - p0;
  const int ws = s0 + p0;  // the warp's first step
  const int tile_base = row_group * rows_cta + wt * kV3WarpRows;
  const int64_t half_k = K / 2;
  // (one token tile only: in the two-tile kernels, M 9..16, the second wait placement made
  // ptxas spill up to twice as many registers)
  const bool early_loads = MT == 1 && a.weights_frozen;

  NF4_MARK(tid == 0, kTimelineStartNs);
  NF4_MARK(tid == 0, kTimelineSm);
  NF4_MARK(tid == 0, kTimelineStart);
  if (!early_loads) gemv_wait_for_previous();
  NF4_MARK(tid == 0 && !early_loads, kTimelineWaited);

  // Weight loads first: their DRAM latency overlaps the table and x staging below.
  // The 16-warp CTA (one token tile): whole lines (see "Whole lines" above): load q (0..7) of a
  // group of 4 steps reads row 4q + oct (oct = lane / 8), 16 bytes at 16 (jj ^ 4 (q & 1)) of the
  // group's 128 (jj = lane % 8). quad g's rows: tile row rho (pair 0; the pair-1 sums belong to
  // rho ^ 4).
  constexpr bool kLines = MT == 1 && kWide;
  const int rho = kLines ? ((g & 1) << 2 | g >> 1) : g;
  const bool odd_quad = g & 1, hi_lane = t >= 2;
  uint4 lring[8];
  const uint8_t* lp[2];
  int lstride = 0, rows_left = 0, lstep[2] = {0, 0};
  // loads [q0, q0 + 4) of the group `ahead` groups after lp's (rows past N, steps past the
  // warp's range: not loaded, their sums are never written or their steps never run)
  auto line_loads = [&](int i0, int ahead, int q0) {
#pragma unroll
    for (int q = q0; q < q0 + 4; ++q)
      if (4 * q < rows_left && i0 + 4 * ahead + lstep[q & 1] < wcount)
        lring[q] = load_stream16(lp[q & 1] + (q >> 1) * lstride + 128 * ahead);
  };
  // The 8-warp CTAs and two token tiles: 8 bytes of rows g + 8i per step (lane t at byte 8t of
  // the 32). Rows past N read row N - 1 (in bounds; their sums are never written).
  const uint8_t* wp[4];
  V3In ring[kV3Ahead];
  if constexpr (kLines) {
    const int oct = lane >> 3, jj = lane & 7;
    const uint8_t* first =
        w.packed + (int64_t)(tile_base + oct) * half_k + (int64_t)ws * (kV3Step / 2);
    lp[0] = first + 16 * jj;
    lp[1] = first + 4 * half_k + 16 * (jj ^ 4);
    lstride = 8 * (int)half_k;
    rows_left = N - tile_base - oct;
    lstep[0] = 2 * (g & 1) + (t >> 1);  // this lane's step of the group in loads q even / odd
    lstep[1] = 2 * ((g & 1) ^ 1) + (t >> 1);
    line_loads(0, 0, 0);
    line_loads(0, 0, 4);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = min(tile_base + g + 8 * i, N - 1);
      wp[i] = w.packed + (int64_t)row * half_k + (int64_t)ws * (kV3Step / 2) + 8 * t;
    }
#pragma unroll
    for (int j = 0; j < kV3Ahead; ++j) {
      if (j < wcount) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ring[j].w[i] = load_stream8(wp[i] + j * (kV3Step / 2));
      }
    }
  }
  // This lane's scale row (warp row `lane`) and the raw scale inputs of steps 0..3 (steps past
  // the warp's range are not loaded: their scales are never used). Block indices in 32 bits
  // (N * K / 64 < 2^31 blocks): step i's block is blk0 + ((r0 + 64 i) >> bs_log2).
  uint32_t blk0, rv;  // rv = r0 + 64 * (the group's first step)
  {
    const int64_t sval0 = (int64_t)min(tile_base + lane, N - 1) * K + (int64_t)ws * kV3Step;
    blk0 = (uint32_t)(sval0 >> w.bs_log2);
    rv = (uint32_t)(sval0 & ((int64_t(1) << w.bs_log2) - 1));
  }
  uint32_t raw_q[4];
  float raw_a2[4];
  auto load_raw = [&](int i0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      raw_q[j] = 0u;
      raw_a2[j] = 0.f;
      if (i0 + j < wcount) {
        const uint32_t blk = blk0 + ((rv + j * kV3Step) >> w.bs_log2);
        if (NESTED) {
          raw_q[j] = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
          raw_a2[j] = __ldg(w.absmax2 + (blk >> w.bs2_log2));
        } else {
          raw_q[j] = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + blk));
        }
      }
    }
  };
  load_raw(0);

  // The level-pair table: thread e writes entry e (256 entries)
  if (!kWide || tid < 256)
    v3_store_level_pair(anchor_addr, tid, __ldg(w.code + (tid >> 4)), __ldg(w.code + (tid & 15)));
  if (NESTED && (!kWide || tid < 256)) code2_s[tid] = __ldg(w.code2 + tid);
  NF4_MARK(tid == 0, kTimelineTable);
  if (early_loads) gemv_wait_for_previous();  // x and xa only after it
  NF4_MARK(tid == 0 && early_loads, kTimelineWaited);
  if (tid < 16) tok_max[tid] = 0u;
  if (LORA) lora_prefetch<T>(a, lr, (int64_t)row_group * rows_cta, rows_cta);
  __syncthreads();  // tok_max zeroed

  // x[token][s0 * 64 .. (s0 + count) * 64) -> the holes, as fp16: hole step * slots + token.
  // 16-byte unit i of the range: token i / units_row, step (i % units_row) / 8, unit u = i % 8;
  // tokens < M only. With M <= 8 there are M slots per step and the lanes of absent tokens take
  // zeros instead of loading (fewer shared-memory wavefronts too: 1 instead of 4 per 16-byte x
  // load at M = 1); in the second tile of M 9..16 the slots of absent tokens keep whatever
  // shared memory held: they feed only the mma output columns of those tokens (each column is
  // its own dot product), which are never written.
  const T* x = static_cast<const T*>(a.x);
  const int units_row = count * 8;
  const int units = M * units_row;  // tokens < M only (see above)
  auto x_unit = [&](int i, int& tok, int& step, int& u) -> uint4 {
    tok = i / units_row;
    const int r = i - tok * units_row;
    step = r >> 3;
    u = r & 7;
    return *reinterpret_cast<const uint4*>(x + tok * a.x_stride + (int64_t)(s0 + step) * kV3Step +
                                           8 * u);
  };
  auto hole_unit = [&](int tok, int step, int u) -> uint32_t {
    return anchor_addr + 256u * (uint32_t)(step * slots + tok) + 128u +
           16u * (uint32_t)(u ^ (tok & 1));
  };
  // At most 256 holes (a 16-warp CTA: kV3WideHoles) x 8 units: 8 per thread, all loaded at
  // once (one L2 round trip), kept in registers between the max and the conversion.
  constexpr int kHoles = kWide ? kV3WideHoles : 256;
  constexpr int kUnitsPerThread = kHoles * 8 / (WARPS * 32);
  static_assert(kUnitsPerThread * WARPS * 32 == kHoles * 8, "x staging per thread");
  uint4 xu[kUnitsPerThread];
#pragma unroll
  for (int q = 0; q < kUnitsPerThread; ++q) {
    const int i = tid + q * WARPS * 32;
    int tok, step, u;
    xu[q] = i < units ? x_unit(i, tok, step, u) : make_uint4(0u, 0u, 0u, 0u);
  }
  if (std::is_same<T, __nv_bfloat16>::value) {
    // per token: the largest |x| (as bits: monotonic for non-negative floats, NaN largest)
#pragma unroll
    for (int q = 0; q < kUnitsPerThread; ++q) {
      const int i = tid + q * WARPS * 32;
      if (i >= units) break;
      const uint32_t m = bf16x8_max_abs_bits(xu[q]);
      if (m) atomicMax(&tok_max[i / units_row], m);
    }
    __syncthreads();
    // x * 2^shift with the token's largest |x| in [2^14, 2^15), as fp16
#pragma unroll
    for (int q = 0; q < kUnitsPerThread; ++q) {
      const int i = tid + q * WARPS * 32;
      if (i >= units) break;
      const int tok = i / units_row, r = i - tok * units_row;
      v3_store16(hole_unit(tok, r >> 3, r & 7),
                 bf16x8_scaled_to_fp16(xu[q], x_scale_shift(tok_max[tok])));
    }
  } else {
#pragma unroll
    for (int q = 0; q < kUnitsPerThread; ++q) {
      const int i = tid + q * WARPS * 32;
      if (i >= units) break;
      const int tok = i / units_row, r = i - tok * units_row;
      v3_store16(hole_unit(tok, r >> 3, r & 7), xu[q]);
    }
  }
  __syncthreads();  // table, code2, x and tok_max complete
  NF4_MARK(tid == 0, kTimelineStaged);

  V3Levels lv;  // (DECODE 1 / 2 only; dead code otherwise)
  if (DECODE != 0) {
    // level i as fp16 from the table (entry 17 i = byte (i, i), low half; this lane's copy):
    // the same rounding as the table, with no second read of w.code from global memory
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      lv.lo[r] = lv.hi[r] = 0u;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t h = *reinterpret_cast<const uint32_t*>(
                               anchor + 17u * (uint32_t)(4 * r + i) * 256u + (uint32_t)lane * 4u) &
                           0xFFFFu;
        lv.lo[r] |= (h & 0xFFu) << (8 * i);
        lv.hi[r] |= (h >> 8) << (8 * i);
      }
    }
  }

  const float offset = NESTED ? __ldg(w.offset) : 0.f;
  const uint32_t lane4 = (uint32_t)lane * 4u;
  // this lane's x: token tile mt, token g, step p0 + i, 16-byte units x_unit0 and + 1
  // (values 8 x_unit0 .. + 15 of the step, as the lane's weight values; swizzled), as offsets
  // from `anchor`; xg moves one group of 4 steps on per loop iteration
  const int x_unit0 = kLines ? ((t & 1) << 2 | (t >> 1) << 1) : 2 * t;
  uint32_t xg0 = step_bytes * (uint32_t)p0 + 256u * (uint32_t)g + 128u +
                 16u * (uint32_t)(x_unit0 ^ (g & 1));
  uint32_t xg1 = step_bytes * (uint32_t)p0 + 256u * (uint32_t)g + 128u +
                 16u * (uint32_t)((x_unit0 + 1) ^ (g & 1));

  // M <= 8: only the lanes of tokens < M load x (see the staging above)
  const bool x_lane = MT == 2 || g < M;

  // acc[pair][tl][mt]: kLines' sums of steps 0-1 (rows rho) and 2-3 (rows rho ^ 4) of each
  // group; v3's own loads use acc[0] only
  float acc2[kLines ? 2 : 1][2][MT][4];
#pragma unroll
  for (int p = 0; p < (kLines ? 2 : 1); ++p)
#pragma unroll
    for (int tl = 0; tl < 2; ++tl)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc2[p][tl][mt][c] = 0.f;
  auto& acc = acc2[0];

  // the group's row scales: this lane's (warp row `lane`) for steps i0 .. i0 + 3, then the
  // next group's raw inputs
  auto group_scales = [&](int i0, float (&sc)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      sc[j] = NESTED ? __fadd_rn(__fmul_rn(code2_s[raw_q[j]], raw_a2[j]), offset)
                     : __uint_as_float(raw_q[j]);
#ifdef FASTFT_NF4_TIMELINE
    if (lane == 0 && i0 < 4 * kTimelineIters) {  // the mark after the scales' loads landed
      asm volatile("" ::"f"(sc[0]), "f"(sc[1]), "f"(sc[2]), "f"(sc[3]));
      timeline_mark(a, kTimelineIter + (warp * kTimelineIters + i0 / 4) * 2 + 1);
    }
#endif
    rv += 4 * kV3Step;
    load_raw(i0 + 4);
  };
  // x of step j of the group: 8 words per token tile
  auto x_fragments = [&](int j, uint4 (&xv)[MT][2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint32_t off = step_bytes * j + 256u * 8 * mt;
      if (x_lane) {
        xv[mt][0] = *reinterpret_cast<const uint4*>(anchor + xg0 + off);
        xv[mt][1] = *reinterpret_cast<const uint4*>(anchor + xg1 + off);
      } else {
        xv[mt][0] = xv[mt][1] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  // one step's level pairs of a tile's rows g (ra) and g + 8 (rb)
  auto decode = [&](uint2 ra, uint2 rb, uint32_t (&pa)[8], uint32_t (&pb)[8]) {
    if (DECODE == 1) {  // registers for both rows
      v3_pairs_reg(lv, ra.x, *reinterpret_cast<uint32_t(*)[4]>(pa));
      v3_pairs_reg(lv, ra.y, *reinterpret_cast<uint32_t(*)[4]>(pa + 4));
    } else {  // the table (DECODE 2: for rows g only)
      pa[0] = v3_pair<0>(anchor, ra.x, lane4); pa[1] = v3_pair<1>(anchor, ra.x, lane4);
      pa[2] = v3_pair<2>(anchor, ra.x, lane4); pa[3] = v3_pair<3>(anchor, ra.x, lane4);
      pa[4] = v3_pair<0>(anchor, ra.y, lane4); pa[5] = v3_pair<1>(anchor, ra.y, lane4);
      pa[6] = v3_pair<2>(anchor, ra.y, lane4); pa[7] = v3_pair<3>(anchor, ra.y, lane4);
    }
    if (DECODE != 0) {  // registers for rows g + 8
      v3_pairs_reg(lv, rb.x, *reinterpret_cast<uint32_t(*)[4]>(pb));
      v3_pairs_reg(lv, rb.y, *reinterpret_cast<uint32_t(*)[4]>(pb + 4));
    } else {
      pb[0] = v3_pair<0>(anchor, rb.x, lane4); pb[1] = v3_pair<1>(anchor, rb.x, lane4);
      pb[2] = v3_pair<2>(anchor, rb.x, lane4); pb[3] = v3_pair<3>(anchor, rb.x, lane4);
      pb[4] = v3_pair<0>(anchor, rb.y, lane4); pb[5] = v3_pair<1>(anchor, rb.y, lane4);
      pb[6] = v3_pair<2>(anchor, rb.y, lane4); pb[7] = v3_pair<3>(anchor, rb.y, lane4);
    }
  };
  // the step's 4 mma per token tile, then the block scales folded into the sums
  auto mma_fold = [&](const uint32_t (&pa)[8], const uint32_t (&pb)[8], const uint4 (&xv)[MT][2],
                      float sa, float sb, float (&sums)[MT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float tmp[4] = {0.f, 0.f, 0.f, 0.f};
      mma_f16_16816(tmp, pa[0], pb[0], pa[1], pb[1], xv[mt][0].x, xv[mt][0].y);
      mma_f16_16816(tmp, pa[2], pb[2], pa[3], pb[3], xv[mt][0].z, xv[mt][0].w);
      mma_f16_16816(tmp, pa[4], pb[4], pa[5], pb[5], xv[mt][1].x, xv[mt][1].y);
      mma_f16_16816(tmp, pa[6], pb[6], pa[7], pb[7], xv[mt][1].z, xv[mt][1].w);
      sums[mt][0] = fmaf(sa, tmp[0], sums[mt][0]);
      sums[mt][1] = fmaf(sa, tmp[1], sums[mt][1]);
      sums[mt][2] = fmaf(sb, tmp[2], sums[mt][2]);
      sums[mt][3] = fmaf(sb, tmp[3], sums[mt][3]);
    }
  };

  static_assert(kV3Ahead == 4, "the loop's groups of 4 steps are the ring and the scale groups");
  for (int i0 = 0; i0 < wcount; i0 += 4) {
    NF4_MARK(lane == 0 && i0 < 4 * kTimelineIters,
             kTimelineIter + (warp * kTimelineIters + i0 / 4) * 2);
    float sc[4];
    group_scales(i0, sc);
    if constexpr (kLines) {
      // tile by tile (its x fragments read once per tile): the tile's 4 loads give each lane its
      // 16 bytes of each step pair of rows rho + 16 tl (+ 8), then are reloaded at once
#pragma unroll
      for (int tl = 0; tl < 2; ++tl) {
        // d[pair][row rr]: the pair's 16 bytes are in load q with q & 1 == pair ^ (g & 1)
        uint4 d[2][2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const uint4 e = lring[4 * tl + 2 * rr], o = lring[4 * tl + 2 * rr + 1];
          d[0][rr] = select4(odd_quad, o, e);
          d[1][rr] = select4(odd_quad, e, o);
        }
        line_loads(i0, 1, 4 * tl);  // (predicated loads, no branch: a branch here made ptxas
                                    // copy the whole ring to other registers first)
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
          if (pair == 1 && i0 + 2 >= wcount) break;  // uniform over the warp
          uint2 sd[2][2];  // [step of the pair][row rr]
#pragma unroll
          for (int rr = 0; rr < 2; ++rr)
            v3_pair_exchange(d[pair][rr], hi_lane, sd[0][rr], sd[1][rr]);
          const int src = (rho ^ (4 * pair)) + 16 * tl;  // the scale lanes of these rows
#pragma unroll
          for (int ss = 0; ss < 2; ++ss) {
            const int j = 2 * pair + ss;
            if (i0 + j >= wcount) break;
            const float sa = __shfl_sync(0xffffffffu, sc[j], src);
            const float sb = __shfl_sync(0xffffffffu, sc[j], src + 8);
            uint4 xv[MT][2];
            x_fragments(j, xv);
            uint32_t pa[8], pb[8];
            decode(sd[ss][0], sd[ss][1], pa, pb);
            mma_fold(pa, pb, xv, sa, sb, acc2[pair][tl]);
          }
        }
      }
      lp[0] += 128;
      lp[1] += 128;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (i0 + j >= wcount) break;  // uniform over the warp
        // the 4 rows' scales of this step: rows g + 8r are lanes g + 8r
        float s[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) s[r] = __shfl_sync(0xffffffffu, sc[j], g + 8 * r);
        uint4 xv[MT][2];
        x_fragments(j, xv);
#pragma unroll
        for (int tl = 0; tl < 2; ++tl) {
          uint32_t pa[8], pb[8];
          decode(ring[j].w[2 * tl], ring[j].w[2 * tl + 1], pa, pb);  // rows g, g+8 of tile tl
          if (tl == 1 && i0 + j + kV3Ahead < wcount) {
            // the slot's words are consumed (above): reload it in place (no register moves)
#pragma unroll
            for (int r = 0; r < 4; ++r)
              ring[j].w[r] = load_stream8(wp[r] + (j + kV3Ahead) * (kV3Step / 2));
          }
          mma_fold(pa, pb, xv, s[2 * tl], s[2 * tl + 1], acc[tl]);
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) wp[r] += 4 * (kV3Step / 2);
    }
    xg0 += 4u * step_bytes;
    xg1 += 4u * step_bytes;
  }
  if constexpr (kLines) {
    // pair 1's sums are of the rows of quad g ^ 1's pair 0 (lane ^ 4, same tokens)
#pragma unroll
    for (int tl = 0; tl < 2; ++tl)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          acc[tl][mt][c] += __shfl_xor_sync(0xffffffffu, acc2[1][tl][mt][c], 4);
  }
  NF4_MARK(lane == 0, kTimelineWarpLoopEnd + warp);

  if (parts > 1) {
    // the parts' sums, added in part order (deterministic) by the warps of part 0, through
    // the table's space (every warp is past its last table and x read at the first sync)
    constexpr int kVals = 2 * MT * 4;
    float* sums = reinterpret_cast<float*>(smem);  // (parts - 1) x tiles x kVals x 32 lanes
    __syncthreads();
    if (part > 0) {
      float* dst = sums + ((part - 1) * tiles + wt) * (kVals * 32) + lane;
#pragma unroll
      for (int tl = 0; tl < 2; ++tl)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c) dst[((tl * MT + mt) * 4 + c) * 32] = acc[tl][mt][c];
    }
    __syncthreads();
    if (part == 0) {
      for (int p = 1; p < parts; ++p) {
        const float* src = sums + ((p - 1) * tiles + wt) * (kVals * 32) + lane;
#pragma unroll
        for (int tl = 0; tl < 2; ++tl)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[tl][mt][c] += src[((tl * MT + mt) * 4 + c) * 32];
      }
    }
  }
  // A 16-warp CTA without a K split: the adapter's term of its 32 rows x M tokens, one output
  // per thread of the warps of parts 1.. (threads 32..: one tile), which are idle while part 0
  // adds the sums, for part 0 to add as it writes y (below). add_low_rank_tile instead has a
  // lane read-modify-write 4 rows of y one after another, a chain of L2 round trips that cost
  // about what this CTA saves by not splitting K (run 79: the decoding forward, level).
  [[maybe_unused]] float* const lora_terms =  // [M][32], past the parts' sums
      reinterpret_cast<float*>(smem) + (kV3WidePartsCTA - 1) * (2 * MT * 4) * 32;
  if constexpr (kWide && LORA) {
    if (a.partial == nullptr && part > 0) {
      const int i = tid - 32;
      if (i < M * kV3WarpRows && tile_base + i % kV3WarpRows < N)
        lora_terms[i] = lora_term<T>(lr, i / kV3WarpRows, tile_base + i % kV3WarpRows);
    }
    __syncthreads();
  }

  NF4_MARK(tid == 0, kTimelineSummed);
  // acc[tl][mt][c]: weight row tile_base + 16 tl + rho (+ 8 for c >= 2), token mt*8 + 2t + (c&1)
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
#pragma unroll
  for (int tl = 0; tl < 2; ++tl) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int m = mt * 8 + 2 * t + (c & 1);
        const int n = tile_base + 16 * tl + rho + (c < 2 ? 0 : 8);
        if (part > 0 || m >= M || n >= N) continue;  // part 0 holds the sums
        float v = acc[tl][mt][c];
        if (std::is_same<T, __nv_bfloat16>::value)  // undo the token's power of two
          v *= pow2f(-x_scale_shift(tok_max[m]));
        if (a.partial) {  // K split: the splits' sum (+ bias, + low-rank term) is written below
          a.partial[((int64_t)blockIdx.y * M + m) * N + n] = v;
        } else {
          if (bias) v += to_f32(bias[n]);
          // round(round(x Wᵀ + bias) + term): add_low_rank's roundings, without its re-read
          if constexpr (kWide && LORA)
            v = to_f32(from_f32<T>(v)) + lora_terms[m * kV3WarpRows + (n - tile_base)];
          y[m * a.y_stride + n] = from_f32<T>(v);
        }
      }
    }
  }
  NF4_MARK(tid == 0, kTimelineEnd);
  NF4_MARK(tid == 0, kTimelineEndNs);
  if (a.partial == nullptr) {
    if (LORA && !kWide && part == 0) add_low_rank_tile<T>(a, lr, y, tile_base + rho, 2, t, MT);
    return;
  }
  // The last of the row group's gridDim.y CTAs to finish adds the partials in split order
  // (deterministic).
  __threadfence();  // this CTA's partials visible device-wide before it is counted
  __syncthreads();
  if (tid == 0) *last = arrive_is_last(a.counters + row_group, a.counter_tag, gridDim.y);
  __syncthreads();
  if (!*last) return;
  __threadfence();
  if (tid < rows_cta)
    v3_sum_splits<T, LORA>(lr, a.partial, row_group * rows_cta + tid, M, N, (int)gridDim.y, bias,
                     y, a.y_stride);
#endif
}

// ---- host helpers of the launchers
// The opt-in to more than 48 KB of dynamic shared memory: once per kernel and device.
template <auto Kernel>
void allow_dynamic_smem(int bytes) {
  int device = 0;
  cudaGetDevice(&device);
  static bool raised[256] = {};
  if (device >= 0 && device < 256 && !raised[device]) {
    cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    raised[device] = true;
  }
}

}  // namespace
}  // namespace fastft
