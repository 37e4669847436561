// RoPE of q and k in one launch, forward and backward (see rope.h for the math).
//
// A block holds several tokens; a token gets `col_lanes * head_slots` threads. A thread owns
// one column vector of the rotated half-rows: it loads that column's cos/sin once (they are
// shared by every head of the token) and walks heads head_slot, head_slot + head_slots, ...,
// kHeadUnroll heads at a time with all their 16-byte loads issued before any math, so q and k
// are read and written once each with several loads in flight per thread. Layouts (strided
// heads), GQA (hq != hk), per-token positions (cos/sin rows), in place or not and partial rotary
// are all handled by the strides; heads whose layout does not allow 16-byte vectors take the
// same kernel with 1-element vectors.
#include <type_traits>

#include "common.cuh"
#include "rope.h"

namespace fastft {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kHeadUnroll = 3;  // 96 registers, 3 blocks a SM; 4 needs 114 (2 blocks), no more in flight

// N elements of T kept as 32-bit words: a 16-byte load lands in four registers and nothing
// touches them until the math widens an element. (With Vec<bf16, 8> ptxas unpacks each element
// into its own register right after the load, which waits for the load there and serializes
// the loads that follow.) Sizes that are not whole words (1-element 16-bit) stay Vec.
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  uint32_t w[sizeof(T) * N / 4];
  __device__ __forceinline__ float f(int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[i]);
    } else {
      const uint32_t x = w[i / 2];
      const uint32_t h = (i & 1) ? (x >> 16) : (x & 0xffffu);
      if constexpr (std::is_same<T, __nv_bfloat16>::value) return __uint_as_float(h << 16);
      else return __half2float(__ushort_as_half((unsigned short)h));
    }
  }
};

template <typename T, int N>
using Raw = typename std::conditional<(sizeof(T) * N) % 4 == 0, Packed<T, N>, Vec<T, N>>::type;

template <typename T, int N>
__device__ __forceinline__ float elem(const Packed<T, N>& r, int i) { return r.f(i); }
template <typename T, int N>
__device__ __forceinline__ float elem(const Vec<T, N>& r, int i) { return to_f32(r.v[i]); }

template <typename T, int N>
__device__ __forceinline__ Raw<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Raw<T, N>*>(p);
}

template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(kMaxThreads, 2)
rope_kernel(const RopeArgs a, int col_lanes, int head_slots, int tokens_per_block) {
  const int lanes = col_lanes * head_slots;
  const int local = threadIdx.x / lanes;
  const int lane = threadIdx.x - local * lanes;
  const int64_t token = (int64_t)blockIdx.x * tokens_per_block + local;
  if (local >= tokens_per_block || token >= a.batch * a.seq) return;  // no barriers below
  const int64_t b = token / a.seq, s = token - b * a.seq;
  const int half = a.rot / 2;
  const int nv = half / VEC;  // vectors per half-row
  const int heads = a.hq + a.hk;
  const int col_lane = lane % col_lanes, head_slot = lane / col_lanes;
  const T* cp = static_cast<const T*>(a.cos) + b * a.c_sb + s * a.c_ss;
  const T* sp = static_cast<const T*>(a.sin) + b * a.s_sb + s * a.s_ss;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + s * a.q_ss;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + s * a.k_ss;
  T* qo = static_cast<T*>(a.q_out) + b * a.qo_sb + s * a.qo_ss;
  T* ko = static_cast<T*>(a.k_out) + b * a.ko_sb + s * a.ko_ss;
#pragma unroll 1
  for (int v = col_lane; v < nv; v += col_lanes) {
    const int c = v * VEC;
#pragma unroll 1  // the j loops already put kHeadUnroll heads in flight
    for (int h0 = head_slot; h0 < heads; h0 += head_slots * kHeadUnroll) {
      Raw<T, VEC> x1[kHeadUnroll], x2[kHeadUnroll];
#pragma unroll
      for (int j = 0; j < kHeadUnroll; ++j) {
        // past the last head: re-load the last one (not stored) rather than branch, so no
        // join forces ptxas to unpack the words before the other loads are issued
        const int h = min(h0 + j * head_slots, heads - 1);
        const T* x = h < a.hq ? q + h * a.q_sh : k + (h - a.hq) * a.k_sh;
        x1[j] = load_raw<T, VEC>(x + c);
        x2[j] = load_raw<T, VEC>(x + half + c);
      }
      // cos/sin after the head loads (from L1 after the first group): loaded once before the
      // loop, their unpacking waited for them before any head load was issued
      const Raw<T, VEC> c1 = load_raw<T, VEC>(cp + c), c2 = load_raw<T, VEC>(cp + half + c);
      const Raw<T, VEC> s1 = load_raw<T, VEC>(sp + c), s2 = load_raw<T, VEC>(sp + half + c);
#pragma unroll
      for (int j = 0; j < kHeadUnroll; ++j) {
        const int h = h0 + j * head_slots;
        if (h >= heads) continue;
        T* y = h < a.hq ? qo + h * a.qo_sh : ko + (h - a.hq) * a.ko_sh;
        float y1[VEC], y2[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float u1 = elem(x1[j], i), u2 = elem(x2[j], i);
          const float cos1 = elem(c1, i), cos2 = elem(c2, i);
          const float sin1 = elem(s1, i), sin2 = elem(s2, i);
          if (BWD) {
            y1[i] = u1 * cos1 + u2 * sin2;
            y2[i] = u2 * cos2 - u1 * sin1;
          } else {
            y1[i] = u1 * cos1 - u2 * sin1;
            y2[i] = u2 * cos2 + u1 * sin2;
          }
        }
        store_f32<T, VEC>(y + c, y1);
        store_f32<T, VEC>(y + half + c, y2);
      }
    }
  }
  // Out of place with partial rotary: the pass-through dims are copied as they are.
  const int tail = a.head_dim - a.rot;
  if (tail > 0 && (a.copy_tail_q || a.copy_tail_k)) {
    const int tail_items = heads * tail;
    for (int it = lane; it < tail_items; it += lanes) {
      const int head = it / tail;
      const int c = a.rot + (it - head * tail);
      if (head < a.hq) {
        if (a.copy_tail_q) qo[head * a.qo_sh + c] = q[head * a.q_sh + c];
      } else if (a.copy_tail_k) {
        const int h = head - a.hq;
        ko[h * a.ko_sh + c] = k[h * a.k_sh + c];
      }
    }
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

struct Shape { int col_lanes, head_slots, tokens_per_block; };

// col_lanes threads share a token's columns (up to a warp), head_slots split its heads so that
// each thread has about kHeadUnroll of them (all in flight at once), and the block takes as
// many whole tokens as fit in kMaxThreads.
Shape shape_for(const RopeArgs& a, int vec) {
  const int nv = a.rot / 2 / vec;
  const int col_lanes = nv < 1 ? 1 : (nv < 32 ? nv : 32);
  const int heads = a.hq + a.hk;
  int head_slots = (heads + kHeadUnroll - 1) / kHeadUnroll;
  const int max_slots = kMaxThreads / col_lanes;
  head_slots = head_slots < 1 ? 1 : (head_slots > max_slots ? max_slots : head_slots);
  return {col_lanes, head_slots, kMaxThreads / (col_lanes * head_slots)};
}

template <typename T, int VEC>
void launch(const RopeArgs& a, cudaStream_t s) {
  const Shape sh = shape_for(a, VEC);
  const int64_t tokens = a.batch * a.seq;
  const unsigned grid = (unsigned)((tokens + sh.tokens_per_block - 1) / sh.tokens_per_block);
  const int threads = sh.col_lanes * sh.head_slots * sh.tokens_per_block;
  if (a.backward)
    rope_kernel<T, VEC, true><<<grid, threads, 0, s>>>(a, sh.col_lanes, sh.head_slots, sh.tokens_per_block);
  else
    rope_kernel<T, VEC, false><<<grid, threads, 0, s>>>(a, sh.col_lanes, sh.head_slots, sh.tokens_per_block);
}

template <typename T>
void apply_typed(const RopeArgs& a, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  const int half = a.rot / 2;
  const int64_t strides[] = {a.q_sb, a.q_ss, a.q_sh, a.k_sb, a.k_ss, a.k_sh,
                             a.qo_sb, a.qo_ss, a.qo_sh, a.ko_sb, a.ko_ss, a.ko_sh,
                             a.c_sb, a.c_ss, a.s_sb, a.s_ss};
  bool vec = half % VEC == 0;
  for (int64_t st : strides) vec = vec && st % VEC == 0;
  const void* ptrs[] = {a.q, a.k, a.q_out, a.k_out, a.cos, a.sin};
  for (const void* p : ptrs) vec = vec && aligned(p, 16);
  if (vec) launch<T, VEC>(a, s);
  else launch<T, 1>(a, s);
}

}  // namespace

void rope_apply(const RopeArgs& a, cudaStream_t s) {
  if (a.batch * a.seq == 0) return;
  dispatch_float(a.dtype, [&](auto t) { apply_typed<decltype(t)>(a, s); });
}

}  // namespace fastft
