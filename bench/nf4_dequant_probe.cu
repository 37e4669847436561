// How near nf4_dequantize's CUDA kernel is to what its access pattern allows, and which forms
// of it come nearer: a standalone program (nvcc, no torch) that times, in one process and in
// turn, the library's nf4_dequant_vec (bf16 out, 14336x4096, nested and plain absmax) against
// variants of it and against ceilings: the same loads and 16-byte stores with the values made
// by bit operations only (no table, no scales), the stores alone, and two SM copy kernels of
// 1 GiB buffers ("pct_copy" is over copy_flat, which runs near torch's copy rate). Every
// dequantising variant's output is first checked bit for bit against a host reference, written
// into NaN-filled memory. Prints one JSON line per (variant, scales).
//
// Variants (a name each; kConfigs below has their threads and units a thread):
//   base       the library kernel of the csrc tree it is built against ($CSRC); since run 277
//              the same as order (before: the levels loaded and their barrier passed first)
//   order      the words and scale bytes loaded before the levels' barrier
//   shfl       levels in a register per lane, looked up by warp shuffle (no shared memory)
//   gather     levels looked up by L1 gathers from global memory (as the Triton kernel)
//   persist    one wave of blocks striding over the units, the next chunk's words in flight
//   order_cs   order with evict-first (streaming) stores
//   order2     order with code2[q] loaded before the barrier too (all of a thread's loads first)
//   order_*    order with other threads / units a thread
//   bulk       order, the block's values written by one bulk copy from shared memory
//   order_pf   order, each block first asking L2 for the words of the block a wave later
//   wide       order, but a lane loads 16 packed bytes and the warp transposes them through
//              shared memory, so that the stores stay 512 contiguous bytes a warp
// and access-pattern ceilings, their values made by bit operations (not checked):
//   pattern*   the same loads and stores as order (l256: loads asking L2 for 256 bytes)
//   write_only the stores alone
// Usage: nf4_dequant_probe [reps]   (build and run: bench/nf4_dequant_probe.sh)
#include "nf4_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_probe.cuh"

using namespace fastft;

using bf16 = __nv_bfloat16;
constexpr int kVal = 8;  // values per unit (one 16-byte bf16 store)

__device__ __forceinline__ void store16(bf16* p, const float (&v)[kVal], bool streaming) {
  Vec<bf16, kVal> raw;
#pragma unroll
  for (int i = 0; i < kVal; ++i) raw.v[i] = __float2bfloat16_rn(v[i]);
  if (streaming)
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&raw));
  else
    *reinterpret_cast<Vec<bf16, kVal>*>(p) = raw;
}

enum Kind { kOrder = 1, kShfl, kGather, kCs, kPattern, kOrder2, kWriteOnly, kPatternL256, kOrderPf };

__device__ __forceinline__ uint32_t load_word(const uint32_t* p, bool l256) {
  uint32_t v;
  if (l256)
    asm volatile("ld.global.nc.L2::256B.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  else
    v = __ldg(p);
  return v;
}

constexpr int kPrefetchBlocks = 1056;  // 8 blocks on each of the H200's 132 SMs: one wave

// The base kernel's work split (UNITS units a thread, THREADS apart), every global load of a
// thread issued before its first value is made; V: a Kind.
template <int V, int UNITS, int THREADS>
__global__ void __launch_bounds__(THREADS) probe_flat(const NF4Weight w, int64_t units,
                                                      bf16* __restrict__ out) {
  __shared__ float lut[16];
  const int lane = threadIdx.x & 31;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  const int64_t first = (int64_t)blockIdx.x * (THREADS * UNITS) + threadIdx.x;
  if (V == kOrderPf && threadIdx.x < THREADS * UNITS / 32) {
    // the words of the block one wave later into L2: a 128-byte line a thread
    const int64_t line = (int64_t)(blockIdx.x + kPrefetchBlocks) * THREADS * UNITS + threadIdx.x * 32;
    if (line < units) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(words + line));
  }
  uint32_t word[UNITS];
  float part[UNITS];  // plain: the scale; nested: absmax2 of the unit's block
  int q[UNITS];
#pragma unroll
  for (int u = 0; u < UNITS; ++u) {
    const int64_t i = min(first + (int64_t)u * THREADS, units - 1);  // clamped: no branches
    const int64_t blk = (i * kVal) >> w.bs_log2;
    word[u] = V == kWriteOnly ? (uint32_t)i * 2654435761u : load_word(words + i, V == kPatternL256);
    if (V == kWriteOnly) {
      q[u] = 0;
      part[u] = 1.f;
    } else {
      load_scale_parts(w, blk, q[u], part[u]);
    }
  }
  const float offset = nested_offset(w);
  float c2[UNITS];
  if (V == kOrder2) {
    const float* table = w.nested ? w.code2 : w.code;  // plain: a harmless valid load
#pragma unroll
    for (int u = 0; u < UNITS; ++u) c2[u] = __ldg(table + q[u]);
  }
  float mylevel = 0.f;
  if (V == kOrder || V == kCs || V == kOrder2 || V == kOrderPf) {
    if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(w.code + threadIdx.x);
    __syncthreads();
  } else if (V == kShfl) {
    mylevel = __ldg(w.code + (lane & 15));
  }
#pragma unroll
  for (int u = 0; u < UNITS; ++u) {
    const int64_t i = first + (int64_t)u * THREADS;
    const bool bits = V == kPattern || V == kPatternL256 || V == kWriteOnly;
    float scale = part[u];
    if (!bits && w.nested)  // order2: scale_from_parts with code2[q] already loaded
      scale = V == kOrder2 ? __fadd_rn(__fmul_rn(c2[u], part[u]), offset)
                           : scale_from_parts(w, q[u], part[u], offset);
    float v[kVal];
#pragma unroll
    for (int j = 0; j < kVal / 2; ++j) {
      const uint32_t byte = (word[u] >> (8 * j)) & 0xFFu;
      const uint32_t hi = byte >> 4, lo = byte & 15u;
      float lh, ll;
      if (V == kShfl) {
        lh = __shfl_sync(0xffffffffu, mylevel, hi);
        ll = __shfl_sync(0xffffffffu, mylevel, lo);
      } else if (V == kGather) {
        lh = __ldg(w.code + hi);
        ll = __ldg(w.code + lo);
      } else if (bits) {
        lh = __uint_as_float(0x3f800000u | hi << 8);
        ll = __uint_as_float(0x3f800000u | lo << 8);
      } else {
        lh = lut[hi];
        ll = lut[lo];
      }
      v[2 * j] = __fmul_rn(lh, scale);
      v[2 * j + 1] = __fmul_rn(ll, scale);
    }
    if (i < units) store16(out + i * kVal, v, V == kCs);
  }
}

// "bulk": order, but the block's 16 KB of values go to shared memory and out by one bulk copy
// (cp.async.bulk), so that the SM writes whole lines without its load / store unit.
__global__ void __launch_bounds__(256) probe_bulk(const NF4Weight w, int64_t units,
                                                  bf16* __restrict__ out) {
  __shared__ float lut[16];
  __shared__ alignas(128) uint4 stage[1024];
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  const int64_t base = (int64_t)blockIdx.x * 1024, first = base + threadIdx.x;
  uint32_t word[4];
  float part[4];
  int q[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = min(first + u * 256, units - 1);
    const int64_t blk = (i * kVal) >> w.bs_log2;
    word[u] = __ldg(words + i);
    load_scale_parts(w, blk, q[u], part[u]);
  }
  const float offset = nested_offset(w);
  if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(w.code + threadIdx.x);
  __syncthreads();
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const float scale = scale_from_parts(w, q[u], part[u], offset);
    Vec<bf16, kVal> raw;
#pragma unroll
    for (int j = 0; j < kVal / 2; ++j) {
      const uint32_t byte = (word[u] >> (8 * j)) & 0xFFu;
      raw.v[2 * j] = __float2bfloat16_rn(__fmul_rn(lut[byte >> 4], scale));
      raw.v[2 * j + 1] = __float2bfloat16_rn(__fmul_rn(lut[byte & 15u], scale));
    }
    stage[u * 256 + threadIdx.x] = *reinterpret_cast<const uint4*>(&raw);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t bytes = (uint32_t)(min((int64_t)1024, units - base) * 16);
    const uint32_t src = (uint32_t)__cvta_generic_to_shared(stage);
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n"
                 ::"l"(out + base * kVal), "r"(src), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  }
}

// "wide": a warp's 128 units (512 packed bytes) loaded as one 16-byte load a lane, passed
// through shared memory so that lane l makes units l, l + 32, l + 64, l + 96 (each warp store
// 512 contiguous bytes); the levels by shuffle. 1024 units a block of 256 threads.
__global__ void __launch_bounds__(256) probe_wide(const NF4Weight w, int64_t units,
                                                  bf16* __restrict__ out) {
  __shared__ uint4 stage[256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t warp_first = (int64_t)blockIdx.x * 1024 + warp * 128;
  const uint4* src = reinterpret_cast<const uint4*>(w.packed);
  const int64_t last16 = (units - 1) / 4;  // the last 16-byte piece with a unit in it
  const uint4 raw = __ldg(src + min(warp_first / 4 + lane, last16));
  float part[4];
  int q[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = min(warp_first + u * 32 + lane, units - 1);
    const int64_t blk = (i * kVal) >> w.bs_log2;
    load_scale_parts(w, blk, q[u], part[u]);
  }
  const float offset = nested_offset(w);
  const float mylevel = __ldg(w.code + (lane & 15));
  stage[threadIdx.x] = raw;
  __syncwarp();
  const uint32_t* staged = reinterpret_cast<const uint32_t*>(stage + warp * 32);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = warp_first + u * 32 + lane;
    const uint32_t word = staged[u * 32 + lane];
    const float scale = scale_from_parts(w, q[u], part[u], offset);
    float v[kVal];
#pragma unroll
    for (int j = 0; j < kVal / 2; ++j) {
      const uint32_t byte = (word >> (8 * j)) & 0xFFu;
      v[2 * j] = __fmul_rn(__shfl_sync(0xffffffffu, mylevel, byte >> 4), scale);
      v[2 * j + 1] = __fmul_rn(__shfl_sync(0xffffffffu, mylevel, byte & 15u), scale);
    }
    if (i < units) store16(out + i * kVal, v, false);
  }
}

// Variant 4: gridDim.x blocks (a few per SM) striding over chunks of kThreads * kUnits units,
// the next chunk's words and scale parts loaded before this chunk's values are made.
__global__ void __launch_bounds__(kThreads) probe_persist(const NF4Weight w, int64_t units,
                                                          bf16* __restrict__ out) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = __ldg(w.code + threadIdx.x);
  const float offset = nested_offset(w);
  __syncthreads();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w.packed);
  const int64_t chunk = kThreads * kUnits;
  const int64_t chunks = (units + chunk - 1) / chunk;
  uint32_t word[kUnits], nword[kUnits];
  float part[kUnits], npart[kUnits];
  int q[kUnits], nq[kUnits];
  auto load = [&](int64_t c, uint32_t (&wd)[kUnits], float (&pt)[kUnits], int (&qq)[kUnits]) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int64_t i = min(c * chunk + threadIdx.x + (int64_t)u * kThreads, units - 1);
      const int64_t blk = (i * kVal) >> w.bs_log2;
      wd[u] = __ldg(words + i);
      load_scale_parts(w, blk, qq[u], pt[u]);
    }
  };
  int64_t c = blockIdx.x;
  if (c < chunks) load(c, word, part, q);
  for (; c < chunks; c += gridDim.x) {
    const int64_t nc = min(c + (int64_t)gridDim.x, chunks - 1);
    load(nc, nword, npart, nq);
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int64_t i = c * chunk + threadIdx.x + (int64_t)u * kThreads;
      const float scale = scale_from_parts(w, q[u], part[u], offset);
      float v[kVal];
#pragma unroll
      for (int j = 0; j < kVal / 2; ++j) {
        const uint32_t byte = (word[u] >> (8 * j)) & 0xFFu;
        v[2 * j] = __fmul_rn(lut[byte >> 4], scale);
        v[2 * j + 1] = __fmul_rn(lut[byte & 15u], scale);
      }
      if (i < units) store16(out + i * kVal, v, false);
    }
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      word[u] = nword[u];
      part[u] = npart[u];
      q[u] = nq[u];
    }
  }
}

// The copy ceiling: 16-byte loads and stores, 4 in flight a thread, a wave of blocks striding.
__global__ void __launch_bounds__(256) copy16(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                              int64_t n) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += 4 * step) {
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (i + k * step < n) v[k] = src[i + k * step];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (i + k * step < n) dst[i + k * step] = v[k];
  }
}

// Copy by blocks of 256 threads x 4 16-byte pieces that exit when done.
__global__ void __launch_bounds__(256) copy_flat(const uint4* __restrict__ src,
                                                 uint4* __restrict__ dst, int64_t n) {
  const int64_t first = (int64_t)blockIdx.x * 1024 + threadIdx.x;
  uint4 v[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (first + k * 256 < n) v[k] = src[first + k * 256];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (first + k * 256 < n) dst[first + k * 256] = v[k];
}

using Kernel = void (*)(NF4Weight, int64_t, bf16*);
struct Config {
  const char* name;
  Kernel kernel;
  int threads, units;  // units: a thread's; 0: one wave (persist)
  bool checked;        // a dequantisation (its output checked), not an access pattern
};
static const Config kConfigs[] = {
    {"base", nf4_dequant_vec<bf16>, kThreads, kUnits, true},
    {"order", probe_flat<kOrder, 4, 256>, 256, 4, true},
    {"shfl", probe_flat<kShfl, 4, 256>, 256, 4, true},
    {"gather", probe_flat<kGather, 4, 256>, 256, 4, true},
    {"persist", probe_persist, kThreads, 0, true},
    {"order_cs", probe_flat<kCs, 4, 256>, 256, 4, true},
    {"order2", probe_flat<kOrder2, 4, 256>, 256, 4, true},
    {"order_u2", probe_flat<kOrder, 2, 256>, 256, 2, true},
    {"order_u8", probe_flat<kOrder, 8, 256>, 256, 8, true},
    {"order_t128", probe_flat<kOrder, 4, 128>, 128, 4, true},
    {"order_t512", probe_flat<kOrder, 4, 512>, 512, 4, true},
    {"order_t512_u2", probe_flat<kOrder, 2, 512>, 512, 2, true},
    {"wide", probe_wide, 256, 4, true},
    {"bulk", probe_bulk, 256, 4, true},
    {"order_pf", probe_flat<kOrderPf, 4, 256>, 256, 4, true},
    {"pattern", probe_flat<kPattern, 4, 256>, 256, 4, false},
    {"pattern_l256", probe_flat<kPatternL256, 4, 256>, 256, 4, false},
    {"pattern_u8", probe_flat<kPattern, 8, 256>, 256, 8, false},
    {"write_only", probe_flat<kWriteOnly, 4, 256>, 256, 4, false},
};
constexpr int kVariants = sizeof(kConfigs) / sizeof(kConfigs[0]);

static void launch(int v, const NF4Weight& w, int64_t units, bf16* out, int sms) {
  const Config& c = kConfigs[v];
  const int64_t per_block = (int64_t)c.threads * (c.units ? c.units : kUnits);
  int64_t blocks = (units + per_block - 1) / per_block;
  if (c.units == 0) blocks = std::min<int64_t>(blocks, 8 * sms);
  c.kernel<<<(unsigned)blocks, c.threads>>>(w, units, out);
}

static uint16_t host_bf16(float f) {  // round to nearest even (no NaNs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

struct Set {
  uint8_t *packed, *absmax_u8;
  float *absmax_f32, *absmax2, *code2, *offset, *code;
  bf16* out;
};

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 30;
  const int64_t rows = 14336, cols = 4096, numel = rows * cols, units = numel / kVal;
  const int64_t blocks = numel / 64, blocks2 = (blocks + 255) / 256;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const float nf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                         -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                         0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                         0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                         0.7229568362236023f, 1.0f};
  std::vector<float> code2(256), absmax2(blocks2), absmax_f32(blocks);
  for (int i = 0; i < 256; ++i) code2[i] = -1.f + 2.f * (float)((i * 37) % 256) / 255.f;
  for (int64_t i = 0; i < blocks2; ++i) absmax2[i] = 0.5f + (float)((i * 7919) % 1000) / 1000.f;
  for (int64_t i = 0; i < blocks; ++i) absmax_f32[i] = 0.25f + (float)((i * 104729) % 4096) / 2048.f;
  const float offset = 0.3125f;
  Set sets[2];
  for (int s = 0; s < 2; ++s) {
    Set& d = sets[s];
    CHECK(cudaMalloc(&d.packed, numel / 2));
    CHECK(cudaMalloc(&d.absmax_u8, blocks));
    CHECK(cudaMalloc(&d.absmax_f32, blocks * 4));
    CHECK(cudaMalloc(&d.absmax2, blocks2 * 4));
    CHECK(cudaMalloc(&d.code2, 256 * 4));
    CHECK(cudaMalloc(&d.offset, 4));
    CHECK(cudaMalloc(&d.code, 64));
    CHECK(cudaMalloc(&d.out, numel * 2));
    fill_bytes<<<1024, 256>>>(d.packed, numel / 2, 17u + s);
    fill_bytes<<<1024, 256>>>(d.absmax_u8, blocks, 91u + s);
    CHECK(cudaMemcpy(d.absmax_f32, absmax_f32.data(), blocks * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d.absmax2, absmax2.data(), blocks2 * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d.code2, code2.data(), 256 * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d.offset, &offset, 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d.code, nf4, 64, cudaMemcpyHostToDevice));
  }
  CHECK(cudaDeviceSynchronize());
  auto weight = [&](const Set& d, bool nested) {
    NF4Weight w;
    w.packed = d.packed;
    w.absmax = nested ? (const void*)d.absmax_u8 : (const void*)d.absmax_f32;
    w.absmax2 = d.absmax2;
    w.code2 = d.code2;
    w.offset = d.offset;
    w.code = d.code;
    w.bs_log2 = 6;
    w.bs2_log2 = 8;
    w.nested = nested;
    return w;
  };

  // Host reference of set 0, both scale kinds; every variant but the pattern must match it.
  std::vector<uint8_t> packed(numel / 2), absmax_u8(blocks);
  CHECK(cudaMemcpy(packed.data(), sets[0].packed, numel / 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(absmax_u8.data(), sets[0].absmax_u8, blocks, cudaMemcpyDeviceToHost));
  std::vector<uint16_t> ref(numel), got(numel);
  bool all_ok = true;
  for (int nested = 1; nested >= 0; --nested) {
    for (int64_t b = 0; b < blocks; ++b) {
      volatile float prod = code2[absmax_u8[b]] * absmax2[b >> 8];  // rounded before the add
      const float scale = nested ? (float)(prod + offset) : absmax_f32[b];
      for (int k = 0; k < 64; ++k) {
        const int64_t i = b * 64 + k;
        const uint8_t byte = packed[i >> 1];
        const int nib = (i & 1) ? (byte & 15) : (byte >> 4);
        volatile float v = nf4[nib] * scale;
        ref[i] = host_bf16(v);
      }
    }
    for (int v = 0; v < kVariants; ++v) {
      if (!kConfigs[v].checked) continue;
      CHECK(cudaMemset(sets[0].out, 0xFF, numel * 2));  // NaN: an unwritten value fails
      launch(v, weight(sets[0], nested), units, sets[0].out, sms);
      CHECK(cudaGetLastError());
      CHECK(cudaMemcpy(got.data(), sets[0].out, numel * 2, cudaMemcpyDeviceToHost));
      int64_t bad = 0, first_bad = -1;
      for (int64_t i = 0; i < numel; ++i)
        if (got[i] != ref[i] && bad++ == 0) first_bad = i;
      if (bad) {
        all_ok = false;
        std::printf("{\"check\": \"%s\", \"nested\": %d, \"mismatches\": %lld, \"first\": %lld}\n",
                    kConfigs[v].name, nested, (long long)bad, (long long)first_bad);
      }
    }
  }
  std::printf("{\"check\": \"all variants vs host reference\", \"ok\": %s}\n",
              all_ok ? "true" : "false");

  // The copy ceiling on 1 GiB buffers, timed between the variants' rounds too.
  const int64_t copy_bytes = int64_t(1) << 30;
  uint4 *ca, *cb;
  CHECK(cudaMalloc(&ca, copy_bytes));
  CHECK(cudaMalloc(&cb, copy_bytes));
  fill_bytes<<<4096, 256>>>(reinterpret_cast<uint8_t*>(ca), copy_bytes, 5u);
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  constexpr int kCalls = 20;
  std::vector<float> times[kVariants][2], copy_times, flat_times;
  for (int r = 0; r < reps + 2; ++r) {
    CHECK(cudaEventRecord(e0));
    for (int k = 0; k < 4; ++k)
      copy16<<<sms * 8, 256>>>(k & 1 ? cb : ca, k & 1 ? ca : cb, copy_bytes / 16);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) copy_times.push_back(ms / 4);
    CHECK(cudaEventRecord(e0));
    for (int k = 0; k < 4; ++k)
      copy_flat<<<(unsigned)(copy_bytes / 16 / 1024), 256>>>(k & 1 ? cb : ca, k & 1 ? ca : cb,
                                                            copy_bytes / 16);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (r >= 2) flat_times.push_back(ms / 4);
    for (int v = 0; v < kVariants; ++v)
      for (int nested = 0; nested < 2; ++nested) {
        const NF4Weight w[2] = {weight(sets[0], nested), weight(sets[1], nested)};
        CHECK(cudaEventRecord(e0));
        for (int c = 0; c < kCalls; ++c) launch(v, w[c & 1], units, sets[c & 1].out, sms);
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (r >= 2) times[v][nested].push_back(ms * 1000.f / kCalls);
      }
  }
  CHECK(cudaGetLastError());
  auto median = [](std::vector<float> t) {
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  const double stride_gbps = 2.0 * copy_bytes / (median(copy_times) * 1e-3) / 1e9;
  const double copy_gbps = 2.0 * copy_bytes / (median(flat_times) * 1e-3) / 1e9;
  const double bytes = numel / 2 + numel * 2.0;  // packed in + bf16 out, as bench_nf4 counts
  std::printf("{\"copy_gbps\": %.0f, \"copy16_gbps\": %.0f, \"pct_copy of\": \"copy_flat\"}\n",
              copy_gbps, stride_gbps);
  for (int v = 0; v < kVariants; ++v)
    for (int nested = 1; nested >= 0; --nested) {
      const double us = median(times[v][nested]);
      std::printf("{\"variant\": \"%s\", \"scales\": \"%s\", \"us\": %.2f, \"min_us\": %.2f, "
                  "\"pct_copy\": %.1f}\n",
                  kConfigs[v].name, nested ? "nested" : "plain", us,
                  *std::min_element(times[v][nested].begin(), times[v][nested].end()),
                  100.0 * bytes / (us * 1e-6) / 1e9 / copy_gbps);
    }
  return all_ok ? 0 : 1;
}
