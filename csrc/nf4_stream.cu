// The small-M NF4 matmul fed by the copy engine (v4, sm_90): one CTA per SM, one warp that
// streams the weight into a ring of shared-memory stages with tensor-map copies (TMA), 16 warps
// that decode from the ring.
//
// Why: v3's warps load the weight into registers, so an SM has at most 64 KB in flight (its
// registers), the loads wait for the decode and the decode for the loads, and a call's CTAs
// begin streaming only after x is staged. Runs 112-121 measured ~5.5 us per call besides the
// bytes and the bytes at ~62% of copy speed. Here the ring gets its first window as soon as
// the CTA starts, before the PDL wait when the weight is frozen (generate), and the rest once
// the scales are in place (their loads would otherwise queue behind it), so the table build
// and the scales overlap the weight's first bytes.
//
// Work split: CTA c takes 16-row tiles [c T / G, (c + 1) T / G) of the T = ceil(N / 16) (G
// CTAs, at most v4_max_tiles each) and the whole K range. K goes in windows of 1024 values (16
// steps of 64, one quantisation block each): a stage is the CTA's rows x one window, copied
// as four boxes of rows x 128 bytes by the tensor-map copy (one instruction each: per-row bulk
// copies cost ~34 ns apiece in run 123, so a call's ~400 of them were most of its time), and
// the window's x, all M tokens, one more box (x's tensor map: encode_x_map). The boxes use the
// 128-byte swizzle, so the 8 rows a load instruction reads fall in different banks. Consumer
// warp w (of 16) takes step w of every window for all of the CTA's tiles, two tiles at a time:
// its x fragment is read once per window and serves every tile. The scales of the CTA's rows
// are loaded once, at the start, and decoded into shared memory as float32. At the end the
// warps' sums are added in shared memory in warp order (deterministic).
//
// x in the stages (runs 151-156): until run 150 each CTA staged all of x in its prologue
// (after the PDL wait, up to 96 KB), which took 0.9-2.5 us of it, left less room for the ring
// and kept M = 7, 8 of 14336 -> 4096 off v4. With x copied per window beside the weight, a
// call at M = 8 took 14.8 instead of 17.8 us at 4096 -> 14336 and 17.2 instead of 26.2 (v3)
// at 14336 -> 4096; M = 1 at 4096 -> 14336 2% longer (14.5 vs 14.2: the conversion below in
// the loop; run 161).
//
// M = 9..16 (runs 157-161): two token tiles (NT 2) of the mma, whose lookups serve both, with
// two warps per step (4096 -> 14336 22.4 us at M = 16 vs v3h's 29.3). bf16 x there comes to
// the kernel in fp16 (v4_x_half_kernel, a power of two per token; run 240: 4096 -> 14336 at
// M = 9..16 17.8-18.7 us vs 20.3-21.9 with runs 208-209's bf16 mma of x as it is against each
// level's two bf16 parts, 14336 -> 4096 22.7-24.4 vs 24.9-25.8, 4096 -> 4096 10.4-11.0 vs
// 11.1-12.0, 4096 -> 1024 7.7-7.9 vs 7.8-8.4). At M = 2..8 the same was slower (the convert
// kernel's ~1 us in series; 4096 -> 1024 5.7-6.5 vs 5.0-5.5 us), so x is converted in the
// loop there.
//
// Two other forms: SPLIT 2, two warps per step with every other tile each, in 512-value
// windows (half the stage), for CTAs whose 1024-value stages do not fit two; KPARTS 2, a
// cluster of two CTAs (grid.y) per row group, each with half of the windows, the second
// adding its sums into the first's shared memory (distributed shared memory, in part order:
// deterministic), where the output is narrower than the input (the plan's order:
// nf4_gemv_v4_plan). Runs 144-149, 158-160.
//
// Numerics as v3 (see nf4_kernels.cuh) but for bf16 x's scaling: fp16 levels from the same
// level-pair table (byte -> fp16x2, 32 copies, entries 256 bytes apart), fp16 mma, the step's
// float32 scale applied to the float32 sum of its 4 mma; bf16 x times a power of two per token
// and step (the token's largest |x| of the step in [2^14, 2^15); v3: of the whole row), undone
// on the step's sums; at two token tiles per token over the whole row (v4_x_half_kernel),
// undone on its final sums. The k permutation of v3: lane (g, t) holds values 16t .. 16t + 15
// of a step.
#include <cstdlib>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "nf4_kernels.cuh"

namespace fastft {
namespace {

constexpr int kV4Consumers = 16;  // decoding warps (one step of each window each); then the copy warp
constexpr int kV4Threads = (kV4Consumers + 1) * 32;
constexpr int kV4ConsumerThreads = kV4Consumers * 32;
// Values per row of a stage: 1024 (four 128-byte boxes), or 512 where the CTA's tiles are
// split between two warps per step ("split" 2: half the stage, for rings that need the room).
__host__ __device__ constexpr int v4_window(int split) { return kV4Consumers * kV3Step / split; }
constexpr int kV4AnchorBytes = 128;  // the static part of the shared memory (see the kernel)
constexpr int kV4MaxStages = 32;
// The most tiles a CTA takes: 8 per warp of a step (its sums in registers: 8 tiles x 4 at one
// token tile, 4 x 8 at two), so 16 with two warps per step at one token tile (a box's rows:
// <= 256; e.g. 3584 -> 18944, 9 tiles per CTA on 132 SMs), else 8.
__host__ __device__ constexpr int v4_max_tiles(int split, int nt) {
  return split == 2 && nt == 1 ? 16 : 8;
}
constexpr int kV4MaxSmem = 227 * 1024;  // an sm_90 CTA's most shared memory (static + dynamic)
constexpr int kV4TableSpan = 256 * 256;
constexpr int kV4Misc = 2048;  // code2 [256] floats, then the barriers
constexpr int kV4MaxBoxSteps = 256;  // a tensor-map box's most elements in a dimension
// The CTA loads its scales in units of 8 bytes, or of 4 where a row's nested scales are not
// whole 8-byte units (e.g. 11008 or 8960 features: 172 / 140 bytes; the kernels' UNIT), so a
// row's (and a K part's) scales must be whole units at unit-aligned addresses
// (v4_scale_unit, nf4_gemv_v4_plan)
constexpr int kV4ScaleUnitBytes = 8;

// A scale unit's 32-bit words
__device__ __forceinline__ void unit_words(uint2 v, uint32_t (&words)[2]) {
  words[0] = v.x;
  words[1] = v.y;
}
__device__ __forceinline__ void unit_words(uint32_t v, uint32_t (&words)[1]) { words[0] = v; }

// Where everything lies in the dynamic shared memory (computed alike on the host and the GPU).
// kparts: the K parts of a row group (1, or 2: a cluster of two CTAs, each with its half of the
// windows, the second adding its sums into the first's shared memory); groups: CTAs per part.
struct V4Layout {
  int KB;          // steps (of 64 values) per row
  int KS;          // scales per row (K >> bs_log2)
  int part_windows;  // windows of the first K part (the most any part takes)
  int KBc;         // steps of the first K part (the most any CTA stages)
  int tmax;        // the most tiles a CTA takes
  // The CTA's scales as float32, in holes of 32 words, holes_row per row: hole h at
  // scales_at + h * hole_stride. In the level-pair table's 256 holes (the second 128 bytes of
  // each 256-byte entry) where they fit, else in an area of their own after absmax2 (packed,
  // 128 bytes apart), which takes room from the ring.
  int holes_row;
  uint32_t scales_at, hole_stride;
  // a stage: the weight's window (stage_w bytes: 4 or 2 boxes of rows x 128 bytes), then x's
  // (the window's steps x M tokens x 128 bytes) unless x_whole
  uint32_t a2_area, sums_in, ring, stage_w, stage_bytes;
  // x_whole (M = 1, the part's steps one box: at most 256): all of the part's x in one copy,
  // before the ring (x_area: a 128-byte row per step, swizzled as in a stage), converted once
  // (bf16 times a power of two per step, whose undo factor is x_factors' float of the step),
  // and none in the stages
  bool x_whole;
  uint32_t x_factors, x_area;
  // one: the kernel for M = 1 (ONE) is asked for (a compile-time false in the other kernels)
  __host__ __device__ V4Layout(const NF4GemvArgs& a, const NF4Weight& w, int groups, int split,
                               int kparts, bool one) {
    KB = a.K / kV3Step;
    KS = a.K >> w.bs_log2;
    const int window_steps = v4_window(split) / kV3Step;
    part_windows = kparts == 1 ? 0 : ((KB + window_steps - 1) / window_steps + kparts - 1) / kparts;
    KBc = kparts == 1 ? KB : min(KB, part_windows * window_steps);
    tmax = ((a.N + 15) / 16 + groups - 1) / groups;
    auto up = [](int64_t v, int64_t to) { return (uint32_t)((v + to - 1) / to * to); };
    a2_area = kV4TableSpan + kV4Misc;
    // nested: the absmax2 entries of the CTA's scales (see the kernel), with room to spare
    const int64_t a2_bytes = w.nested ? 4 * ((((int64_t)tmax * 16 * KS) >> w.bs2_log2) + 8) : 0;
    holes_row = (KBc + 31) / 32;
    const int64_t holes = (int64_t)tmax * 16 * holes_row;
    uint32_t after_scales = up(a2_area + a2_bytes, 16);
    if (holes <= 256) {
      scales_at = 128u;
      hole_stride = 256u;
    } else {
      scales_at = after_scales;
      hole_stride = 128u;
      after_scales = up(after_scales + holes * 128, 16);
    }
    // kparts 2: the second part's sums [row][token] (float32), written by that CTA
    sums_in = kparts == 1 ? 0 : after_scales;
    const int64_t sums_in_bytes = (int64_t)tmax * 16 * a.M * 4;
    int64_t before_ring = kparts == 1 ? (int64_t)after_scales : sums_in + sums_in_bytes;
    x_whole = one && KBc <= kV4MaxBoxSteps;
    x_factors = x_area = 0;
    if (x_whole) {
      x_factors = up(before_ring, 16);
      x_area = up(x_factors + 4 * KBc, 1024);  // (the 128-byte swizzle's 1 KB alignment)
      before_ring = x_area + 128 * KBc;
    }
    ring = up(before_ring, 1024);
    stage_w = (uint32_t)(tmax * 16 * (v4_window(split) / 2));
    stage_bytes = stage_w + (x_whole ? 0u : (uint32_t)(window_steps * a.M * 128));
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The weight row that mma row r (0..7) of a tile's half reads: r ^ 4 for odd r (0, 5, 2, 7, 4,
// 1, 6, 3; rows r + 8 read + 8), its own inverse. A half-warp's weight words (LDS.64, lanes
// g = 0..3 or 4..7: mma rows g and g + 8) then come from one row of each pair {2k, 2k + 1},
// whose step chunks the 128-byte swizzle (chunk ^ row) puts in 8 different chunks; rows 2k and
// 2k + 1 share a chunk pair, so with the weight row = the mma row every weight load took 4
// wavefronts instead of 2 (run 185: 2 excess per execution on each LDS.64). And cta_sum's
// reads stay conflict-free at M = 8 and 16 (4 and 2 consecutive rows a warp: mma rows of
// distinct banks), which the map before (0, 2, 4, 6, 1, 3, 5, 7) made 2-way.
__device__ __forceinline__ int v4_row_swap(int r) { return r ^ ((r & 1) << 2); }
// Where 16-byte chunk c of row r of a box (128-byte rows) lies in its row under the tensor
// maps' 128-byte swizzle: chunk c ^ (r & 7)
__device__ __forceinline__ uint32_t swizzled_chunk(uint32_t r, uint32_t c) {
  return (c ^ (r & 7u)) << 4;
}

// v as changed here, for the compiler's middle end: a loop's lane constants so marked at the
// top of each pass stay values carried by the loop instead of being formed again inside it
// from %tid and the parameters (ptxas 13.0, nested bf16: the window loop at two token tiles
// 354 instructions a window instead of 384, at M = 2..8 666 instead of 687, at M = 1 476
// instead of 489; runs 284, 286). It emits nothing, so ptxas may still form them again where
// registers run short (a shuffle that hides the value from ptxas too took the two-token loop
// to 330 but spilled more; its build, with other changes, was not faster: run 285).
template <typename V>
__device__ __forceinline__ void loop_carried(V& v) {
  asm volatile("" : "+r"(v));
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, unsigned parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// The box of `map` at (column byte c0, row r0) to shared `dst` (1 KB aligned); the barrier's
// transaction count drops by the box's bytes when it has landed (rows past N read as zeros).
__device__ __forceinline__ void box_copy(uint32_t dst, const CUtensorMap* map, int c0, int r0,
                                         uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
// Where the kernels' static anchor (the level-pair table's start) lies in a CTA's shared
// window: after the 1 KB the GPU reserves (ptxas 13.0 for sm_90: the symbol's offset 0x400, the
// CTA's cluster rank in the address's top byte). The 2-tile loop checks it before it runs.
constexpr uint32_t kV4AnchorAt = 0x400;
// The fp16x2 level pair of byte J of `word` (v3_pair's), for lane_hi = lane * 4 | the table's
// address less kV4AnchorAt (zero low 16 bits): the byte permute forms [lane * 4, byte J, the
// address's top bytes] and the load adds kV4AnchorAt as its immediate, so there is no add per
// lookup (ptxas, given v3_pair's form in a loop sized for 2 tiles, kept the table's address in
// a vector register and added it before every lookup: 32 more instructions a 2-tile window).
template <int J>
__device__ __forceinline__ uint32_t v4_pair(uint32_t word, uint32_t lane_hi) {
  uint32_t v;
  asm("ld.shared.b32 %0, [%1+%2];\n"
      : "=r"(v)
      : "r"(__byte_perm(word, lane_hi, 0x7604 | (J << 4))), "n"(kV4AnchorAt));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
// the consumer threads only (the copy warp may be waiting on a barrier)
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kV4ConsumerThreads) : "memory");
}
// The address in the cluster's shared memory of the CTA `rank`'s copy of local address `addr`
__device__ __forceinline__ uint32_t cluster_addr(uint32_t addr, unsigned rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
#endif

// m[0]: the weight in boxes of tmax * 16 rows, m[1]: of (tmax - 1) * 16 rows (CTAs with one
// tile less); x: x as [step][token][64 values], a box per window
struct V4Maps {
  CUtensorMap m[2];
  CUtensorMap x;
};

// NT: token tiles of 8 (mma n), 2 for M = 9..16 (then SPLIT 2: a warp's 4 tiles x 8 sums).
// ONE: M = 1, where only the mma's column 0 is a token: bf16 x's factor is one number per warp
// step, folded into the row scales once per window instead of into each tile's sums, and the
// other columns' sums are not formed (per tile 8 fewer FMUL / FFMA / FADD of the loop's ~75).
// And x comes in one copy for the whole part (V4Layout::x_whole), converted to fp16 once,
// every quad of the CTA a step at a time, before the loop: in the loop a warp converted its
// step's x in the 4 lanes of token 0, with the other 28 idle (ptxas: the window loop of the
// nested bf16 one-part kernel 430 instructions with this, 516 without).
// UNIT: the scales' load unit in bytes (kV4ScaleUnitBytes; 4 only with NESTED).
template <bool NESTED, typename T, int SPLIT, int KPARTS, int NT, bool ONE, int UNIT>
__global__ void __launch_bounds__(kV4Threads, 1)
    nf4_gemv_v4_kernel(const NF4Weight w, const NF4GemvArgs a, const __grid_constant__ V4Maps maps,
                       const NF4LowRank lr, const int probe) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The table is addressed from a static array (its address folds into each lookup's LDS as
  // a constant; from the dynamic array's base ptxas added a register per lookup, run 127),
  // across into the dynamic shared memory that follows it: `smem` covers both.
  __shared__ __align__(1024) unsigned char smem[kV4AnchorBytes];
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  if (smem_addr(dynamic_smem) != smem_addr(smem) + kV4AnchorBytes) __trap();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int N = a.N, K = a.K, M = ONE ? 1 : a.M;  // (ONE kernels run only where a.M is 1: x_whole)
  const V4Layout L(a, w, (int)gridDim.x, SPLIT, KPARTS, ONE);
  constexpr int kWindow = v4_window(SPLIT), kWindowBytes = kWindow / 2;
  constexpr int kBoxes = kWindowBytes / 128, kSteps = kWindow / kV3Step;  // per window
  // grid (row groups, K parts): the row group's tiles, this part's windows [w_begin, w_end)
  const int tiles_total = (N + 15) / 16, G = (int)gridDim.x;
  const int tile0 = (int)((int64_t)blockIdx.x * tiles_total / G);
  const int tiles = (int)((int64_t)(blockIdx.x + 1) * tiles_total / G) - tile0;
  const int row0 = tile0 * 16;
  const int rows = min(N - row0, tiles * 16);  // rows of the weight in this CTA
  const int part = KPARTS == 1 ? 0 : (int)blockIdx.y;
  const int w_begin = part * L.part_windows;
  const int windows = KPARTS == 1 ? (K + kWindow - 1) / kWindow
                                  : min(L.part_windows, (K + kWindow - 1) / kWindow - w_begin);
  const int step0 = w_begin * kSteps;                          // the part's first step
  const int steps = KPARTS == 1 ? L.KB : min(L.KB - step0, L.part_windows * kSteps);
  const int S = a.v4_stages;
  if (ONE && !L.x_whole) __trap();  // (the launch takes ONE only where x is one box)
  const uint32_t box_bytes = (uint32_t)tiles * 16u * 128u;  // one box; a stage holds kV4Boxes

  // bf16 x at two token tiles comes as fp16, each token times a power of two
  // (v4_x_half_kernel), its factor (a.x_undo) undone on its sums in the epilogue
  constexpr bool kXHalf = std::is_same<T, __nv_bfloat16>::value && NT == 2;
  constexpr bool kXBf16 = std::is_same<T, __nv_bfloat16>::value && !kXHalf;  // x as bf16
  const uint32_t table = smem_addr(smem);
  float* code2_s = reinterpret_cast<float*>(smem + kV4TableSpan);
  const uint32_t full0 = smem_addr(code2_s + 256);  // full[s] at full0 + 8 s: slot s has landed
  const uint32_t empty0 = full0 + 8 * kV4MaxStages;  // the consumers are done with slot s
  const uint32_t scales_ready = empty0 + 8 * kV4MaxStages;  // the scales are in place
  const uint32_t sums_in_full = scales_ready + 8;  // (K parts) the second part's sums have arrived
  const uint32_t x_full = sums_in_full + 8;  // (ONE) the part's x has landed
  const uint32_t ring = table + L.ring;

  // The prologue, in as few global round trips as possible (run 132: the prologue and
  // epilogue alone took 7.1 us of the 15.7 us call, as long as the weight's copies, in four
  // dependent rounds: the levels, the scales, absmax2, x). Now one round for the levels,
  // code2, absmax2 and the first scales (all loads issued before any store), one for x.
  constexpr int kScaleBytes = NESTED ? 1 : 4;
  // 8-byte units: a row's scales are whole units where the row has a multiple of 8 bytes of
  // them (e.g. 18944 or 3584 features, nested: 296 / 56 bytes), which 16-byte units were not;
  // 4-byte units (UNIT 4, nested) where it has a multiple of 4 only
  static_assert(UNIT == 8 || (UNIT == 4 && NESTED), "8-byte units, or 4 for nested scales");
  using Unit = typename std::conditional<UNIT == 8, uint2, uint32_t>::type;
  constexpr int kScalesPerUnit = UNIT / kScaleBytes;
  // units of scales a thread holds in registers: 32 bytes, as 4 8-byte units (run 165: 8 such
  // made the decode-like up / down chain at M = 16 29.9 us per call, 4 26.0; main then 28.1,
  // nested: the unrolled decode); 64 bytes of float32 scales, which need no decode: a CTA's
  // are 4x the nested bytes (28 KB at 4096 -> 14336), and each batch beyond the first costs a
  // round trip (runs 205-206, float32 scales at 4096 -> 14336, M = 1: 15.2 us with 32-byte
  // batches, 13.4 with 64; nested 13.0)
  constexpr int kScaleBatch = (NESTED ? 32 : 64) / UNIT;
  const int64_t blk0 = (int64_t)row0 * L.KS;  // the CTA's first quantisation block
  // the CTA's absmax2 entries: a2_count from a2_first (nested only); blk_rel0: blk0 counted
  // from a2_first's first block, so the loop's absmax2 indices are 32-bit
  const int64_t a2_first = NESTED ? (blk0 >> w.bs2_log2) : 0;
  const int a2_count =
      NESTED ? (int)(((blk0 + (int64_t)rows * L.KS - 1) >> w.bs2_log2) + 1 - a2_first) : 0;
  const int blk_rel0 = NESTED ? (int)(blk0 - (a2_first << w.bs2_log2)) : 0;
  const int units_row = L.KS / kScalesPerUnit;  // a row's scales in units
  const int steps_log2 = w.bs_log2 - 6;  // steps (of 64 values) per quantisation block
  // this K part's scales of a row: blocks from blk_part0, units_part units from unit_part0
  // (the plan checks that they are whole units)
  const int blk_part0 = KPARTS == 1 ? 0 : step0 >> steps_log2;
  const int units_part = KPARTS == 1 ? units_row : (steps >> steps_log2) / kScalesPerUnit;
  const int unit_part0 = KPARTS == 1 ? 0 : blk_part0 / kScalesPerUnit;
  const int scale_units = rows * units_part;
  const Unit* scales = reinterpret_cast<const Unit*>(static_cast<const uint8_t*>(w.absmax) +
                                                     blk0 * kScaleBytes);
  // The order the consumers take the units in: place(i) for i = tid, tid + 512, ... A
  // unit's k-th scale goes to bank (its first block + its row + k) % 32 (the holes below), so
  // 32 lanes on consecutive units of a row (8 scales each) met 4 banks: 8-way conflicts at
  // 14336 -> 4096 (28 units a row), 2-way at 4096 -> 14336 (8), and the scales' decode
  // took ~0.9 us of a 14336 -> 4096 call (run 264: 12.8 vs 13.7 us without it). Where the
  // blocks are 64 values (one step a scale), a warp takes kGroupRows rows x kGroupUnits units
  // (row fastest) instead: 32 banks. (Its loads: 8-byte units in 32-byte row pieces, the same
  // sectors as before.) Run 265: 14336 -> 4096 M = 1 13.28 vs 13.64 us, other calls level.
  constexpr int kGroupRows = kScalesPerUnit, kGroupUnits = 32 / kScalesPerUnit;
  // (probe 17: the old order, for comparison)
  const bool units_spread = steps_log2 == 0 && units_part % kGroupUnits == 0 &&
                            rows % kGroupRows == 0 && probe != 17;
  // Place i: spread, i = 32 g + lane (g: its warp group) takes row q * kGroupRows + lane %
  // kGroupRows and unit (g - q * groups_band) * kGroupUnits + lane / kGroupRows of it, q =
  // g / groups_band (groups_band = units_part / kGroupUnits: a band's warp groups); else row
  // q = i / units_part, unit i - q * units_part. One division either way, by a float product
  // within one of the quotient (i < 2^22), as the old order's; the parameters of the two:
  const int place_shift = units_spread ? 5 : 0;
  const int place_div = units_spread ? units_part / kGroupUnits : units_part;
  const float place_inv = 1.f / (float)place_div;
  const int place_row_mul = units_spread ? kGroupRows : 1;
  const int place_row_add = units_spread ? lane % kGroupRows : 0;
  const int place_unit_mul = units_spread ? kGroupUnits : 1;
  const int place_unit_add = units_spread ? lane / kGroupRows : 0;
  // (each place is computed once: kept from its unit's load to its decode)
  struct Place {
    int r, u;  // unit u of row r's part
  };
  auto place = [&](int i) {
    const int n = i >> place_shift;
    int q = __float2int_rz(__int2float_rn(n) * place_inv);
    q -= q * place_div > n ? 1 : 0;
    q += (q + 1) * place_div <= n ? 1 : 0;
    return Place{q * place_row_mul + place_row_add,
                 (n - q * place_div) * place_unit_mul + place_unit_add};
  };
  auto scale_at = [&](Place p) {  // the unit in global memory
    return scales + (p.r * units_row + unit_part0 + p.u);  // (one 64-bit add)
  };
  float* a2_s = reinterpret_cast<float*>(smem + L.a2_area);
  float level_hi = 0.f, level_lo = 0.f, code2_v = 0.f, a2_v = 0.f, offset = 0.f;
  Unit scale_v[kScaleBatch];
  Place place_v[kScaleBatch];
  auto load_prologue = [&]() {
    if (NESTED) offset = __ldg(w.offset);
    if (tid < 256) {
      level_hi = __ldg(w.code + (tid >> 4));
      level_lo = __ldg(w.code + (tid & 15));
      if (NESTED) code2_v = __ldg(w.code2 + tid);
    }
    if (NESTED && tid < a2_count) a2_v = __ldg(w.absmax2 + a2_first + tid);
#pragma unroll
    for (int k = 0; k < kScaleBatch; ++k)
      if (tid + k * kV4ConsumerThreads < scale_units) {
        place_v[k] = place(tid + k * kV4ConsumerThreads);
        scale_v[k] = __ldg(scale_at(place_v[k]));
      }
  };
  // With the weight frozen the consumers issue these loads first thing, before the barriers
  // are made (their round trip is the prologue's longest step: the scales come from DRAM
  // while the other SMs stream), else after the PDL wait. Run 255, M = 1, timeline: the
  // table complete 2.11 us after the CTA's start at 4096 -> 14336, 2.72 with the loads after
  // the barriers (probe 9); bench/nf4_small_m.py against main: 14336 -> 4096 13.5 vs 14.6 us,
  // 4096 -> 4096 6.5-6.7 vs 7.3, the up / down chain 12.4-12.6 vs 13.1.
  const bool early_loads = a.weights_frozen && probe != 9;

  NF4_MARK(tid == 0, kTimelineStartNs);  // (bench/nf4_timeline.cu only)
  NF4_MARK(tid == 0, kTimelineSm);
  NF4_MARK(tid == 0, kTimelineStart);
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kV4Consumers);
    }
    mbar_init(scales_ready, kV4Consumers);
    if (KPARTS > 1) mbar_init(sums_in_full, kV4Consumers);
    if (ONE) mbar_init(x_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (early_loads && warp < kV4Consumers) load_prologue();
  __syncthreads();
  // K parts: every thread arrives here, once this CTA's barriers exist, and waits (long since
  // complete) before it leaves: the second part's before it arrives on the first part's barrier
  if (KPARTS > 1) asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  NF4_MARK(tid == 0, kTimelineExtra + 0);  // every warp has started

  if (warp == kV4Consumers) {
    // ---- the copy warp (one lane): window j (the weight's and x's) into slot j % S once the
    // 16 consumers have released the slot's previous window. The first window's weight before
    // the PDL wait when the weight is frozen; x always after it.
    if (!a.weights_frozen) gemv_wait_for_previous();
    else if (lane == 0) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    if (lane == 0) {
      const CUtensorMap* map = &maps.m[tiles == L.tmax ? 0 : 1];
      for (int j = 0; j < windows; ++j) {
        const int s = j % S;
        // One window, then the rest only once the scales are in place: the scales' loads
        // would otherwise queue behind the whole ring's (run 132: M = 4 from 18.2 to 16.9 us
        // at 4096 -> 14336, then with x staged in the prologue too). (probe 4: no hold, for
        // comparison)
        if (j == 1 && probe != 1 && probe != 4) mbar_wait(scales_ready, 0u);
        if (j >= S) mbar_wait(empty0 + 8 * s, (unsigned)(j / S - 1) & 1u);
        const uint32_t dst = ring + (uint32_t)s * L.stage_bytes, bar = full0 + 8 * s;
        if (probe == 3 || probe == 5) {  // (probes: no copies)
          mbar_arrive(bar);
          if (ONE && j == 0) mbar_arrive(x_full);
          continue;
        }
        // (box_bytes: this CTA's rows, which may be a tile fewer than the stage has room for)
        mbar_expect_tx(bar, kBoxes * box_bytes + (L.stage_bytes - L.stage_w));
        for (int k = 0; k < kBoxes; ++k)
          box_copy(dst + k * box_bytes, map, (w_begin + j) * kWindowBytes + 128 * k, row0, bar);
        if (j == 0 && a.weights_frozen) asm volatile("griddepcontrol.wait;\n" ::: "memory");
        if (ONE) {  // the part's x, once: values 0..63, token 0, the part's steps
          if (j == 0) {
            mbar_expect_tx(x_full, 128u * (uint32_t)L.KBc);
            asm volatile(
                "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
                "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(table + L.x_area),
                "l"(reinterpret_cast<uint64_t>(&maps.x)), "r"(0), "r"(0), "r"(step0),
                "r"(x_full)
                : "memory");
          }
          continue;
        }
        // x's box: values 0..63, tokens 0..M-1, the window's steps
        asm volatile(
            "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
            "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst + L.stage_w),
            "l"(reinterpret_cast<uint64_t>(&maps.x)), "r"(0), "r"(0), "r"((w_begin + j) * kSteps),
            "r"(bar)
            : "memory");
      }
    }
    __syncwarp();
    if (KPARTS > 1) asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    return;
  }

  // ---- the consumers
  if (!a.weights_frozen) gemv_wait_for_previous();
  NF4_MARK(tid == 0 && !a.weights_frozen, kTimelineWaited);
  if (probe == 1) {  // (probe: the copies alone)
    for (int j = 0; j < windows; ++j) {
      mbar_wait(full0 + 8 * (j % S), (unsigned)(j / S) & 1u);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * (j % S));
    }
    if (ONE) mbar_wait(x_full, 0u);
    if (KPARTS > 1) asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    return;
  }
  if (!early_loads) load_prologue();
  if (tid < 256) {  // the level-pair table as v3's
    v3_store_level_pair(table, tid, level_hi, level_lo);
    if (NESTED) code2_s[tid] = code2_v;
  }
  NF4_MARK(tid == 0, kTimelineExtra + 1);  // this thread's levels have arrived
  if (NESTED) {
    if (tid < a2_count) a2_s[tid] = a2_v;
    for (int i = tid + kV4ConsumerThreads; i < a2_count; i += kV4ConsumerThreads)
      a2_s[i] = __ldg(w.absmax2 + a2_first + i);
  }
  consumers_sync();  // code2 and absmax2 in place
  NF4_MARK(tid == 0, kTimelineExtra + 2);

  // Every scale of the CTA as float32 into its holes (V4Layout: the table's, or an area of
  // their own): row r's step b at hole r * holes_row + b / 32, word (b + r) % 32, so the 16
  // rows a window's lanes read fall in 16 banks, and the window loop reads one word per scale
  // (a nested scale costs 3 lookups and an absmax2 index).
  const int holes_row = L.holes_row;
  const uint32_t scales_at = L.scales_at, hole_stride = L.hole_stride;
  auto hole_at = [&](int r, int b) -> uint32_t {  // the hole's first byte
    return (uint32_t)(r * holes_row + (b >> 5)) * hole_stride + scales_at;
  };
  auto hole_word = [&](int r, int b) -> uint32_t {
    return hole_at(r, b) + 4u * (uint32_t)((b + r) & 31);
  };
  // Every scale of the unit first, then the stores: the compiler cannot tell the stores from
  // code2_s / a2_s, so a load after a store waits for it; and the common blocksize (64: one
  // step per scale) takes straight-line stores. (A loop per scale made this ~2.2 us of the
  // prologue at 4096 -> 14336, run 141: ~1000 instructions per unit; ~180 until run 255, ~90
  // since, with one absmax2 entry per unit and no integer division: the step took 0.94
  // instead of 1.05 us there, as it mostly waits for the scales' loads.)
  auto scales_to_holes = [&](Place p, Unit v) {  // the unit's UNIT bytes, of row p.r
    const int r = p.r, u = p.u;
    const int bs0 = u * kScalesPerUnit;
    // the unit's absmax2 entry: one for all of its blocks, as the first is a multiple of
    // kScalesPerUnit (rows and K parts are whole units) and an entry spans 8 or more blocks
    // (the plan; bitsandbytes': 256)
    const int unit_block = blk_rel0 + r * L.KS + blk_part0 + bs0;
    const float a2 = NESTED ? a2_s[unit_block >> w.bs2_log2] : 0.f;
    uint32_t words[UNIT / 4];
    unit_words(v, words);
    float sc[kScalesPerUnit];
#pragma unroll
    for (int k = 0; k < kScalesPerUnit; ++k) {
      if (NESTED) {
        const int q = (words[k >> 2] >> (8 * (k & 3))) & 0xFF;
        sc[k] = __fadd_rn(__fmul_rn(code2_s[q], a2), offset);
      } else {
        sc[k] = __uint_as_float(words[k]);
      }
    }
    if (steps_log2 == 0) {
      // b = bs0 + k: one hole for the unit (bs0 a multiple of kScalesPerUnit, a power of two
      // up to 8, so b / 32 = bs0 / 32), words
      // (bs0 + r + k) % 32 of it
      const uint32_t hole = hole_at(r, bs0);
#pragma unroll
      for (int k = 0; k < kScalesPerUnit; ++k)
        *reinterpret_cast<float*>(smem + hole + 4u * ((uint32_t)(bs0 + r + k) & 31u)) = sc[k];
    } else {
#pragma unroll
      for (int k = 0; k < kScalesPerUnit; ++k)
        for (int b = (bs0 + k) << steps_log2; b < (bs0 + k + 1) << steps_log2; ++b)
          *reinterpret_cast<float*>(smem + hole_word(r, b)) = sc[k];
    }
  };
#pragma unroll
  for (int k = 0; k < kScaleBatch; ++k)
    if (tid + k * kV4ConsumerThreads < scale_units)
      scales_to_holes(place_v[k], scale_v[k]);
  for (int i = tid + kScaleBatch * kV4ConsumerThreads; i < scale_units; i += kV4ConsumerThreads) {
    const Place p = place(i);
    scales_to_holes(p, __ldg(scale_at(p)));
  }
  NF4_MARK(tid == 0, kTimelineTable);

  consumers_sync();  // the table and the scales' holes complete
  if (lane == 0) mbar_arrive(scales_ready);
  NF4_MARK(tid == 0, kTimelineStaged);
  // (y may be read by the kernel before; xa is written by it: the first K part adds the term)
  if (a.weights_frozen) gemv_wait_for_previous();
  NF4_MARK(tid == 0 && a.weights_frozen, kTimelineWaited);
  if (lr.xa && part == 0) lora_prefetch<T>(a, lr, row0, rows);
  const int g = lane >> 2, t = lane & 3;
  float* x_factors = reinterpret_cast<float*>(smem + L.x_factors);
  if (ONE) {
    // The part's x into fp16 in place: quad (warp, g) takes steps 8 warp + g + 128 i, lane t
    // values 16t .. 16t + 15 (16-byte chunks 2t and 2t + 1 of the step's swizzled row), with
    // the factor of the loop's conversion (see there). Rounds are warp-uniform (shuffles).
    mbar_wait(x_full, 0u);
    NF4_MARK(tid == 0, kTimelineExtra + 3);  // the part's x has landed
    if (kXBf16) {
      for (int first = warp * 8; first < steps; first += kV4Consumers * 8) {
        const int b = first + g;
        const uint32_t row = table + L.x_area + 128u * (uint32_t)b;
        const uint32_t at0 = row + swizzled_chunk((uint32_t)b, 2u * t);
        const uint32_t at1 = row + swizzled_chunk((uint32_t)b, 2u * t + 1u);
        uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0;
        if (b < steps) {
          x0 = lds128(at0);
          x1 = lds128(at1);
        }
        uint32_t mx = max(bf16x8_max_abs_bits(x0), bf16x8_max_abs_bits(x1));
        mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const int shift = x_scale_shift(mx);
        if (b < steps) {
          v3_store16(at0, bf16x8_scaled_to_fp16(x0, shift));
          v3_store16(at1, bf16x8_scaled_to_fp16(x1, shift));
          if (t == 0) x_factors[b] = pow2f(-shift);
        }
      }
      consumers_sync();  // every step converted
      NF4_MARK(tid == 0, kTimelineExtra + 4);
    }
  }
  const int wr = v4_row_swap(g);  // the weight rows of mma rows g, g + 8: wr, wr + 8
  const uint32_t lane4 = (uint32_t)lane * 4u;
  // The warp's step of each window (wstep) and its tiles: the CTA's tiles tfirst + SPLIT i,
  // i < my_tiles (all of them with SPLIT 1).
  constexpr int kWarpMaxTiles = v4_max_tiles(SPLIT, NT) / SPLIT;  // (a warp's, SPLIT 2: half)
  const int wstep = SPLIT == 1 ? warp : warp % kSteps, tfirst = SPLIT == 1 ? 0 : warp / kSteps;
  const int my_tiles = (tiles - tfirst + SPLIT - 1) / SPLIT;
  // This lane's scales in a window: row srow of its tile (lane >> 4) + 2 i, wstep, srow the
  // weight row of mma row lane & 15 (so lanes g and g + 8 hold the scales lane (g, t) needs:
  // rows wr and wr + 8). The rows of i and i + 1 are 32 SPLIT apart, so they share the word
  // (b + row) % 32 and their holes are scale_row_step bytes apart: one address per window,
  // then an add per tile.
  const int srow = v4_row_swap(lane & 15), stile = lane >> 4;
  const int scale_row0 = (tfirst + SPLIT * stile) * 16 + srow;
  const uint32_t scale_at0 = hole_at(scale_row0, 0);
  const uint32_t scale_row_step = (uint32_t)(32 * SPLIT * holes_row) * hole_stride;

  static_assert(NT == 1 || SPLIT == 2, "two token tiles take half a step's tiles per warp");
  static_assert(!ONE || NT == 1, "one token is one token tile");
  // this lane's x in a stage, token tile u: row wstep M + 8u + g of the x box (token 8u + g of
  // step wstep), 16-byte chunks 2t and 2t + 1 (values 16t .. 16t + 15) at their 128-byte
  // swizzle positions
  // (ONE) this lane's x of step b in x_area: x_one0 + 128 b, chunk 2t + 1 at x_one0 ^ 16 + 128 b
  // (b & 7 = wstep & 7: a window's steps are a multiple of 8)
  const uint32_t x_one0 = table + L.x_area + swizzled_chunk((uint32_t)wstep, 2u * t);
  const uint32_t x_row0 = (uint32_t)(wstep * M + g);
  const uint32_t x_at0 = x_row0 * 128u + swizzled_chunk(x_row0, 2u * t);
  // [wstep][tile < tmax][16 mma rows][8 NT tokens] (mma rows, as the warps hold them: in
  // weight rows, lanes g = 0..3 of a half-warp's 8-byte stores would hit rows 0, 2, 4, 6, two
  // banks each, run 195): 8 KB per tile with SPLIT 1 (a stage's weight takes 8 KB per tile, and
  // there are 2 or more stages), 4 NT KB with SPLIT 2 (the weight's 4 KB per tile and a stage's
  // x, 16 KB at NT = 2, in each of 2 or more stages). ONE: token 0's column alone (lanes t = 0),
  // [wstep][tile][16 mma rows], so the 32 rows a warp of cta_sum reads are 32 consecutive
  // words (with 8 columns a row they fell in 4 banks: each of its loads 8-way conflicted)
  constexpr int kRowSums = ONE ? 1 : 8 * NT;  // floats per mma row
  constexpr int kTileSums = 16 * kRowSums;
  float* sums = reinterpret_cast<float*>(smem + L.ring);
  // The window loop, then the warp's sums into `sums`, with arrays and loops for a warp of at
  // most kMyMaxTiles tiles: kWarpMaxTiles, or 2 (one warp per step, one token) where the CTA
  // has at most 2 tiles (14336 -> 4096, 4096 -> 4096, 4096 -> 1024 on 132 SMs).
  // Why the second: with 2 tiles a window, the 8-tile loop spent ~40% of a window's
  // instructions outside the tiles' lookups and mma (run 237: at 14336 -> 4096, M = 1, that
  // loop took 9.2 us a CTA against 7.2 at 4096 -> 14336, the same bytes a CTA, with or without
  // the copies; ptxas, nested bf16, a 2-tile window: one token 199 instructions, 161 sized for
  // 2; M = 2..8 336 and 265). A branch, not a kernel of its own: two v4 kernels taking turns
  // (a model's projections of other shapes) cost ~0.8-2 us a call more than one kernel for
  // all (runs 245-247: the up / down chain at M = 1 14.5 us a call with a kernel of its own for
  // down against 12.7 with one kernel for both). As this branch (run 249, frozen, M = 1, us,
  // against main in the same call): 14336 -> 4096 14.63-14.76 vs 15.56, 4096 -> 4096 7.36-7.48
  // vs 7.66, 4096 -> 1024 4.26-4.29 vs 4.58, the up / down chain 13.08-13.34 vs 13.57.
  auto consume = [&](auto max_tiles) {
    constexpr int kMyMaxTiles = decltype(max_tiles)::value;
    constexpr bool kTwoTiles = kMyMaxTiles == 2 && kWarpMaxTiles != 2;
    const uint32_t lane_hi = lane4 | (table - kV4AnchorAt);  // (kTwoTiles: v4_pair)
    // acc[tile][4u + k]: token tile u's mma sums (rows wr, wr + 8 x tokens 8u + 2t, + 1)
    float acc[kMyMaxTiles][4 * NT];
#pragma unroll
    for (int i = 0; i < kMyMaxTiles; ++i)
#pragma unroll
      for (int k = 0; k < 4 * NT; ++k) acc[i][k] = 0.f;
    // this lane's 8 bytes of step wstep in a row r of a stage: box wstep / 4, then its 16-byte
    // chunk in the swizzled row (r & 7 = wr), from the warp's first tile
    const uint32_t lane_at = (uint32_t)(wstep >> 2) * box_bytes +
                             swizzled_chunk((uint32_t)wr, (uint32_t)(2 * (wstep & 3) + (t >> 1))) +
                             8u * (t & 1) + (uint32_t)(tfirst * 16 + wr) * 128u;
    // One tile's step: 16 level pairs from the table, 4 mma per token tile, the sums scaled into
    // acc. (undo[u][0 / 1]: 1 but for bf16 x at M = 2..8, where they undo the x scaling of tokens
    // 2t / + 1, the sums' columns, folded into the row scales: products formed while the mma
    // run, not after them; run 158: 14336 -> 4096 at M = 8 17.2 vs 18.8 us with the sums
    // multiplied first)
    // At one token tile the 4 mma go in two chains (even and odd q), added before the scaling:
    // in one chain of 4 each mma waited ~24 cycles for the one before (the SASS's stall counts:
    // ~12% fewer per window with two).
    auto tile_step = [&](uint2 lo, uint2 hi, const uint32_t (&xw)[NT][8], float s_lo, float s_hi,
                         const float (&undo)[NT][2], float (&sums)[4 * NT]) {
      uint32_t a[16];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        // mma q: byte 2q of the lane's 8 (values 16t + 4q, +1) and byte 2q + 1 (+2, +3)
        const uint32_t wl = q < 2 ? lo.x : lo.y, wh = q < 2 ? hi.x : hi.y;
        if (kTwoTiles) {
          if (q & 1) {
            a[4 * q + 0] = v4_pair<2>(wl, lane_hi); a[4 * q + 1] = v4_pair<2>(wh, lane_hi);
            a[4 * q + 2] = v4_pair<3>(wl, lane_hi); a[4 * q + 3] = v4_pair<3>(wh, lane_hi);
          } else {
            a[4 * q + 0] = v4_pair<0>(wl, lane_hi); a[4 * q + 1] = v4_pair<0>(wh, lane_hi);
            a[4 * q + 2] = v4_pair<1>(wl, lane_hi); a[4 * q + 3] = v4_pair<1>(wh, lane_hi);
          }
        } else if (q & 1) {
          a[4 * q + 0] = v3_pair<2>(smem, wl, lane4); a[4 * q + 1] = v3_pair<2>(smem, wh, lane4);
          a[4 * q + 2] = v3_pair<3>(smem, wl, lane4); a[4 * q + 3] = v3_pair<3>(smem, wh, lane4);
        } else {
          a[4 * q + 0] = v3_pair<0>(smem, wl, lane4); a[4 * q + 1] = v3_pair<0>(smem, wh, lane4);
          a[4 * q + 2] = v3_pair<1>(smem, wl, lane4); a[4 * q + 3] = v3_pair<1>(smem, wh, lane4);
        }
      }
      constexpr int kChains = NT == 1 ? 2 : 1;  // (two token tiles are two chains already)
      float c[kChains][NT][4];
#pragma unroll
      for (int h = 0; h < kChains; ++h)
#pragma unroll
        for (int u = 0; u < NT; ++u) c[h][u][0] = c[h][u][1] = c[h][u][2] = c[h][u][3] = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int u = 0; u < NT; ++u)
          mma_f16_16816(c[q % kChains][u], a[4 * q], a[4 * q + 1], a[4 * q + 2], a[4 * q + 3],
                        xw[u][2 * q], xw[u][2 * q + 1]);
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        float v[4];  // the chains' sums
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          v[k] = c[0][u][k];
#pragma unroll
          for (int h = 1; h < kChains; ++h) v[k] += c[h][u][k];
        }
        if (ONE) {  // column 0 only; the scales carry x's factor already
          sums[0] = fmaf(s_lo, v[0], sums[0]);
          sums[2] = fmaf(s_hi, v[2], sums[2]);
          continue;
        }
        sums[4 * u + 0] = fmaf(s_lo * undo[u][0], v[0], sums[4 * u + 0]);
        sums[4 * u + 1] = fmaf(s_lo * undo[u][1], v[1], sums[4 * u + 1]);
        sums[4 * u + 2] = fmaf(s_hi * undo[u][0], v[2], sums[4 * u + 2]);
        sums[4 * u + 3] = fmaf(s_hi * undo[u][1], v[3], sums[4 * u + 3]);
      }
    };
    int s = 0;               // the window's slot (j % S) and that slot's use count parity
    unsigned parity = 0u;    // ((j / S) & 1), kept without divisions
    // the loop's lane constants (loop_carried)
    uint32_t at_lane = ring + lane_at;  // this lane's weight words in slot 0
    uint32_t stage_bytes = L.stage_bytes, hole_bytes = hole_stride, scale_lane = scale_at0;
    int scale_row = scale_row0, steps_part = steps;
    int scale_tiles = my_tiles - stile;  // this lane's scale tile i: its tile stile + 2 i
    // x: token tile u's chunk 2t at x_lane + 1024 u, chunk 2t + 1 there ^ 16 (rows 8 apart
    // share their swizzle; stages and x_area are 1 KB aligned)
    uint32_t x_lane = ONE ? x_one0 : L.stage_w + x_at0;
    int lane_g = g, lane_t = t;
    int decode = probe != 2 && probe != 5;  // (probes 2, 5: no decode)
    int b = wstep;  // this warp's step of window j (of the K part): j kSteps + wstep
    for (int j = 0; j < windows; ++j, b += kSteps) {
      loop_carried(at_lane); loop_carried(stage_bytes); loop_carried(hole_bytes);
      loop_carried(scale_lane); loop_carried(scale_row); loop_carried(steps_part);
      loop_carried(scale_tiles); loop_carried(x_lane); loop_carried(lane_g);
      loop_carried(lane_t); loop_carried(decode); loop_carried(b);
      if (b < steps_part && decode) {
        // (bench/nf4_timeline.cu: the window's start, then its landing, per warp)
        NF4_MARK(lane_g + lane_t == 0 && j < kTimelineIters,
                 kTimelineIter + (warp * kTimelineIters + j) * 2);
        float sc[kMyMaxTiles / 2];
        const uint32_t scale_at = scale_lane + (uint32_t)(b >> 5) * hole_bytes +
                                  4u * (uint32_t)((b + scale_row) & 31);
#pragma unroll
        for (int i = 0; i < kMyMaxTiles / 2; ++i)
          sc[i] = 2 * i < scale_tiles
                      ? *reinterpret_cast<const float*>(smem + scale_at + i * scale_row_step)
                      : 0.f;
        mbar_wait(full0 + 8 * s, parity);
        NF4_MARK(tid == 0 && j == 0, kTimelineExtra + 5);  // window 0 has landed
        NF4_MARK(tid == 0 && j == windows - 1, kTimelineExtra + 6);  // the last window too
        NF4_MARK(lane_g + lane_t == 0 && j < kTimelineIters,
                 kTimelineIter + (warp * kTimelineIters + j) * 2 + 1);
        const uint32_t stage = ring + (uint32_t)s * stage_bytes;
        const uint32_t at = at_lane + (uint32_t)s * stage_bytes;
        // this lane's weight words of its tiles `tile` and `tile + 1` (rows wr and wr + 8 of each)
        auto load_pair = [&](int tile, uint2 (&wv)[4]) {
          const uint32_t at0 = at + (uint32_t)(tile * SPLIT * 16) * 128u;
          wv[0] = lds64(at0);
          wv[1] = lds64(at0 + 8u * 128u);
          if (tile + 1 < my_tiles) {
            wv[2] = lds64(at0 + (uint32_t)(SPLIT * 16) * 128u);
            wv[3] = lds64(at0 + (uint32_t)(SPLIT * 16 + 8) * 128u);
          }
        };
        // the pairs' weight words in two buffers, used in turn (a copy from one to the other
        // cost 8 moves per pair in the SASS)
        uint2 wbuf[2][4];
        load_pair(0, wbuf[0]);
        uint32_t xw[NT][8];  // the token tiles' mma b fragments
        float undo[NT][2];    // (bf16) see tile_step
#pragma unroll
        for (int u = 0; u < NT; ++u) {
          uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0;
          if (ONE) {  // converted before the loop: token 0's lanes load it, the scales take its factor
            if (lane_g == 0) {
              x0 = lds128(x_lane + 128u * (uint32_t)b);
              x1 = lds128((x_lane ^ 16u) + 128u * (uint32_t)b);
            }
            undo[u][0] = undo[u][1] = 1.f;
            if (kXBf16) {
              const float undo0 = x_factors[b];
#pragma unroll
              for (int i = 0; i < kMyMaxTiles / 2; ++i) sc[i] *= undo0;
            }
            xw[u][0] = x0.x; xw[u][1] = x0.y; xw[u][2] = x0.z; xw[u][3] = x0.w;
            xw[u][4] = x1.x; xw[u][5] = x1.y; xw[u][6] = x1.z; xw[u][7] = x1.w;
            continue;
          }
          if (8 * u + lane_g < M) {
            x0 = lds128(stage + x_lane + 1024u * u);
            x1 = lds128(stage + ((x_lane + 1024u * u) ^ 16u));
          }
          undo[u][0] = undo[u][1] = 1.f;
          if (kXBf16) {
            // bf16 x into fp16 for the mma, in each warp's own fragments: token g's values of
            // the step (lanes (g, 0..3)) times a power of two 2^shift that puts their largest |x|
            // in [2^14, 2^15) (x_scale_shift: exact unless a value is ~2^31 times smaller than
            // that largest), 2^-shift undone on the mma's sums of that token's column. (Runs
            // 151-155: one converter warp for the whole window was the pipeline's slowest stage,
            // ~1 us per window at 14336 -> 4096, M = 2; bf16 levels would bias each level by up
            // to 2^-9; one factor for all tokens of a step, run 156, loses a token ~2^31 times
            // smaller than another.)
            uint32_t mx = max(bf16x8_max_abs_bits(x0), bf16x8_max_abs_bits(x1));
            mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const int shift = x_scale_shift(mx);
            x0 = bf16x8_scaled_to_fp16(x0, shift);
            x1 = bf16x8_scaled_to_fp16(x1, shift);
            // token g's factor; the sums' columns are tokens 2t, 2t + 1 (lanes 8t, 8t + 4)
            const float token_undo = pow2f(-shift);
            undo[u][0] = __shfl_sync(0xffffffffu, token_undo, 8 * lane_t);
            undo[u][1] = __shfl_sync(0xffffffffu, token_undo, 8 * lane_t + 4);
          }
          xw[u][0] = x0.x; xw[u][1] = x0.y; xw[u][2] = x0.z; xw[u][3] = x0.w;
          xw[u][4] = x1.x; xw[u][5] = x1.y; xw[u][6] = x1.z; xw[u][7] = x1.w;
        }
        // tiles two at a time (two independent chains of lookups and mma for the scheduler to
        // interleave), the odd last one alone (4 tiles at a time spilled: 17 warps leave ptxas
        // 96 registers); the next pair's weight words loaded before this pair's lookups, so
        // their latency is not on the chain
#pragma unroll
        for (int tile = 0; tile < kMyMaxTiles; tile += 2) {
          if (tile >= my_tiles) break;
          uint2 (&cur)[4] = wbuf[(tile >> 1) & 1];
          if (tile + 2 < my_tiles) load_pair(tile + 2, wbuf[((tile >> 1) + 1) & 1]);
          const float lo0 = __shfl_sync(0xffffffffu, sc[tile >> 1], lane_g);
          const float hi0 = __shfl_sync(0xffffffffu, sc[tile >> 1], lane_g + 8);
          const float lo1 = __shfl_sync(0xffffffffu, sc[tile >> 1], 16 + lane_g);
          const float hi1 = __shfl_sync(0xffffffffu, sc[tile >> 1], 24 + lane_g);
          tile_step(cur[0], cur[1], xw, lo0, hi0, undo, acc[tile]);
          if (tile + 1 < my_tiles) tile_step(cur[2], cur[3], xw, lo1, hi1, undo, acc[tile + 1]);
        }
      } else {
        mbar_wait(full0 + 8 * s, parity);
      }
      __syncwarp();
      if (lane_g + lane_t == 0) mbar_arrive(empty0 + 8 * s);
      if (++s == S) {
        s = 0;
        parity ^= 1u;
      }
    }

    NF4_MARK(lane == 0, kTimelineWarpLoopEnd + warp);

    // ---- the warps' sums, added in warp order, over the ring (every copy has landed)
    consumers_sync();  // (then into `sums`, see above)
#pragma unroll
    for (int tile = 0; tile < kMyMaxTiles; ++tile) {
      if (tile >= my_tiles) break;
      float* p = sums + (wstep * L.tmax + tfirst + SPLIT * tile) * kTileSums;
      if (ONE) {
        if (t == 0) {
          p[g] = acc[tile][0];
          p[g + 8] = acc[tile][2];
        }
        continue;
      }
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        p[g * 8 * NT + 8 * u + 2 * t] = acc[tile][4 * u + 0];
        p[g * 8 * NT + 8 * u + 2 * t + 1] = acc[tile][4 * u + 1];
        p[(g + 8) * 8 * NT + 8 * u + 2 * t] = acc[tile][4 * u + 2];
        p[(g + 8) * 8 * NT + 8 * u + 2 * t + 1] = acc[tile][4 * u + 3];
      }
    }
  };
  // (one token only for now: in the M = 2..8 kernels the branch made ptxas's 8-tile loop 43
  // instructions longer, at 95 registers; probe 6: the 8-tile loop throughout, for comparison)
  if constexpr (ONE && SPLIT == 1) {
    if (my_tiles <= 2 && (table & 0xFFFFu) == kV4AnchorAt && probe != 6)
      consume(std::integral_constant<int, 2>{});
    else
      consume(std::integral_constant<int, kWarpMaxTiles>{});
  } else {
    consume(std::integral_constant<int, kWarpMaxTiles>{});
  }
  // The epilogue's elements (r, m), i = r M + m: thread tid takes token m_mine = tid % M of the
  // CTA's rows tid / M + k rows_pass (threads at or past rows_pass M: none), so bf16 x's undo
  // factor is one load a thread, issued before the barrier, and an element takes no division.
  // (Per element, i / M, i % M and an L2 round trip for a.x_undo[m]: ~1.8 us from the sums to
  // the end at 4096 -> 14336, M = 16, in run 284's timeline.)
  const int m_mine = tid % M, rows_pass = kV4ConsumerThreads / M;
  const bool epilogue_thread = tid < rows_pass * M;
  const float undo_mine = kXHalf ? a.x_undo[m_mine] : 1.f;
  consumers_sync();
  NF4_MARK(tid == 0, kTimelineSummed);
  // y[m][row0 + r]: this CTA's sum (over the warps, in warp order)
  auto cta_sum = [&](int r, int m) {
    const int mma_row = v4_row_swap(r & 15);  // (its own inverse)
    float v = 0.f;
#pragma unroll
    for (int ws = 0; ws < kSteps; ++ws)
      v += sums[(ws * L.tmax + (r >> 4)) * kTileSums + mma_row * kRowSums + m];
    return v;
  };
  float* sums_in = reinterpret_cast<float*>(smem + L.sums_in);
  if (KPARTS > 1 && part == 1) {
    // The second K part: its sums into the first part's sums_in (distributed shared memory),
    // then one arrival per warp on that CTA's barrier. The wait: that CTA's barrier exists.
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    const uint32_t remote = cluster_addr(smem_addr(sums_in), 0u);
    for (int r = tid / M; epilogue_thread && r < rows; r += rows_pass)
      asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(
                       remote + 4u * (uint32_t)(r * M + m_mine)),
                   "f"(cta_sum(r, m_mine))
                   : "memory");
    asm volatile("fence.acq_rel.cluster;\n" ::: "memory");
    __syncwarp();
    if (lane == 0)
      asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(
                       cluster_addr(sums_in_full, 0u))
                   : "memory");
    return;
  }
  if (KPARTS > 1) {  // the second part's sums, in place once its 16 warps have arrived
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    uint32_t done;
    do {
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(sums_in_full)
          : "memory");
    } while (!done);
  }
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  for (int r = tid / M; epilogue_thread && r < rows; r += rows_pass) {
    const int m = m_mine;
    float v = cta_sum(r, m);
    if (KPARTS > 1) v += sums_in[r * M + m];  // (the parts in order: deterministic)
    if (kXHalf) v *= undo_mine;  // (a power of two: exact)
    if (bias) v += to_f32(bias[row0 + r]);
    // round(round(x Wᵀ + bias) + term), as v3 (add_low_rank's roundings)
    if (lr.xa) v = to_f32(from_f32<T>(v)) + lora_term<T>(lr, m, row0 + r);
    y[m * a.y_stride + row0 + r] = from_f32<T>(v);
  }
  NF4_MARK(tid == 0, kTimelineEnd);
  NF4_MARK(tid == 0, kTimelineEndNs);
#endif
}

// cuTensorMapEncodeTiled from the driver (through the runtime: no link to libcuda), or null.
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// The packed weight as a 2-D byte tensor [N][K / 2], boxes of `box_rows` rows x 128 bytes with
// the 128-byte swizzle; rows past N read as zeros.
bool encode_weight_map(CUtensorMap* map, const NF4GemvArgs& a, const NF4Weight& w, int box_rows) {
  const cuuint64_t dims[2] = {(cuuint64_t)(a.K / 2), (cuuint64_t)a.N};
  const cuuint64_t strides[1] = {(cuuint64_t)(a.K / 2)};
  const cuuint32_t box[2] = {128u, (cuuint32_t)box_rows};
  const cuuint32_t element_strides[2] = {1u, 1u};
  return encode_tiled()(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(w.packed),
                        dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// x [M][K] (bf16 / fp16, row stride x_stride) as a 3-D tensor [steps][tokens][64 values]
// (dimension 0 first below), boxes of a window's `steps` x all M tokens, the 128-byte swizzle:
// in shared memory row step * M + token, 128 bytes each, so a warp's 8 tokens (lanes g) of one
// step fall on 8 different swizzle rows. Needs x 16-byte aligned and a row stride of a
// multiple of 8 values (the plan checks).
bool encode_x_map(CUtensorMap* map, const NF4GemvArgs& a, int steps) {
  const cuuint64_t dims[3] = {64u, (cuuint64_t)a.M, (cuuint64_t)(a.K / 64)};
  const cuuint64_t strides[2] = {(cuuint64_t)a.x_stride * 2u, 128u};
  const cuuint32_t box[3] = {64u, (cuuint32_t)a.M, (cuuint32_t)steps};
  const cuuint32_t element_strides[3] = {1u, 1u, 1u};
  return encode_tiled()(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, const_cast<void*>(a.x), dims,
                        strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// An integer setting from the environment (unset: 0). v4 reads four, for benchmarks and tests
// only (FASTFT_NF4_V4_CTAS: see nf4_gemv_v4_plan):
// FASTFT_NF4_V4_PROBE (bench/nf4_v4_probe.py): 1 = the copies alone (no decode), 2 = no
// decode, 3 = no copies (the decode of stale data), 5 = neither (the prologue and the
// epilogue): wrong results; 4 = the ring filled without waiting for the scales (right
// results: the order before run 132, for comparison); 6 = the 8-tile window loop where the
// loop for CTAs of at most 2 tiles would run (right results, the same bits: its test); 9 = the
// prologue's loads after the barriers are made, with the weight frozen too (right results:
// the order before run 255); 17 = the scales' decode with consecutive units a warp (right
// results, the same bits: the order before run 265).
// FASTFT_NF4_V4_SPLIT, FASTFT_NF4_V4_KPARTS: 1 or 2 warps per step, 1 or 2 K parts, that one
// only (v4 does not take a call where it does not fit); 0: the plan chooses.
int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

template <bool NESTED, typename T, int UNIT, int SPLIT, int KPARTS, int NT, bool ONE = false>
bool launch_gemv_v4(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                    cudaStream_t stream) {
  const V4Layout L(a, w, a.v4_ctas, SPLIT, KPARTS, ONE);
  V4Maps maps;
  if (!encode_weight_map(&maps.m[0], a, w, L.tmax * 16)) return false;
  maps.m[1] = maps.m[0];
  if (L.tmax > 1 && !encode_weight_map(&maps.m[1], a, w, (L.tmax - 1) * 16)) return false;
  if (ONE != L.x_whole) return false;
  if (!encode_x_map(&maps.x, a, ONE ? L.KBc : v4_window(SPLIT) / kV3Step)) return false;
  auto kernel = nf4_gemv_v4_kernel<NESTED, T, SPLIT, KPARTS, NT, ONE, UNIT>;
  allow_dynamic_smem<nf4_gemv_v4_kernel<NESTED, T, SPLIT, KPARTS, NT, ONE, UNIT>>(
      kV4MaxSmem - kV4AnchorBytes);
  launch_kernel(kernel, dim3((unsigned)a.v4_ctas, KPARTS), kV4Threads,
                (size_t)(L.ring + (uint32_t)a.v4_stages * L.stage_bytes - kV4AnchorBytes), stream,
                a.pdl, KPARTS, w, a, maps, lr, env_int("FASTFT_NF4_V4_PROBE"));
  return true;
}
// bf16 x [M][K] into fp16 for v4 at M = 9..16 (kXHalf in the kernel), as v3 scales the x it
// stages: each token times the power of two 2^shift that puts its largest |x| in [2^14, 2^15)
// (x_scale_shift), and undo[m] = 2^-shift for v4's epilogue. One CTA per token, its units (8
// values) in registers up to kXHalfHeld each (K <= 8192), the rest read twice. Small enough
// to sit beside a v4 CTA on its SM (the plan leaves kXHalfRoom of shared memory; 48 registers
// a thread, where 17 warps of 96 leave 13 K), so that it never holds an SM a v4 CTA waits for.
constexpr int kXHalfThreads = 256, kXHalfHeld = 4, kXHalfRoom = 2048;
__global__ void __launch_bounds__(kXHalfThreads, 5)
    v4_x_half_kernel(const __nv_bfloat16* x, int64_t x_stride, int K, __half* out, float* undo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ uint32_t warp_max[kXHalfThreads / 32];
  gemv_wait_for_previous();  // x is the previous kernel's output
  const int m = (int)blockIdx.x, tid = (int)threadIdx.x, units = K / 8;
  const uint4* row = reinterpret_cast<const uint4*>(x + (int64_t)m * x_stride);
  uint4 held[kXHalfHeld];
  uint32_t mx = 0u;
#pragma unroll
  for (int i = 0; i < kXHalfHeld; ++i) {
    const int u = tid + i * kXHalfThreads;
    if (u < units) {
      held[i] = __ldg(row + u);
      mx = max(mx, bf16x8_max_abs_bits(held[i]));
    }
  }
  for (int u = tid + kXHalfHeld * kXHalfThreads; u < units; u += kXHalfThreads)
    mx = max(mx, bf16x8_max_abs_bits(__ldg(row + u)));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0) warp_max[tid >> 5] = mx;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kXHalfThreads / 32; ++i) mx = max(mx, warp_max[i]);
  const int shift = x_scale_shift(mx);
  uint4* out_row = reinterpret_cast<uint4*>(out + (int64_t)m * K);
#pragma unroll
  for (int i = 0; i < kXHalfHeld; ++i) {
    const int u = tid + i * kXHalfThreads;
    if (u < units) out_row[u] = bf16x8_scaled_to_fp16(held[i], shift);
  }
  for (int u = tid + kXHalfHeld * kXHalfThreads; u < units; u += kXHalfThreads)
    out_row[u] = bf16x8_scaled_to_fp16(__ldg(row + u), shift);
  if (tid == 0) undo[m] = pow2f(-shift);
#endif
}

// Whether x goes through v4_x_half_kernel first: bf16 at two token tiles
bool v4_x_half(const NF4GemvArgs& a) { return a.dtype == kBF16 && a.M > 8; }

template <bool NESTED, typename T, int UNIT>
bool launch_gemv_v4(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                    cudaStream_t stream) {
  if (a.M > 8) {  // two token tiles: two warps per step (the plan's only form there)
    NF4GemvArgs b = a;
    if (std::is_same<T, __nv_bfloat16>::value) {  // x into fp16 first, into the binding's scratch
      if (a.x_half == nullptr) return false;
      static const bool carveout = [] {  // (beside a v4 CTA: all of the SM's shared memory)
        cudaFuncSetAttribute(v4_x_half_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
        return true;
      }();
      (void)carveout;
      launch_kernel(v4_x_half_kernel, dim3((unsigned)a.M), kXHalfThreads, 0, stream, a.pdl, 1,
                    static_cast<const __nv_bfloat16*>(a.x), a.x_stride, a.K,
                    static_cast<__half*>(a.x_half), a.x_undo);
      b.x = a.x_half;
      b.x_stride = a.K;
    }
    return a.v4_kparts == 2 ? launch_gemv_v4<NESTED, T, UNIT, 2, 2, 2>(w, b, lr, stream)
                            : launch_gemv_v4<NESTED, T, UNIT, 2, 1, 2>(w, b, lr, stream);
  }
  if (V4Layout(a, w, a.v4_ctas, a.v4_split, a.v4_kparts, a.M == 1).x_whole) {  // ONE kernels
    if (a.v4_kparts == 2) return launch_gemv_v4<NESTED, T, UNIT, 1, 2, 1, true>(w, a, lr, stream);
    return a.v4_split == 2 ? launch_gemv_v4<NESTED, T, UNIT, 2, 1, 1, true>(w, a, lr, stream)
                           : launch_gemv_v4<NESTED, T, UNIT, 1, 1, 1, true>(w, a, lr, stream);
  }
  if (a.v4_kparts == 2) return launch_gemv_v4<NESTED, T, UNIT, 1, 2, 1>(w, a, lr, stream);
  return a.v4_split == 2 ? launch_gemv_v4<NESTED, T, UNIT, 2, 1, 1>(w, a, lr, stream)
                         : launch_gemv_v4<NESTED, T, UNIT, 1, 1, 1>(w, a, lr, stream);
}

// The unit (bytes) v4 loads w's scales in: 8 where a row's scales are whole 8-byte units at
// 8-byte aligned addresses; 4 (nested scales only: plain ones would take 16 more kernels for
// rows of an odd number of blocks, rare) where they are whole 4-byte ones; 0: neither, no v4.
int v4_scale_unit(const NF4Weight& w, const NF4GemvArgs& a) {
  const int64_t row_bytes = (int64_t)(a.K >> w.bs_log2) * (w.nested ? 1 : 4);
  const uintptr_t at = reinterpret_cast<uintptr_t>(w.absmax);
  if (row_bytes % 8 == 0 && at % 8 == 0) return 8;
  if (w.nested && row_bytes % 4 == 0 && at % 4 == 0) return 4;
  return 0;
}

// How many clusters of two v4 CTAs (one per SM each) the GPU runs at once (0: none)
int v4_cluster_pairs() {
  static const int pairs = [] {
    auto kernel = nf4_gemv_v4_kernel<true, __nv_bfloat16, 1, 2, 1, false, kV4ScaleUnitBytes>;
    allow_dynamic_smem<nf4_gemv_v4_kernel<true, __nv_bfloat16, 1, 2, 1, false, kV4ScaleUnitBytes>>(
        kV4MaxSmem - kV4AnchorBytes);
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(1, 2);
    config.blockDim = dim3(kV4Threads);
    config.dynamicSmemBytes = kV4MaxSmem - kV4AnchorBytes;
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = 2;
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // (not sticky: clear it)
      n = 0;
    }
    return n;
  }();
  return pairs;
}

}  // namespace

// v4 takes a call when: the driver has tensor maps; v3 would (nf4_gemv_v3_ok: M <= 16); the
// quantisation blocks do not straddle rows (K % blocksize == 0) and a row's scales are whole
// 8-byte pieces at 8-byte aligned addresses, or nested ones whole 4-byte pieces (they are
// loaded in such units: v4_scale_unit); x's rows are
// 16-byte aligned (its tensor map; the binding's aligned_rows makes them so); one CTA per SM
// (fewer with fewer tiles) takes at most v4_max_tiles tiles; and 2 or more stages fit beside
// the CTA's scales as float32 (in the table's 256 holes of 32 words where 16 x tiles x
// ceil(steps / 32) holes fit there, else in an area of their own). Tried in order: one K part
// with stages of 1024 values per row (one warp per step), of 512 (two warps per step, each
// with half the tiles); then two K parts (clusters of two CTAs on two SMs, each with half of
// the windows), where the second part's scales start at a whole unit. Two K parts come
// first where the output is narrower than the input and the input has 8192 or more features or
// M > 8, but not at M = 1 with K <= 16384 (below). M = 9..16 (two token tiles of the mma)
// take two warps per step only (a warp's 4 tiles x 8 sums, as 8 tiles x 4 at M <= 8).
bool nf4_gemv_v4_plan(const NF4Weight& w, NF4GemvArgs& a, int sms) {
  if (encode_tiled() == nullptr || !nf4_gemv_v3_ok(w, a) || a.K % (1 << w.bs_log2) != 0)
    return false;
  // a scale unit's blocks share one absmax2 entry (nested: entries of 8 or more blocks)
  if (w.nested && w.bs2_log2 < 3) return false;
  // x is copied by its tensor map (encode_x_map)
  if (reinterpret_cast<uintptr_t>(a.x) % 16 != 0 || a.x_stride % 8 != 0) return false;
  const int scale_bytes = w.nested ? 1 : 4;
  const int unit = v4_scale_unit(w, a);
  if (unit == 0) return false;
  const int64_t tiles = (a.N + 15) / 16;
  const int requested_split = env_int("FASTFT_NF4_V4_SPLIT");
  const int requested_kparts = env_int("FASTFT_NF4_V4_KPARTS");
  const int requested_ctas = env_int("FASTFT_NF4_V4_CTAS");
  // two K parts first where the output is narrower than the input and either the input has
  // 8192 or more features or there are 9..16 rows; one first elsewhere. H200, frozen, run 160
  // (since x is copied with each window), two parts vs one at M = 1 / 2 / 4 / 8 / 12 / 16, us:
  //   14336 -> 4096  17.7 / 17.7 / 16.8 / 17.1 / 27.8 / 28.1 vs 18.3 / 18.2 / 18.0 / 18.1 /
  //                  39.1 / 39.5
  //    8192 -> 2048  9.2 / 9.1 / 9.1 / 9.2 / 15.4 / 15.8 vs 9.6 / 9.6 / 9.6 / 9.5 / 21.0 / 21.1
  //    4096 -> 1024  6.2 / 6.2 / 6.1 / 6.1 / 9.2 / 9.3 vs 4.5 / 4.6 / 4.6 / 4.7 / 11.1 / 11.2
  // (3072 -> 1024: one part at every M, 3.7-3.9 us at M <= 8 vs 5.3-5.4; at 12 / 16 two parts do
  // not fit the plan.) At one row, where one part's x is one box (the one-token kernels: K <=
  // 16384), one part first: run 210, two parts vs one, us, each twice: 14336 -> 4096 15.8-16.0
  // vs 15.4-15.6, 11008 -> 4096 13.6-13.8 vs 13.2-13.6, 8192 -> 2048 8.8-9.4 vs 8.5-8.7 (at M
  // = 2..8 one part was 5-10% slower; 18944 -> 3584 at M = 1, not one box, 25.2 vs 17.7).
  const bool one_token_whole = a.M == 1 && a.K / kV3Step <= kV4MaxBoxSteps;
  // the shared memory a CTA may take (room left for a v4_x_half_kernel CTA where that runs)
  const int smem = kV4MaxSmem - (v4_x_half(a) ? kXHalfRoom : 0);
  const bool two_first = a.N < a.K && (a.K >= 8192 || a.M > 8) && !one_token_whole;
  for (int n = 0; n < 2; ++n) {
    const int kparts = two_first ? 2 - n : 1 + n;
    if (requested_kparts != 0 && requested_kparts != kparts) continue;
    int64_t groups = std::min<int64_t>(std::max(1, sms / kparts), tiles);
    // (FASTFT_NF4_V4_CTAS: at most this many row groups, as many as fit, for benchmarks)
    if (requested_ctas > 0) groups = std::min<int64_t>(groups, requested_ctas);
    if (kparts == 2) groups = std::min<int64_t>(groups, v4_cluster_pairs());
    if (groups < 1) continue;
    // As few row groups as keep the longest one's tiles (896 tiles on 132 SMs: 128 groups of 7,
    // not 104 of 7 and 28 of 6): the SMs left free take the next call's CTAs at once, so that
    // they load and decode their scales before the call ends. Otherwise the SM that ends a call
    // last starts the next one's CTA only then, prologue and all (run 218's timeline: the
    // slowest CTA's end came 13.3 us after the previous call's, its median 10.3). Run 220, this
    // rule vs the old count in one build, M = 1, us: 14336 -> 4096 14.73 vs 15.54, 18944 -> 3584
    // 16.97 vs 17.63, 4096 -> 4096 7.27 vs 7.67; most other shapes and M 1-5% faster; slower at
    // 4096 -> 4096 M = 4 (8.52 vs 8.25) and the M = 16 up + down chain (23.78 vs 22.83).
    if (requested_ctas == 0) {
      const int64_t longest = (tiles + groups - 1) / groups;  // tiles of the longest group
      groups = (tiles + longest - 1) / longest;
    }
    for (int split = 1; split <= 2; ++split) {
      // M = 9..16 (two token tiles): two warps per step only, in either K form; M <= 8: two K
      // parts with one warp per step only (the kernels there are)
      const int split_of_two_parts = a.M > 8 ? 2 : 1;
      if ((requested_split != 0 && requested_split != split) || (a.M > 8 && split != 2) ||
          (kparts == 2 && split != split_of_two_parts))
        continue;
      if ((tiles + groups - 1) / groups > v4_max_tiles(split, a.M > 8 ? 2 : 1)) continue;
      const V4Layout L(a, w, (int)groups, split, kparts, a.M == 1);
      if (L.ring > (uint32_t)smem) continue;
      if (kparts == 2 && (L.KBc >= L.KB ||
                          ((L.KBc >> (w.bs_log2 - 6)) * scale_bytes) % unit != 0))
        continue;
      const int stages = std::min<int>(kV4MaxStages, (smem - (int)L.ring) / (int)L.stage_bytes);
      if (stages < 2) continue;
      a.v4_ctas = (int)groups;
      a.v4_stages = stages;
      a.v4_split = (unsigned char)split;
      a.v4_kparts = (unsigned char)kparts;
      return true;
    }
  }
  return false;
}

int64_t nf4_gemv_x_half_floats(const NF4GemvArgs& a) {
  return a.variant == 7 && v4_x_half(a) ? (int64_t)a.M * a.K / 2 + a.M : 0;
}

bool nf4_gemv_v4(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                 cudaStream_t stream) {
  const int unit = v4_scale_unit(w, a);
  if (unit == 0) return false;  // (the plan does not take such calls)
  if (a.dtype == kBF16) {
    if (!w.nested) return launch_gemv_v4<false, __nv_bfloat16, 8>(w, a, lr, stream);
    return unit == 8 ? launch_gemv_v4<true, __nv_bfloat16, 8>(w, a, lr, stream)
                     : launch_gemv_v4<true, __nv_bfloat16, 4>(w, a, lr, stream);
  }
  if (!w.nested) return launch_gemv_v4<false, __half, 8>(w, a, lr, stream);
  return unit == 8 ? launch_gemv_v4<true, __half, 8>(w, a, lr, stream)
                   : launch_gemv_v4<true, __half, 4>(w, a, lr, stream);
}

}  // namespace fastft
