// RoPE of q and k in one launch, forward and backward (see rope.h for the math).
//
// A block holds several tokens of one batch row (blockIdx.y); a token gets
// `col_lanes * head_slots` threads (threadIdx.x, threadIdx.y; threadIdx.z is the token). A
// thread owns one column vector of the rotated half-rows: it loads that column's cos/sin (they
// are shared by every head of the token) and walks heads head_slot, head_slot + head_slots, ...,
// kHeadUnroll heads at a time with all their 16-byte loads issued before any math, so q and k
// are read and written once each with several loads in flight per thread. Layouts (strided
// heads), GQA (hq != hk), per-token positions (cos/sin rows), in place or not and partial rotary
// are all handled by the strides; heads whose layout does not allow 16-byte vectors take the
// same kernel with 1-element vectors.
#include <algorithm>

#include "common.cuh"
#include "rope.h"

namespace fastft {
namespace {

// A token's loads are all in flight together, so what limits bytes in flight is registers:
// 4 heads a thread (8 head loads + 4 cos/sin loads, 48 data registers) under <= 85 registers
// (ptxas takes 77-79 on sm_80/sm_90, no spills) keeps 10 tokens (100 KB of q/k) in flight a
// SM for Llama's 32 + 8 heads; 3 heads at <= 64 registers reached 8, 5 heads spill at 80.
constexpr int kMaxThreads = 256;
constexpr int kMinBlocks = 3;
constexpr int kHeadUnroll = 4;
constexpr int kRegsPerThread = 80;  // what ptxas allocates under these bounds (-Xptxas -v)

// blockDim = (col_lanes, head_slots, tokens): threadIdx.x is the thread's first column vector,
// threadIdx.y its first head, threadIdx.z its token among the block's; blockIdx.y is the batch
// row. No integer division on the way to the first load.
template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
rope_kernel(const RopeArgs a) {
  const int64_t s = (int64_t)blockIdx.x * blockDim.z + threadIdx.z;
  if (s >= a.seq) return;  // no barriers below
  const int64_t b = blockIdx.y;
  const int half = a.rot / 2;
  const int nv = half / VEC;  // vectors per half-row
  const int heads = a.hq + a.hk;
  const int col_lanes = blockDim.x, head_slots = blockDim.y;
  const T* cp = static_cast<const T*>(a.cos) + b * a.c_sb + s * a.c_ss;
  const T* sp = static_cast<const T*>(a.sin) + b * a.s_sb + s * a.s_ss;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + s * a.q_ss;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + s * a.k_ss;
  T* qo = static_cast<T*>(a.q_out) + b * a.qo_sb + s * a.qo_ss;
  T* ko = static_cast<T*>(a.k_out) + b * a.ko_sb + s * a.ko_ss;
#pragma unroll 1
  for (int v = threadIdx.x; v < nv; v += col_lanes) {
    const int c = v * VEC;
#pragma unroll 1  // the j loops already put kHeadUnroll heads in flight
    for (int h0 = threadIdx.y; h0 < heads; h0 += head_slots * kHeadUnroll) {
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
      // cos/sin after the head loads (L1 hits for all but the token's first threads), so
      // their unpacking does not hold back the head loads
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
  // Out of place with partial rotary: the pass-through dims are copied as they are (rare
  // path; the division here is off the rotary path).
  const int tail = a.head_dim - a.rot;
  if (tail > 0 && (a.copy_tail_q || a.copy_tail_k)) {
    const int lanes = col_lanes * head_slots;
    const int tail_items = heads * tail;
    for (int it = threadIdx.y * col_lanes + threadIdx.x; it < tail_items; it += lanes) {
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

// Blocks of `threads` threads resident on one SM at kRegsPerThread registers (sm_80/sm_90:
// 65536 registers, 2048 threads, 32 blocks; registers and threads are allocated per warp).
int resident_blocks(int threads) {
  const int warp_threads = (threads + 31) / 32 * 32;
  const int by_regs = 65536 / (warp_threads * kRegsPerThread);
  const int by_threads = 2048 / warp_threads;
  return std::min(std::min(by_regs, by_threads), 32);
}

// col_lanes threads share a token's columns (up to a warp), head_slots split its heads so that
// each thread has about kHeadUnroll of them (all in flight at once), and the block takes the
// number of whole tokens (<= 64: blockDim.z's limit) that keeps the most tokens resident on a
// SM, the fewest on ties (finer-grained blocks even out the last wave).
Shape shape_for(const RopeArgs& a, int vec) {
  const int nv = a.rot / 2 / vec;
  const int col_lanes = nv < 1 ? 1 : (nv < 32 ? nv : 32);
  const int heads = a.hq + a.hk;
  int head_slots = (heads + kHeadUnroll - 1) / kHeadUnroll;
  const int max_slots = kMaxThreads / col_lanes;
  head_slots = head_slots < 1 ? 1 : (head_slots > max_slots ? max_slots : head_slots);
  const int lanes = col_lanes * head_slots;
  int tokens = 1, resident = 0;
  for (int t = 1; t <= std::min(64, kMaxThreads / lanes); ++t) {
    const int r = resident_blocks(lanes * t) * t;
    if (r > resident) tokens = t, resident = r;
  }
  return {col_lanes, head_slots, tokens};
}

template <typename T, int VEC>
void launch(const RopeArgs& a, cudaStream_t s) {
  const Shape sh = shape_for(a, VEC);
  const dim3 block(sh.col_lanes, sh.head_slots, sh.tokens_per_block);
  const unsigned seq_blocks = (unsigned)((a.seq + sh.tokens_per_block - 1) / sh.tokens_per_block);
  // batch rows on grid.y (at most 65535 a launch): more rows go in further launches whose
  // pointers start at their first row
  constexpr int64_t kMaxRows = 65535;
  for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxRows) {
    RopeArgs c = a;
    c.batch = a.batch - b0 < kMaxRows ? a.batch - b0 : kMaxRows;
    c.q = static_cast<const T*>(a.q) + b0 * a.q_sb;
    c.k = static_cast<const T*>(a.k) + b0 * a.k_sb;
    c.q_out = static_cast<T*>(a.q_out) + b0 * a.qo_sb;
    c.k_out = static_cast<T*>(a.k_out) + b0 * a.ko_sb;
    c.cos = static_cast<const T*>(a.cos) + b0 * a.c_sb;
    c.sin = static_cast<const T*>(a.sin) + b0 * a.s_sb;
    const dim3 grid(seq_blocks, (unsigned)c.batch);
    if (a.backward) rope_kernel<T, VEC, true><<<grid, block, 0, s>>>(c);
    else rope_kernel<T, VEC, false><<<grid, block, 0, s>>>(c);
  }
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
