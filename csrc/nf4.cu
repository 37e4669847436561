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
// One block: 16 weight rows (n) x all of K (or, when there are fewer row tiles than SMs, one of
// `split` K ranges, whose float32 results nf4_gemv_reduce adds); kGemvWarps warps split the
// block's K into 128-value chunks and their partial sums meet in shared memory (deterministic). Per chunk a warp runs
// mma.m16n8k16 steps with A = a 16x16 tile of NF4 levels (not yet scaled) and B = x^T (8 rows
// of x per m-tile); each 64-value half of a chunk lies inside one quantisation block
// (blocksize >= 64), so its scale is applied to the half's fp32 partial sums after the mma:
// no per-value multiply. Levels come from a shared table indexed by a whole packed byte
// (two levels as one bf16x2 / half2 word), stored once per lane so lookups never conflict.
//
// Thread (g = lane/4, t = lane%4) loads 8 packed bytes of each half (values kh .. kh + 15,
// kh = chunk*128 + 64*half + 16t) of rows g and g+8. For k-step s (0..3) of a half it feeds
// byte 2s (fragment slots 2t, 2t+1) and byte 2s+1 (slots 2t+8, 2t+9): the k order inside a
// step is permuted, harmless for a dot product since x's fragment uses the same order:
// x[m][kh + 4s .. kh + 4s + 3].
//
// Numerics: weights enter the product as level (rounded to x's dtype) * fp32 scale, not as the
// dequantised value rounded to x's dtype; within rounding of the dtype, not bit-identical to
// nf4_dequantize + matmul.
constexpr int kGemvWarps = 8;
constexpr int kRowsPerBlock = 16;
constexpr int kChunk = 128;
constexpr int kAhead = 4;  // chunks of packed weight in flight per warp

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the binding refuses devices below compute capability 8.0
#endif
}

// Read-once data (the packed weight): don't let it evict what L1 holds (x, scales).
__device__ __forceinline__ uint2 load_stream8(const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
#else
  return __ldg(static_cast<const uint2*>(p));
#endif
}

// This thread's packed bytes of one chunk: rows ra / rb, halves 0 / 1.
struct ChunkBytes {
  uint2 a[2], b[2];
};

__device__ __forceinline__ ChunkBytes load_chunk(const uint8_t* pa, const uint8_t* pb, int c,
                                                 int chunks, bool va, bool vb) {
  ChunkBytes r;
  const uint2 zero = make_uint2(0u, 0u);
  const int64_t off = (int64_t)c * (kChunk / 2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r.a[h] = (c < chunks && va) ? load_stream8(pa + off + 32 * h) : zero;
    r.b[h] = (c < chunks && vb) ? load_stream8(pb + off + 32 * h) : zero;
  }
  return r;
}

// One 64-value half: partial sums of its 4 k-steps, then scaled into acc.
template <typename T, int MT>
__device__ __forceinline__ void gemv_half(const NF4GemvArgs& a, const T* x,
                                          const uint32_t* lut_lane, uint2 wa, uint2 wb,
                                          int64_t kh, float sa, float sb, int g,
                                          float (&acc)[MT][4]) {
  uint32_t xw[MT][8];  // x[mt * 8 + g][kh .. kh + 15] as 8 words of two values
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = mt * 8 + g;
    if (m < a.M) {
      const uint4* px = reinterpret_cast<const uint4*>(x + m * a.x_stride + kh);
      const uint4 v0 = __ldg(px), v1 = __ldg(px + 1);
      xw[mt][0] = v0.x; xw[mt][1] = v0.y; xw[mt][2] = v0.z; xw[mt][3] = v0.w;
      xw[mt][4] = v1.x; xw[mt][5] = v1.y; xw[mt][6] = v1.z; xw[mt][7] = v1.w;
    } else {
#pragma unroll
      for (int q = 0; q < 8; ++q) xw[mt][q] = 0u;
    }
  }
  float part[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) part[mt][i] = 0.f;
  const uint32_t ra_words[2] = {wa.x, wa.y}, rb_words[2] = {wb.x, wb.y};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int shift = 16 * (s & 1);  // bytes 2s and 2s + 1 of the 8
    const uint32_t a_lo = (ra_words[s >> 1] >> shift) & 0xFFu;
    const uint32_t a_hi = (ra_words[s >> 1] >> (shift + 8)) & 0xFFu;
    const uint32_t b_lo = (rb_words[s >> 1] >> shift) & 0xFFu;
    const uint32_t b_hi = (rb_words[s >> 1] >> (shift + 8)) & 0xFFu;
    // A fragment: {row g, slots 2t..}, {row g+8, 2t..}, {row g, 2t+8..}, {row g+8, 2t+8..}
    const uint32_t frag[4] = {lut_lane[a_lo * 32], lut_lane[b_lo * 32], lut_lane[a_hi * 32],
                              lut_lane[b_hi * 32]};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mma_16816<T>(part[mt], frag, xw[mt][2 * s], xw[mt][2 * s + 1]);
  }
  // part[mt][0], [1]: weight row g (scale sa); [2], [3]: row g + 8 (scale sb)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    acc[mt][0] += sa * part[mt][0];
    acc[mt][1] += sa * part[mt][1];
    acc[mt][2] += sb * part[mt][2];
    acc[mt][3] += sb * part[mt][3];
  }
}

// MT: m-tiles of 8 rows of x (1 for M <= 8, 2 for M <= 16).
template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32) nf4_gemv_kernel(const NF4Weight w,
                                                                   const NF4GemvArgs a) {
  // byte -> the two levels of its nibbles as a T pair (high nibble = lower k in the low half),
  // one copy per lane: lut[byte * 32 + lane]
  __shared__ uint32_t lut[256 * 32];
  __shared__ float red[kGemvWarps][MT * 8][kRowsPerBlock];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int K = a.K;
  const int64_t n0 = (int64_t)blockIdx.x * kRowsPerBlock;  // this block's first weight row
  const int64_t ra = n0 + g, rb = n0 + g + 8;
  const bool va = ra < a.N, vb = rb < a.N;
  const uint8_t* pa = w.packed + ra * (K / 2) + t * 8;
  const uint8_t* pb = w.packed + rb * (K / 2) + t * 8;
  const T* x = static_cast<const T*>(a.x);
  // this block's chunks: split blockIdx.y of a.split equal K ranges (possibly empty)
  const int total_chunks = K / kChunk;
  const int per_split = (total_chunks + a.split - 1) / a.split;
  const int first = blockIdx.y * per_split;
  const int chunks = min(total_chunks, first + per_split);  // end of this block's range

  // kAhead chunks of packed bytes in flight per warp (a register ring, hence the unrolled
  // inner loop), issued before the table is built so the two overlap.
  ChunkBytes ring[kAhead];
#pragma unroll
  for (int i = 0; i < kAhead; ++i) ring[i] = load_chunk(pa, pb, first + warp + i * kGemvWarps,
                                                        chunks, va, vb);
  {
    // warp fills bytes warp + 8i (i = 0..31), whose high nibble is i / 2 and low nibble
    // warp + 8 (i % 2): every level index is a compile-time constant or one of two values.
    static_assert(kGemvWarps == 8, "the table fill below assumes 8 warps");
    float levels[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) levels[j] = __ldg(w.code + j);
    const float low[2] = {__ldg(w.code + warp), __ldg(w.code + warp + 8)};
#pragma unroll
    for (int i = 0; i < 32; ++i) lut[(warp + 8 * i) * 32 + lane] = pack2<T>(levels[i >> 1], low[i & 1]);
  }
  __syncthreads();
  const float offset = nested_offset(w);
  const uint32_t* lut_lane = lut + lane;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;

  for (int c0 = first + warp; c0 < chunks; c0 += kAhead * kGemvWarps) {
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int c = c0 + i * kGemvWarps;
      if (c >= chunks) break;
      const ChunkBytes cur = ring[i];
      ring[i] = load_chunk(pa, pb, c + kAhead * kGemvWarps, chunks, va, vb);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t k_half = (int64_t)c * kChunk + 64 * h;  // one block holds all 64
        const float sa = va ? block_scale(w, (ra * K + k_half) >> w.bs_log2, offset) : 0.f;
        const float sb = vb ? block_scale(w, (rb * K + k_half) >> w.bs_log2, offset) : 0.f;
        gemv_half<T, MT>(a, x, lut_lane, cur.a[h], cur.b[h], k_half + 16 * t, sa, sb, g, acc);
      }
    }
  }
  // acc[mt][0], [1]: weight row g, x rows mt*8 + 2t, + 1; acc[mt][2], [3]: weight row g + 8
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    red[warp][mt * 8 + 2 * t][g] = acc[mt][0];
    red[warp][mt * 8 + 2 * t + 1][g] = acc[mt][1];
    red[warp][mt * 8 + 2 * t][g + 8] = acc[mt][2];
    red[warp][mt * 8 + 2 * t + 1][g + 8] = acc[mt][3];
  }
  __syncthreads();
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  for (int idx = threadIdx.x; idx < MT * 8 * kRowsPerBlock; idx += blockDim.x) {
    const int m = idx / kRowsPerBlock, nl = idx % kRowsPerBlock;
    const int64_t n = n0 + nl;
    if (m < a.M && n < a.N) {
      float sum = 0.f;
#pragma unroll
      for (int wp = 0; wp < kGemvWarps; ++wp) sum += red[wp][m][nl];
      if (a.partial) {  // split K: nf4_gemv_reduce adds the splits and the bias
        a.partial[((int64_t)blockIdx.y * a.M + m) * a.N + n] = sum;
      } else {
        if (bias) sum += to_f32(bias[n]);
        y[m * a.y_stride + n] = from_f32<T>(sum);
      }
    }
  }
}

// y = sum of the split-K partials [split, M, N] (+ bias), in a fixed order: deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads) nf4_gemv_reduce(const NF4GemvArgs a) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t mn = (int64_t)a.M * a.N;
  if (i >= mn) return;
  const int64_t m = i / a.N, n = i % a.N;
  float sum = 0.f;
  for (int s = 0; s < a.split; ++s) sum += a.partial[s * mn + i];
  if (a.bias) sum += to_f32(static_cast<const T*>(a.bias)[n]);
  static_cast<T*>(a.y)[m * a.y_stride + n] = from_f32<T>(sum);
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

int nf4_gemv_splits(int64_t N, int64_t K, int sms) {
  const int64_t tiles = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  if (tiles >= sms) return 1;  // at least a block per SM already
  const int64_t chunks = K / kChunk;
  const int64_t most = std::max<int64_t>(1, chunks / kGemvWarps);  // a chunk per warp at least
  const int64_t want = (2 * sms + tiles - 1) / tiles;                // about two blocks per SM
  return (int)std::max<int64_t>(1, std::min(want, most));
}

void nf4_gemv(const NF4Weight& w, const NF4GemvArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0) return;
  const dim3 grid((unsigned)((a.N + kRowsPerBlock - 1) / kRowsPerBlock), (unsigned)a.split);
  const int threads = kGemvWarps * 32;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    if (a.M <= 8) nf4_gemv_kernel<T, 1><<<grid, threads, 0, stream>>>(w, a);
    else nf4_gemv_kernel<T, 2><<<grid, threads, 0, stream>>>(w, a);
    if (a.partial) {
      const int64_t mn = (int64_t)a.M * a.N;
      nf4_gemv_reduce<T><<<(unsigned)((mn + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
    }
  };
  if (a.dtype == kBF16) launch(__nv_bfloat16{});
  else launch(__half{});
}

}  // namespace fastft
