// Where a v3 or v4 small-M NF4 call's time goes, CTA by CTA: a standalone program (nvcc, no
// torch) that builds nf4.cu with FASTFT_NF4_TIMELINE, so each v3 / v4 CTA records its phases (start,
// table built, previous kernel waited for, x staged, each warp's loop end, parts summed, end)
// with clock64 and the global timer. It times a CUDA graph of `calls` launches of one shape
// (each on its own weight, so that no call finds its weight in L2; programmatic dependent
// launch as in the library), replays it once more with the timeline on, and writes the
// timeline. For comparison it times v3's weight loads alone (its grid and load pattern, the
// bytes XORed): with 4 and 8 steps in flight per lane, with L2 fetching 256 bytes per miss, and
// after a bulk L2 prefetch of each row's range; and the same work split reading a
// tile-contiguous layout (a warp's 32 rows x 4 steps as one 4 KB piece). bench/nf4_timeline.py builds, runs and summarises it.
//
// Usage: nf4_timeline M N K calls frozen out.bin [variant kparts]  (variant 7: v4)
// Prints one JSON line: the plan, us per call of both kernels, the timeline's layout.
#define FASTFT_NF4_TIMELINE 1
#include "nf4.cu"  // csrc/, or the tree in $CSRC (bench/nf4_timeline.py)
#if __has_include("nf4_stream.cu")
#include "nf4_stream.cu"  // nf4.cu's plan and launch reach the v4 kernel
#endif

#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>

#include "cuda_probe.cuh"

using namespace fastft;

// x in [-1, 1) as bf16.
__global__ void fill_x(__nv_bfloat16* x, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u + 12345u;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    x[i] = __float2bfloat16((float)(h & 0xFFFF) / 32768.f - 1.f);
  }
}

// 8 bytes with L2 fetching 128 (HINT 0, 2) or 256 bytes (HINT 1) around them.
template <int HINT>
__device__ __forceinline__ uint2 load8(const uint8_t* p) {
  uint2 v;
  if (HINT == 1)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n"
                 : "=r"(v.x), "=r"(v.y) : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0,%1}, [%2];\n"
                 : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// The loads-only kernels below: what v3_gemv's CTA (blockIdx) and warp get of the plan in `a`
// (8-warp CTAs, or 16 warps for 16 K parts): the warp's tile of 32 rows (its index among all
// tiles) and its K range in 64-k steps. Each waits for the previous kernel first (PDL, as v3).
struct WarpWork {
  int tile;        // rows 32 tile .. 32 tile + 31
  int first_step;  // the warp's steps: [first_step, first_step + steps)
  int steps;
};
template <int WARPS>
__device__ WarpWork warp_work(const NF4GemvArgs& a, int warp) {
  const int S = a.K / 64;
  const int parts = a.v3_kparts, tiles = WARPS / parts;
  const int part = warp / tiles, wt = warp - part * tiles;
  const int s0 = blockIdx.y * a.v3_steps;
  const int count = min(a.v3_steps, S - s0);
  const int per_part = (count + parts - 1) / parts;
  const int p0 = min(count, part * per_part);
  return {(int)blockIdx.x * tiles + wt, s0 + p0, min(count, p0 + per_part) - p0};
}

// One value per CTA, so that no load is dead code.
__device__ __forceinline__ void sink_xor(uint32_t* sink, uint32_t acc, int lane) {
  if (lane == 0) atomicXor(sink + blockIdx.x, acc);
}

// v3's weight loads alone, the bytes XORed instead of decoded: the grid, rows and K ranges of
// the v3 plan in `a` (8-warp CTAs, or 16 warps for 16 K parts), each lane loading 8 bytes of its
// 4 rows per 64-k step, AHEAD steps in flight per lane (v3: 4). HINT 0: as v3 (L2 fetches
// 128 bytes); 1: 256 bytes; 2: as v3 after one bulk L2 prefetch per row of the warp's K range.
template <int WARPS, int AHEAD, int HINT>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 8 ? 2 : 1)
    v3_loads_only(const NF4Weight w, const NF4GemvArgs a, uint32_t* sink) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int N = a.N, K = a.K;
  const WarpWork ww = warp_work<WARPS>(a, warp);
  const int wcount = ww.steps;
  const int tile_base = ww.tile * 32;
  const uint8_t* wp[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    wp[i] = w.packed + (int64_t)min(tile_base + g + 8 * i, N - 1) * (K / 2) +
            (int64_t)ww.first_step * 32 + 8 * t;
  if (HINT == 2 && wcount > 0) {
    const uint8_t* p = w.packed + (int64_t)min(tile_base + lane, N - 1) * (K / 2) +
                       (int64_t)ww.first_step * 32;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(wcount * 32)
                 : "memory");
  }
  uint2 ring[AHEAD][4];
#pragma unroll
  for (int j = 0; j < AHEAD; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (j < wcount) ring[j][i] = load8<HINT>(wp[i] + j * 32);
  uint32_t acc = 0;
  for (int i0 = 0; i0 < wcount; i0 += AHEAD) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      if (i0 + j >= wcount) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) acc = acc * 3u + (ring[j][i].x ^ ring[j][i].y);
      if (i0 + j + AHEAD < wcount)
#pragma unroll
        for (int i = 0; i < 4; ++i) ring[j][i] = load8<HINT>(wp[i] + (i0 + j + AHEAD) * 32);
    }
  }
  sink_xor(sink, acc, lane);
}

// v3's work split and bytes in flight (128 per lane), but 16-byte loads with LANES lanes on
// one row per load instruction: each row's piece is LANES x 16 contiguous bytes (v3: 8 rows x
// 32 bytes per instruction). Rows advance together through the warp's K range, as in v3.
template <int WARPS, int LANES>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 8 ? 2 : 1)
    row_pieces_loads_only(const NF4Weight w, const NF4GemvArgs a, uint32_t* sink) {
  constexpr int kRows = 32 / LANES, kPiece = 16 * LANES;  // rows and bytes per instruction
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int N = a.N, K = a.K;
  const WarpWork ww = warp_work<WARPS>(a, warp);
  const int wcount = ww.steps;
  const int tile_base = ww.tile * 32;
  const int range = wcount * 32;                      // bytes per row
  const int loads = 32 / kRows * ((range + kPiece - 1) / kPiece);
  const int row_in = lane / LANES, col_in = (lane % LANES) * 16;
  auto address = [&](int i) -> const uint4* {
    const int c = i / (32 / kRows), rb = i % (32 / kRows);
    const int col = c * kPiece + col_in;
    if (col >= range) return nullptr;
    const int row = min(tile_base + rb * kRows + row_in, N - 1);
    return reinterpret_cast<const uint4*>(w.packed + (int64_t)row * (K / 2) +
                                          (int64_t)ww.first_step * 32 + col);
  };
  auto load = [&](int i) {
    const uint4* p = i < loads ? address(i) : nullptr;
    return p ? load_stream16(p) : make_uint4(0u, 0u, 0u, 0u);
  };
  uint4 ring[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) ring[j] = load(j);
  uint32_t acc = 0;
  for (int i0 = 0; i0 < loads; i0 += 8) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      acc = acc * 3u + (ring[j].x ^ ring[j].y ^ ring[j].z ^ ring[j].w);
      ring[j] = load(i0 + j + 8);
    }
  }
  sink_xor(sink, acc, lane);
}

// The same work split, but each warp's 32 rows x 4 steps (4 KB) contiguous, as a re-laid
// weight would be: a warp reads its range as one stream, 512 bytes per load instruction (16 per
// lane), GROUPS x 4 KB in flight per warp (v3's ring: 1 group's worth).
template <int WARPS, int GROUPS>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 8 ? 2 : 1)
    tiled_loads_only(const NF4Weight w, const NF4GemvArgs a, uint32_t* sink) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int N = a.N, K = a.K, S = K / 64;
  const WarpWork ww = warp_work<WARPS>(a, warp);
  const int wcount = ww.steps;
  const int units = wcount * 64;  // 16-byte units: 1 KB per step
  const int groups = (units + 255) / 256;
  const int tile = min(ww.tile, (N - 1) / 32);
  // tile-major: tile t's K range is S steps of 1 KB (32 rows x 32 bytes)
  const uint4* base =
      reinterpret_cast<const uint4*>(w.packed + ((int64_t)tile * S + ww.first_step) * 1024) + lane;
  uint4 ring[GROUPS][8];
  auto load = [&](int group, int q) {
    const int u = group * 256 + q * 32;
    return u + lane < units ? load_stream16(base + u) : make_uint4(0u, 0u, 0u, 0u);
  };
#pragma unroll
  for (int j = 0; j < GROUPS; ++j)
#pragma unroll
    for (int q = 0; q < 8; ++q) ring[j][q] = load(j, q);
  uint32_t acc = 0;
  for (int i0 = 0; i0 < groups; i0 += GROUPS) {
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
      if (i0 + j >= groups) break;
#pragma unroll
      for (int q = 0; q < 8; ++q)
        acc = acc * 3u + (ring[j][q].x ^ ring[j][q].y ^ ring[j][q].z ^ ring[j][q].w);
      if (i0 + j + GROUPS < groups)
#pragma unroll
        for (int q = 0; q < 8; ++q) ring[j][q] = load(i0 + j + GROUPS, q);
    }
  }
  sink_xor(sink, acc, lane);
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// us per call of a graph of `calls` launches: 5 warm-up replays, then the median of 15 timed
// batches of 10 replays.
template <typename F>
static float time_graph(cudaStream_t stream, int calls, F launch_all, cudaGraphExec_t* keep) {
  cudaGraph_t graph;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  launch_all();
  CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 5; ++i) CHECK(cudaGraphLaunch(exec, stream));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<float> per_call;
  for (int b = 0; b < 15; ++b) {
    CHECK(cudaEventRecord(e0, stream));
    for (int i = 0; i < 10; ++i) CHECK(cudaGraphLaunch(exec, stream));
    CHECK(cudaEventRecord(e1, stream));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    per_call.push_back(ms * 1000.f / (10 * calls));
  }
  CHECK(cudaGraphDestroy(graph));
  if (keep) *keep = exec;
  else CHECK(cudaGraphExecDestroy(exec));
  return median(per_call);
}

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s M N K calls frozen out.bin [variant kparts]\n", argv[0]);
    return 2;
  }
  const int M = std::atoi(argv[1]), N = std::atoi(argv[2]), K = std::atoi(argv[3]);
  const int calls = std::min(std::atoi(argv[4]), kTimelineCalls);
  const bool frozen = std::atoi(argv[5]) != 0;
  const char* out_path = argv[6];
  const int variant = argc > 7 ? std::atoi(argv[7]) : 0;
  const int kparts = argc > 8 ? std::atoi(argv[8]) : 0;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  const int64_t numel = (int64_t)N * K, blocks = numel / 64, blocks2 = (blocks + 255) / 256;
  const float levels[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f,
                            -0.39491748809814453f, -0.28444138169288635f, -0.18477343022823334f,
                            -0.09105003625154495f, 0.0f, 0.07958029955625534f,
                            0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                            0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  float* consts;  // code [16], code2 [256], offset [1]
  CHECK(cudaMalloc(&consts, (16 + 256 + 1) * sizeof(float)));
  {
    std::vector<float> h(16 + 256 + 1);
    for (int i = 0; i < 16; ++i) h[i] = levels[i];
    for (int i = 0; i < 256; ++i) h[16 + i] = (i - 127.5f) / 128.f;  // a signed code2
    h[16 + 256] = 0.02f;
    CHECK(cudaMemcpy(consts, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  std::vector<NF4Weight> ws(calls);
  std::vector<NF4GemvArgs> as(calls);
  std::vector<void*> ys(calls);
  __nv_bfloat16* x;
  CHECK(cudaMalloc(&x, (size_t)M * K * 2));
  fill_x<<<256, 256, 0, stream>>>(x, (int64_t)M * K);
  for (int c = 0; c < calls; ++c) {
    uint8_t *packed, *absmax;
    float* absmax2;
    CHECK(cudaMalloc(&packed, numel / 2));
    CHECK(cudaMalloc(&absmax, blocks));
    CHECK(cudaMalloc(&absmax2, blocks2 * sizeof(float)));
    fill_bytes<<<1024, 256, 0, stream>>>(packed, numel / 2, 17u * c + 1u);
    fill_bytes<<<256, 256, 0, stream>>>(absmax, blocks, 31u * c + 7u);
    CHECK(cudaMemsetAsync(absmax2, 0, blocks2 * sizeof(float), stream));  // overwritten below
    std::vector<float> a2(blocks2);
    for (int64_t i = 0; i < blocks2; ++i) a2[i] = 0.01f * (1 + (i * 7 + c) % 13);
    CHECK(cudaMemcpy(absmax2, a2.data(), a2.size() * sizeof(float), cudaMemcpyHostToDevice));
    NF4Weight& w = ws[c];
    w.packed = packed; w.absmax = absmax; w.absmax2 = absmax2;
    w.code2 = consts + 16; w.offset = consts + 16 + 256; w.code = consts;
    w.bs_log2 = 6; w.bs2_log2 = 8; w.nested = true;
    CHECK(cudaMalloc(&ys[c], (size_t)M * N * 2));
    NF4GemvArgs& a = as[c];
    a.x = x; a.x_stride = K; a.bias = nullptr; a.y = ys[c]; a.y_stride = N;
    a.M = M; a.N = N; a.K = K; a.dtype = kBF16;
    a.variant = variant; a.v3_kparts = kparts; a.v3_splits = 0; a.v4_allowed = true;
    a.pdl = true; a.weights_frozen = frozen;
    nf4_gemv_plan(w, a, sms);
    // the call's number in the tag's serial bits (the timeline's index; a valid counter tag)
    a.counter_tag = (0xFFFull << 52) | ((unsigned long long)c << 24);
    if (const int64_t floats = nf4_gemv_scratch_floats(a)) {
      float* scratch;
      CHECK(cudaMalloc(&scratch, floats * sizeof(float)));
      nf4_gemv_point_into_scratch(a, scratch, a.counter_tag);
    }
  }
  CHECK(cudaStreamSynchronize(stream));
  const NF4LowRank lr{};
  const NF4GemvArgs& a0 = as[0];
  const bool v4 = a0.variant == 7;
  if (a0.variant != 3 && !v4) {
    std::fprintf(stderr, "the plan chose variant %d: the timeline covers v3 and v4 only\n",
                 a0.variant);
    return 3;
  }
  const int ctas = v4 ? a0.v4_ctas * std::max(1, (int)a0.v4_kparts)
                     : (int)nf4_gemv_counters(a0) * a0.v3_splits;

  cudaGraphExec_t exec;
  const float us_nf4 = time_graph(stream, calls, [&] {
    for (int c = 0; c < calls; ++c) nf4_gemv(ws[c], as[c], lr, stream);
  }, &exec);
  CHECK(cudaGetLastError());
  // one more replay with a cleared timeline
  void* tl_ptr;
  CHECK(cudaGetSymbolAddress(&tl_ptr, nf4_timeline));
  const size_t tl_bytes = sizeof(unsigned long long) * kTimelineCalls * kTimelineCtas * kTimelineSlots;
  CHECK(cudaMemsetAsync(tl_ptr, 0, tl_bytes, stream));
  CHECK(cudaGraphLaunch(exec, stream));
  CHECK(cudaStreamSynchronize(stream));
  std::vector<unsigned long long> tl(tl_bytes / 8);
  CHECK(cudaMemcpy(tl.data(), tl_ptr, tl_bytes, cudaMemcpyDeviceToHost));
  FILE* f = std::fopen(out_path, "wb");
  if (!f) { std::perror(out_path); return 1; }
  std::fwrite(tl.data(), 1, tl_bytes, f);
  std::fclose(f);

  // the loads alone, in v3's pattern and tile-contiguous, the same calls and weights
  uint32_t* sink;
  CHECK(cudaMalloc(&sink, 65536 * sizeof(uint32_t)));
  const bool wide = a0.v3_kparts == kV3WidePartsCTA;
  const dim3 grid((unsigned)nf4_gemv_counters(a0), (unsigned)a0.v3_splits);
  auto time_loads = [&](auto kernel, int threads) {
    const float us = time_graph(stream, calls, [&] {
      for (int c = 0; c < calls; ++c)
        launch_kernel(kernel, grid, threads, 0, stream, true, 1, ws[c], as[c], sink);
    }, nullptr);
    CHECK(cudaGetLastError());
    return us;
  };
  struct LoadTimes {
    float v3_4, v3_8, v3_256, v3_prefetch, tiled, rows64, rows128, rows512;
  };
  auto time_all = [&](auto warps) {  // every loads-only kernel with the plan's CTA size
    constexpr int W = decltype(warps)::value;
    LoadTimes r;
    r.rows64 = time_loads(row_pieces_loads_only<W, 4>, W * 32);
    r.rows128 = time_loads(row_pieces_loads_only<W, 8>, W * 32);
    r.rows512 = time_loads(row_pieces_loads_only<W, 32>, W * 32);
    r.v3_4 = time_loads(v3_loads_only<W, 4, 0>, W * 32);
    r.v3_8 = time_loads(v3_loads_only<W, 8, 0>, W * 32);
    r.v3_256 = time_loads(v3_loads_only<W, 4, 1>, W * 32);
    r.v3_prefetch = time_loads(v3_loads_only<W, 4, 2>, W * 32);
    r.tiled = time_loads(tiled_loads_only<W, 1>, W * 32);
    return r;
  };
  // (v3's load patterns: not timed for v4, whose copies bench/nf4_v4_probe.py times)
  const LoadTimes lt = v4     ? LoadTimes{}
                       : wide ? time_all(std::integral_constant<int, 16>{})
                              : time_all(std::integral_constant<int, 8>{});

  std::printf(
      "{\"M\": %d, \"N\": %d, \"K\": %d, \"calls\": %d, \"frozen\": %d, \"variant\": %d, "
      "\"v3_decode\": %d, \"v3_kparts\": %d, \"v3_splits\": %d, \"v3_steps\": %d, \"ctas\": %d, "
      "\"sms\": %d, \"us_nf4\": %.3f, \"us_v3_loads4\": %.3f, \"us_v3_loads8\": %.3f, "
      "\"us_v3_loads256\": %.3f, \"us_v3_loads_prefetch\": %.3f, \"us_tiled1\": %.3f, "
      "\"us_rows64B\": %.3f, \"us_rows128B\": %.3f, \"us_rows512B\": %.3f, "
      "\"packed_bytes\": %lld, \"timeline_ctas\": %d, \"timeline_slots\": %d, \"v4_kparts\": %d}\n",
      M, N, K, calls, (int)frozen, a0.variant, a0.v3_decode, a0.v3_kparts, a0.v3_splits,
      a0.v3_steps, ctas, sms, us_nf4, lt.v3_4, lt.v3_8, lt.v3_256, lt.v3_prefetch, lt.tiled,
      lt.rows64, lt.rows128, lt.rows512,
      (long long)(numel / 2), kTimelineCtas,
      kTimelineSlots, v4 ? std::max(1, (int)a0.v4_kparts) : 1);
  return 0;
}
