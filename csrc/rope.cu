// RoPE of q and k in one launch, forward and backward (see rope.h for the math).
//
// One block per token: its threads walk the (head, vector) items of every q and k head of
// that token, so q and k are read and written once each, with 16-byte accesses when the
// head layout allows (half of rot a multiple of the vector width, aligned strides), and the
// token's cos/sin row (a few hundred bytes) is re-read from L1 for each head.
#include "common.cuh"
#include "rope.h"

namespace fastft {
namespace {

template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(512) rope_kernel(const RopeArgs a) {
  const int64_t token = blockIdx.x;
  const int64_t b = token / a.seq, s = token - (token / a.seq) * a.seq;
  const int half = a.rot / 2;
  const int nv = half / VEC;  // vectors per half-row
  const int items = (a.hq + a.hk) * nv;
  const T* cp = static_cast<const T*>(a.cos) + b * a.c_sb + s * a.c_ss;
  const T* sp = static_cast<const T*>(a.sin) + b * a.s_sb + s * a.s_ss;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + s * a.q_ss;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + s * a.k_ss;
  T* qo = static_cast<T*>(a.q_out) + b * a.qo_sb + s * a.qo_ss;
  T* ko = static_cast<T*>(a.k_out) + b * a.ko_sb + s * a.ko_ss;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int head = it / nv;
    const int c = (it - head * nv) * VEC;
    const T* x;
    T* y;
    if (head < a.hq) {
      x = q + head * a.q_sh;
      y = qo + head * a.qo_sh;
    } else {
      x = k + (head - a.hq) * a.k_sh;
      y = ko + (head - a.hq) * a.ko_sh;
    }
    float x1[VEC], x2[VEC], c1[VEC], c2[VEC], s1[VEC], s2[VEC], y1[VEC], y2[VEC];
    load_f32<T, VEC>(x + c, x1);
    load_f32<T, VEC>(x + half + c, x2);
    load_f32<T, VEC>(cp + c, c1);
    load_f32<T, VEC>(cp + half + c, c2);
    load_f32<T, VEC>(sp + c, s1);
    load_f32<T, VEC>(sp + half + c, s2);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (BWD) {
        y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
        y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
      } else {
        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
      }
    }
    store_f32<T, VEC>(y + c, y1);
    store_f32<T, VEC>(y + half + c, y2);
  }
  // Out of place with partial rotary: the pass-through dims are copied as they are.
  const int tail = a.head_dim - a.rot;
  if (tail > 0 && (a.copy_tail_q || a.copy_tail_k)) {
    const int tail_items = (a.hq + a.hk) * tail;
    for (int it = threadIdx.x; it < tail_items; it += blockDim.x) {
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

template <typename T, int VEC>
void launch(const RopeArgs& a, int threads, cudaStream_t s) {
  const unsigned grid = (unsigned)(a.batch * a.seq);
  if (a.backward) rope_kernel<T, VEC, true><<<grid, threads, 0, s>>>(a);
  else rope_kernel<T, VEC, false><<<grid, threads, 0, s>>>(a);
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
  const int v = vec ? VEC : 1;
  const int items = (a.hq + a.hk) * (half / v);
  int threads = (items + 31) / 32 * 32;
  threads = threads < 64 ? 64 : (threads > 512 ? 512 : threads);
  if (vec) launch<T, VEC>(a, threads, s);
  else launch<T, 1>(a, threads, s);
}

}  // namespace

void rope_apply(const RopeArgs& a, cudaStream_t s) {
  if (a.batch * a.seq == 0) return;
  dispatch_float(a.dtype, [&](auto t) { apply_typed<decltype(t)>(a, s); });
}

}  // namespace fastft
