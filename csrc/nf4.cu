// NF4 (bitsandbytes layout) dequantisation, bit-exact with bitsandbytes, and the fused
// small-M NF4 matmul that reads the packed weight directly.
//
// Bit-exactness: every value is lut[code] * scale as ONE float32 multiply rounded to nearest
// (__fmul_rn, never contracted with anything), converted with round-to-nearest-even; nested
// scales are __fadd_rn(__fmul_rn(code2[q], absmax2[b >> bs2_log2]), offset), the order
// bitsandbytes computes them in (multiply, round, add, round).
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "nf4.h"

namespace fastft {
namespace {

// `offset` is w.offset[0] when nested (callers load it once).
__device__ __forceinline__ float block_scale(const NF4Weight& w, int64_t blk, float offset) {
  if (w.nested) {
    const int q = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
    const float scaled = __fmul_rn(__ldg(w.code2 + q), __ldg(w.absmax2 + (blk >> w.bs2_log2)));
    return __fadd_rn(scaled, offset);
  }
  return __ldg(static_cast<const float*>(w.absmax) + blk);
}

__device__ __forceinline__ float nested_offset(const NF4Weight& w) {
  return w.nested ? __ldg(w.offset) : 0.f;
}

// The 16 levels in shared memory: per-thread lookups with a dynamic index.
__device__ __forceinline__ void load_levels(const float* code, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(code + threadIdx.x);
  __syncthreads();
}

// ------------------------------------------------------------------ dequantisation

constexpr int kThreads = 256;
constexpr int kUnits = 4;  // 4-byte units (8 values) per thread, kThreads apart: coalesced

// 8 values as 16-byte stores (one for 16-bit types, two for float32).
template <typename T>
__device__ __forceinline__ void store8(T* p, const float* v) {
  constexpr int N = 16 / sizeof(T);
#pragma unroll
  for (int h = 0; h < 8; h += N) {
    Vec<T, N> raw;
#pragma unroll
    for (int i = 0; i < N; ++i) raw.v[i] = from_f32<T>(v[h + i]);
    *reinterpret_cast<Vec<T, N>*>(p + h) = raw;
  }
}

// Values [0, units * 8): packed 4-byte aligned, out 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_dequant_vec(const NF4Weight w, int64_t units,
                                                            T* __restrict__ out) {
  __shared__ float lut[16];
  load_levels(w.code, lut);
  const float offset = nested_offset(w);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  const int64_t first = (int64_t)blockIdx.x * (kThreads * kUnits) + threadIdx.x;
  uint32_t word[kUnits];
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {  // all loads first: kUnits in flight per thread
    const int64_t i = first + (int64_t)u * kThreads;
    word[u] = i < units ? __ldg(words + i) : 0u;
  }
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const int64_t i = first + (int64_t)u * kThreads;
    if (i >= units) break;
    const float scale = block_scale(w, (i * 8) >> w.bs_log2, offset);  // 8 values, one block
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t byte = (word[u] >> (8 * j)) & 0xFFu;
      v[2 * j] = __fmul_rn(lut[byte >> 4], scale);  // even index: high nibble
      v[2 * j + 1] = __fmul_rn(lut[byte & 15u], scale);
    }
    store8(out + i * 8, v);
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
  if (r.va) {
    in.wa = load_stream16(r.pa + off);
    const int64_t blk = (r.blk_a + dv) >> w.bs_log2;
    if (w.nested) {
      in.qa = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
      in.a2a = __ldg(w.absmax2 + (blk >> w.bs2_log2));
    } else {
      in.qa = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + blk));
    }
  }
  if (r.vb) {
    in.wb = load_stream16(r.pb + off);
    const int64_t blk = (r.blk_b + dv) >> w.bs_log2;
    if (w.nested) {
      in.qb = __ldg(static_cast<const uint8_t*>(w.absmax) + blk);
      in.a2b = __ldg(w.absmax2 + (blk >> w.bs2_log2));
    } else {
      in.qb = __float_as_uint(__ldg(static_cast<const float*>(w.absmax) + blk));
    }
  }
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

// MT: token tiles of 8 rows of x (1 for M <= 8, 2 for M <= 16). Dynamic shared memory:
// level pairs (kLevelBytes) | code2 (kCode2Bytes) | xs [MT * 8][xs_stride] of T.
template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
    nf4_gemv_kernel(const NF4Weight w, const NF4GemvArgs a, int per_split, int xs_stride) {
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

  // Weight bytes first, so their latency overlaps the table and x staging below.
  ChunkIn ring[kAhead];
#pragma unroll
  for (int i = 0; i < kAhead; ++i) ring[i] = load_chunk_in(w, r, i, nch, K);

  // pairs[e * 16 + copy] = (code[e >> 4], code[e & 15]) for every byte value e; consecutive
  // threads write consecutive 8-byte entries
  for (int i = threadIdx.x; i < 256 * kPairCopies; i += kGemvWarps * 32) {
    const int e = i / kPairCopies;
    pairs[i] = make_float2(__ldg(w.code + (e >> 4)), __ldg(w.code + (e & 15)));
  }
  if (w.nested) code2_s[threadIdx.x] = __ldg(w.code2 + threadIdx.x);  // 256 threads
  {
    // x[token][k0 + kk] for kk < nch * 128 in 16-byte units, copied asynchronously (all in
    // flight at once, no registers); units outside M and K are zero-filled (source size 0)
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
      if (a.partial) {  // split K: the splits' sum (+ bias) is written below
        a.partial[((int64_t)blockIdx.y * a.M + m) * a.N + n] = v;
      } else {
        if (bias) v += to_f32(bias[n]);
        y[m * a.y_stride + n] = from_f32<T>(v);
      }
    }
  }
  if (a.partial == nullptr) return;
  // Split K in one kernel: the last of the row block's `split` blocks to finish adds the
  // partials in split order (deterministic). The counters are zeroed by the caller for this
  // launch alone (see NF4GemvArgs), so no state carries from one call to the next.
  __shared__ bool last;
  __threadfence();  // this block's partials visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counters + blockIdx.x, 1u) == (unsigned)(a.split - 1);
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
  }
#endif
}

}  // namespace

void nf4_dequantize(const NF4Weight& w, int64_t numel, void* out, int out_dtype,
                    cudaStream_t stream) {
  if (numel <= 0) return;
  dispatch_float(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
    const bool aligned = reinterpret_cast<uintptr_t>(w.packed) % 4 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
    int64_t start = 0;
    if (aligned) {
      const int64_t units = numel / 8;
      if (units > 0) {
        const int64_t per_block = kThreads * kUnits;
        const int64_t blocks = (units + per_block - 1) / per_block;
        nf4_dequant_vec<T><<<(unsigned)blocks, kThreads, 0, stream>>>(w, units, o);
      }
      start = units * 8;
    }
    if (start < numel) {
      const int64_t blocks = std::min<int64_t>((numel - start + kThreads - 1) / kThreads, 8192);
      nf4_dequant_scalar<T><<<(unsigned)blocks, kThreads, 0, stream>>>(w, start, numel, o);
    }
  });
}

void nf4_gemv_plan(NF4GemvArgs& a, int sms) {
  const int tokens = a.M <= 8 ? 8 : 16;
  const int chunks = (a.K + kChunk - 1) / kChunk;
  // x staging (tokens x (per_split * 128 + 16) values) must fit kMaxXBytes
  const int max_per = (kMaxXBytes / (tokens * 2) - 16) / kChunk;
  const int64_t row_blocks = (a.N + kBlockRows - 1) / kBlockRows;
  const int64_t resident = 2 * (int64_t)std::max(1, sms);  // __launch_bounds__(256, 2)
  // Cost model: waves of resident blocks x (chunks per block + ~3 chunks of block start-up);
  // the fewest splits among the cheapest (fewer float32 partials to add).
  int best_per = std::min(chunks, max_per), best_split = 0;
  int64_t best_cost = INT64_MAX;
  for (int s = (chunks + max_per - 1) / max_per; s <= chunks; ++s) {
    const int per = (chunks + s - 1) / s;
    const int s_eff = (chunks + per - 1) / per;
    if (s_eff == best_split) continue;
    const int64_t waves = (row_blocks * s_eff + resident - 1) / resident;
    const int64_t cost = waves * (per + 3);
    if (cost < best_cost) {
      best_cost = cost;
      best_per = per;
      best_split = s_eff;
    }
  }
  a.per_split = std::max(1, best_per);
  a.split = std::max(1, best_split);
}

namespace {
template <typename T, int MT>
void launch_gemv(const NF4Weight& w, const NF4GemvArgs& a, cudaStream_t stream) {
  constexpr int kMaxSmem = kLevelBytes + kCode2Bytes + kMaxXBytes;
  int device = 0;
  cudaGetDevice(&device);
  static bool raised[256] = {};  // the opt-in to > 48 KB of shared memory, per device
  if (device >= 0 && device < 256 && !raised[device]) {
    cudaFuncSetAttribute(nf4_gemv_kernel<T, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         kMaxSmem);
    raised[device] = true;
  }
  const int xs_stride = a.per_split * kChunk + 16;  // 32 bytes mod 128: see the layout note
  const size_t smem = kLevelBytes + kCode2Bytes + (size_t)MT * 8 * xs_stride * sizeof(T);
  const dim3 grid((unsigned)((a.N + kBlockRows - 1) / kBlockRows), (unsigned)a.split);
  nf4_gemv_kernel<T, MT><<<grid, kGemvWarps * 32, smem, stream>>>(w, a, a.per_split, xs_stride);
}
}  // namespace

void nf4_gemv(const NF4Weight& w, const NF4GemvArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0) return;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    if (a.M <= 8) launch_gemv<T, 1>(w, a, stream);
    else launch_gemv<T, 2>(w, a, stream);
  };
  if (a.dtype == kBF16) launch(__nv_bfloat16{});
  else launch(__half{});
}

}  // namespace fastft
