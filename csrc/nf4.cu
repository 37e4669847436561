// NF4 (bitsandbytes layout) dequantisation, bit-exact with bitsandbytes, and the fused
// small-M NF4 matmul that reads the packed weight directly.
//
// Bit-exactness: every value is lut[code] * scale as ONE float32 multiply rounded to nearest
// (__fmul_rn, never contracted with anything), converted with round-to-nearest-even; nested
// scales are __fadd_rn(__fmul_rn(code2[q], absmax2[b >> bs2_log2]), offset), the order
// bitsandbytes computes them in (multiply, round, add, round).
#include "nf4_kernels.cuh"

namespace fastft {
namespace {

template <int MT, bool NESTED, typename T, int DECODE, bool LORA, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, WARPS == kV3Warps ? kV3BlocksPerSM : 1)
    nf4_gemv_v3_kernel(const NF4Weight w, const NF4GemvArgs a, const NF4LowRank lr) {
  v3_gemv<MT, NESTED, T, DECODE, LORA, WARPS>(w, a, lr, blockIdx.x);
}

}  // namespace

void nf4_dequantize(const NF4Weight& w, int64_t numel, void* out, int out_dtype,
                    cudaStream_t stream) {
  if (numel <= 0) return;
  dispatch_float(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    T* o = static_cast<T*>(out);
    using Unit = DequantUnit<T>;
    const bool aligned =
        reinterpret_cast<uintptr_t>(w.packed) % sizeof(typename Unit::Word) == 0 &&
        reinterpret_cast<uintptr_t>(out) % 16 == 0;
    int64_t start = 0;
    if (aligned) {
      const int64_t units = numel / Unit::kValues;
      if (units > 0) {
        const int64_t per_block = kThreads * kUnits;
        const int64_t blocks = (units + per_block - 1) / per_block;
        nf4_dequant_vec<T><<<(unsigned)blocks, kThreads, 0, stream>>>(w, units, o);
      }
      start = units * Unit::kValues;
    }
    if (start < numel) {
      const int64_t blocks = std::min<int64_t>((numel - start + kThreads - 1) / kThreads, 8192);
      nf4_dequant_scalar<T><<<(unsigned)blocks, kThreads, 0, stream>>>(w, start, numel, o);
    }
  });
}

static void plan_v1(NF4GemvArgs& a, int sms) {
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

bool nf4_gemv_v2_ok(const NF4Weight& w, const NF4GemvArgs& a) {
  return a.M >= 1 && a.M <= 16 && a.K % kV2Step == 0 && a.K >= kV2Step * kV2Ahead &&
         ((int64_t)a.N + kV2Rows) * a.K < (int64_t(1) << 31) && w.bs_log2 >= 6 &&
         (a.dtype == kBF16 || a.dtype == kF16);
}

bool nf4_gemv_v3_ok(const NF4Weight& w, const NF4GemvArgs& a) {
  // 32-bit block indices in the kernel: N * K / 64 < 2^31
  return a.M >= 1 && a.M <= 16 && a.N >= 1 && a.K >= kV3Step && a.K % kV3Step == 0 &&
         (int64_t)a.N * a.K / kV3Step < (int64_t(1) << 31) &&
         a.K / kV3Step <= 65535 &&  // K splits are grid.y
         w.bs_log2 >= 6 && (a.dtype == kBF16 || a.dtype == kF16);
}

// v3's work split: a CTA's rows (256 / parts) and its K range (steps; splits = grid.y). The
// cheapest by a cost model of the most work any SM gets (resident CTAs share an SM's
// bandwidth, so work per SM is the measure, plus later waves' starts: below), in steps of one
// warp (32 rows x 64 k):
// a CTA costs its warps' steps (steps / parts) + 1 for its start (table, x staging, first
// loads) + 0.5 for adding the parts' sums (parts > 1) + for a K split across CTAs its partials
// (256 rows x M floats through L2: M / 4 of a step's 8 KB, at half a DRAM byte each), the last
// CTA's adding of `splits` partials (4 per L2 round trip, a quarter step each) and 4 for the
// latency of the fence, the counter and the partials' reads at the kernel's end (fitted to run
// 70's sweep of every parts x splits choice on 4 shapes: without it the plan split small
// weights across CTAs, e.g. 4096 -> 1024 at M = 1 in 4 splits, 8.9 us, where one CTA per
// 32 rows with 8 parts took 7.3 us).
// An SM with a single CTA has half the loads in flight (8 warps, 32 KB): counted as streaming
// at 2/3 of the rate of two (an assumption, untimed). A 16-warp CTA (16 parts) holds all of
// them alone: it costs what two 8-warp CTAs with its steps per warp cost, plus 3.5 for its
// start, which no other CTA's streaming hides on its SM. (Fitted to run 77: at 4096 -> 1024,
// M = 1..8, the 16-warp CTA measured level with the 8-warp choice, which the cost without the
// 3.5 put 23% behind; at 14336 -> 4096, M = 1, it measured 16% faster, this cost says 18.5%.)
// Each CTA's steps x slots must fit its holes (v3_max_steps; v3_wide_max_steps for 16 warps).
// More CTAs than fit an SM at once (two 8-warp ones) come in waves, and a later wave's start
// (table, x staging, the first loads' latency) is only partly hidden by the CTA still running:
// each CTA past two per SM costs kV3WaveStart more. A 16-warp CTA holds its SM alone, so nothing
// hides a second wave's start at all: it is only taken where one wave covers the weight.
// (Fitted to run 107: 3584 -> 18944 at M = 1 took 28.5 us with 8 parts (5 CTAs per SM) and
// 25.2 with 4 (3 per SM); 4096 -> 11008 at M = 4 24.8 us with 8 parts (3 per SM) and 22.0 with
// 4 (2 per SM); 16-warp CTAs in two waves 20.6-27.4 us where 8-warp ones with a K split took
// 16.6-19.6 at M = 6, 8 on 3072 -> 8192 and 4096 -> 8448.)
// Ties go to fewer parts, then fewer splits. M 9..16 (two token tiles) always has one part
// (see the kernel), whatever was requested.
constexpr double kV3WaveStart = 8.0;
static void plan_v3(NF4GemvArgs& a, int sms, int requested_splits, int requested_parts) {
  const int S = a.K / kV3Step;
  const int64_t n_sms = std::max(1, sms);
  double best_cost = 1e300;
  for (int parts = 1; parts <= (a.M <= 8 ? kV3WidePartsCTA : 1); parts *= 2) {  // M 9..16: 1
    if (requested_parts > 0 && parts != requested_parts && a.M <= 8) continue;
    const int64_t row_groups = (a.N + v3_cta_rows(parts) - 1) / v3_cta_rows(parts);
    const bool wide_cta = parts == kV3WidePartsCTA;
    const int max_steps = std::min(S, wide_cta ? v3_wide_max_steps(a.M) : v3_max_steps(a.M));
    int prev_splits = 0;
    for (int ks = (S + max_steps - 1) / max_steps; ks <= S; ++ks) {
      if (requested_splits > 0) ks = std::max(ks, std::min(requested_splits, S));
      const int steps = (S + ks - 1) / ks;
      const int splits = (S + steps - 1) / steps;  // every split non-empty
      if (splits != prev_splits) {
        prev_splits = splits;
        const int64_t per_sm = (row_groups * splits + n_sms - 1) / n_sms;
        const double per_warp = (double)((steps + parts - 1) / parts);
        const double extra = (parts > 1 ? 0.5 : 0.0) +
                             (splits > 1 ? (a.M + 7) / 8 + 4.0 + splits / 4.0 : 0.0);
        const bool requested = requested_parts > 0 && a.M <= 8;  // a benchmark's choice
        const double cost =
            wide_cta ? per_sm * (2.0 * (per_warp + 1.0 + extra) + 3.5)
                     : (per_sm == 1 ? 1.5 : (double)per_sm) * (per_warp + 1.0 + extra) +
                           kV3WaveStart * (double)std::max<int64_t>(0, per_sm - 2);
        if (cost < best_cost && (!wide_cta || per_sm == 1 || requested)) {
          best_cost = cost;
          a.v3_steps = steps;
          a.v3_splits = splits;
          a.v3_kparts = parts;
        }
      }
      if (requested_splits > 0) break;  // a benchmark's choice (within what x staging allows)
    }
  }
}

void nf4_gemv_plan(const NF4Weight& w, NF4GemvArgs& a, int sms) {
  const int v3_requested_splits = a.v3_splits, v3_requested_parts = a.v3_kparts;
  a.v3_decode = 0;
  if (a.variant == 5 || a.variant == 6) {  // v3 with its decode in registers / half and half
    a.v3_decode = a.variant - 4;
    a.variant = 3;
  }
  a.split = a.per_split = a.v2_blocks = a.v2_steps = a.v3_steps = a.v3_splits = a.v3_kparts = 0;
  a.v4_ctas = a.v4_stages = a.v4_split = a.v4_kparts = 0;
  if (a.variant == 7) {
    if (nf4_gemv_v4_plan(w, a, sms)) return;
    a.v4_ctas = a.v4_stages = a.v4_split = a.v4_kparts = 0;
    a.variant = 3;  // where v4 does not apply: v3's plan (v1 where that does not apply either)
  }
  // Automatic choice (variant 0), from the H200: v3 was faster than v1 at every M where the
  // output is wide (run 17: 4096 -> 14336, 0.025-0.031 ms vs 0.029-0.041), and since its
  // warps split a CTA's K range (K parts, runs 65-68) also at M <= 8 where the output is at
  // most half the input (run 67: 14336 -> 4096, 22.9 / 25.6 / 28.2 us vs v1's 25.6 / 26.7 /
  // 28.4 at M = 1 / 4 / 8; 4096 -> 1024, 9.3 / 10.2 / 11.4 us vs 15.0 / 16.0 / 17.8); v1 stays
  // for those at M 9..16 (14336 -> 4096: 32.2-35.0 us vs 34.3-37.5) and for shapes in between
  // (4096 -> 4096: v1 12.3-16.9 us, v3h 13.1-21.5; run 68, the best forced K parts: v3 12.0 /
  // 13.4 / 14.2 vs v1 12.3 / 12.9 / 13.8 at M = 1 / 4 / 8). Wide outputs take v3 with half of
  // the rows decoded in registers (v3h, the same results bit for bit): 2.3-3.6% faster than v3
  // at M <= 8 there, level at M >= 9 (runs 27 and 32); narrow ones the table alone (run 68:
  // 4096 -> 1024 4-5% faster than v3h at M = 1 / 4 / 8, 14336 -> 4096 level).
  if (a.variant == 0) {
    const bool wide = (int64_t)a.N >= 2 * (int64_t)a.K;
    const bool deep = (int64_t)a.K >= 2 * (int64_t)a.N;
    // v4 (csrc/nf4_stream.cu) at up to 16 rows where the input has 3072 or more features and
    // - the output is at least as wide as the input and the busiest CTA takes 2 or more tiles
    //   (runs 136-144, 156-158, 167-168; e.g. 4096 -> 14336 at M = 1 14.4 us vs v3h's 17.7);
    // - the output is narrower than the input, at 2..16 rows (two K parts where they fit:
    //   nf4_gemv_v4_plan; runs 146-149, 156-158, 167), and at 1 row (run 200: with the
    //   one-token kernels 14336 -> 4096 and 18944 -> 3584 no longer stay v3, which was ~3%
    //   faster than v4 there before them, runs 168, 193).
    // v4 adds a LoRA term in its epilogue at ~no cost where v3's cost 2-4 us (run 139). Inputs
    // under 3072 features stay v3 (1024 -> 2048, one tile per CTA, was 37% slower with v4 in
    // run 140). The numbers per shape and M: bench/RUNS.md ("The weight through the copy
    // engine") and the runs' JSON. Elsewhere v3h where the output is wide.
    const bool v4_wide = a.N >= a.K && a.M <= 16;
    const bool v4_deep = a.N < a.K && a.M <= 16;
    if ((v4_wide || v4_deep) && a.K >= 3072 && a.v4_allowed && nf4_gemv_v4_plan(w, a, sms) &&
        (v4_deep || ((int64_t)a.N + 15) / 16 > (int64_t)a.v4_ctas)) {
      a.variant = 7;
      return;
    }
    a.v4_ctas = a.v4_stages = a.v4_split = a.v4_kparts = 0;
    a.variant = wide || (deep && a.M <= 8) ? 3 : 1;
    a.v3_decode = wide ? 2 : 0;
  }
  if (a.variant == 3 && nf4_gemv_v3_ok(w, a)) {
    plan_v3(a, sms, v3_requested_splits, v3_requested_parts);
    return;
  }
  if (a.variant == 2 && nf4_gemv_v2_ok(w, a)) {
    a.variant = 2;
    const int tokens = a.M <= 8 ? 8 : 16;
    const int64_t total = (a.N + kV2Rows - 1) / kV2Rows * (int64_t)(a.K / kV2Step);
    int64_t blocks = std::min<int64_t>(total, (int64_t)std::max(1, sms) * kV2BlocksPerSM);
    const int64_t max_steps = v2_max_steps(tokens);
    if ((total + blocks - 1) / blocks > max_steps) blocks = (total + max_steps - 1) / max_steps;
    a.v2_blocks = (int)blocks;
    a.v2_steps = (int)((total + blocks - 1) / blocks);
    return;
  }
  a.variant = 1;
  plan_v1(a, sms);
}

bool nf4_gemv_group_plan(NF4GemvGroup& g, int sms) {
  if (g.count < 1 || g.count > kNF4GroupMax) return false;
  const NF4GemvArgs& a0 = g.a[0];
  int decode = -1;  // auto: as one weight of the group's whole width would take
  if (a0.variant == 3) decode = 0;
  else if (a0.variant == 6) decode = 2;
  else if (a0.variant != 0) return false;  // v1, v2, v3r: one call per weight
  int64_t n_total = 0;
  for (int s = 0; s < g.count; ++s) {
    const NF4GemvArgs& a = g.a[s];
    if (a.M != a0.M || a.K != a0.K || a.dtype != a0.dtype || a.x != a0.x ||
        a.x_stride != a0.x_stride || g.w[s].nested != g.w[0].nested ||
        (g.lr[s].xa == nullptr) != (g.lr[0].xa == nullptr) || !nf4_gemv_v3_ok(g.w[s], a))
      return false;
    n_total += a.N;
  }
  if (n_total > INT32_MAX) return false;
  NF4GemvArgs whole = a0;
  whole.N = (int)n_total;
  if (decode < 0) decode = n_total >= 2 * (int64_t)a0.K ? 2 : 0;
  // the cost model on the group's total width (row groups per segment rounded up: close)
  plan_v3(whole, sms, a0.v3_splits, a0.v3_kparts);
  const int rows = v3_cta_rows(whole.v3_kparts);
  // Whether one launch pays, by CTA counts (fitted to run 97, bench/nf4_group.py on an 8B
  // layer's q/k/v and gate/up): it does where no weight fills the GPU alone (each weight's own
  // plan has fewer CTAs than there are SMs: q/k/v, 0.36-0.64x the time of one call each at
  // M = 1..16), or where the group needs no more CTAs than the weights alone (gate/up at
  // M = 8, 16: 0.85-0.99x; at M = 1, 4 0.76-0.85x since the wave cost, run 108). Two weights
  // that fill the GPU alone and would take more CTAs together are slower in one launch (run 97,
  // gate/up at M <= 4 before the wave cost: 896 CTAs, 1.06-1.26x: more CTAs per SM, each
  // building its level table and staging x again).
  bool each_small = true;
  int64_t each_ctas = 0;
  for (int s = 0; s < g.count; ++s) {
    NF4GemvArgs one = g.a[s];
    plan_v3(one, sms, a0.v3_splits, a0.v3_kparts);
    const int64_t ctas = (int64_t)(one.N + v3_cta_rows(one.v3_kparts) - 1) /
                         v3_cta_rows(one.v3_kparts) * one.v3_splits;
    each_small = each_small && ctas < sms;
    each_ctas += ctas;
  }
  // Weights that each fill the GPU alone and each take v4 by the automatic plan go as one v4
  // call each: v4 has no group form, and at Llama-3-8B's gate/up one v4 call (14.5-22.4 us
  // at M = 1..16, run 161) takes about what the v3 group spends per weight or less (run 162).
  if (!each_small && a0.variant == 0) {
    bool each_v4 = true;
    for (int s = 0; s < g.count && each_v4; ++s) {
      NF4GemvArgs one = g.a[s];
      nf4_gemv_plan(g.w[s], one, sms);
      each_v4 = one.variant == 7;
    }
    if (each_v4) return false;
  }
  int64_t group_ctas = 0;  // grid columns: segment s owns [first[s], first[s + 1])
  for (int s = 0; s < g.count; ++s) {
    g.first[s] = (int)group_ctas;
    group_ctas += (g.a[s].N + rows - 1) / rows;
  }
  g.first[g.count] = (int)group_ctas;
  if (!each_small && group_ctas * whole.v3_splits > each_ctas) return false;
  for (int s = 0; s < g.count; ++s) {
    NF4GemvArgs& a = g.a[s];
    a.variant = 3;
    a.v3_decode = decode;
    a.split = a.per_split = a.v2_blocks = a.v2_steps = 0;
    a.v3_steps = whole.v3_steps;
    a.v3_splits = whole.v3_splits;
    a.v3_kparts = whole.v3_kparts;
  }
  return true;
}

unsigned long long nf4_gemv_counter_tag() {
  static std::atomic<unsigned long long> serial{0};
  const unsigned long long n = serial.fetch_add(1, std::memory_order_relaxed) & ((1ull << 40) - 1);
  return (0xFFFull << 52) | (n << 24);
}

int64_t nf4_gemv_counters(const NF4GemvArgs& a) {
  if (a.variant == 3) return (a.N + v3_cta_rows(a.v3_kparts) - 1) / v3_cta_rows(a.v3_kparts);
  return a.variant == 2 ? (a.N + kV2Rows - 1) / kV2Rows : nf4_gemv_row_blocks(a.N);
}

int64_t nf4_gemv_partial_floats(const NF4GemvArgs& a) {
  if (a.variant == 3) return a.v3_splits > 1 ? (int64_t)a.v3_splits * a.M * a.N : 0;
  if (a.variant == 2) return (a.v2_blocks + nf4_gemv_counters(a)) * (int64_t)a.M * kV2Rows;
  return a.split > 1 ? (int64_t)a.split * a.M * a.N : 0;
}

bool nf4_gemv_needs_scratch(const NF4GemvArgs& a) {
  // v2: a row block split over several blocks needs partials (a row spans K / 64 steps and
  // a block takes v2_steps of them: shared row blocks exist unless every block holds whole
  // row blocks, which cannot be known cheaply here, so always)
  if (a.variant == 3) return a.v3_splits > 1;
  return a.variant == 2 || a.split > 1;
}

// The scratch's layout, in one place for every caller (the torch binding, bench/nf4_timeline.cu):
// split K's partials (rounded up to even floats, so that the 8-byte counters after them are
// 8-aligned), the counters, then v4's fp16 copy of x (16-byte aligned, as x's tensor map
// needs) and its factor per token after its M K halves.
namespace {
int64_t split_k_partials_floats(const NF4GemvArgs& a) {
  return (nf4_gemv_partial_floats(a) + 1) / 2 * 2;
}
int64_t split_k_floats(const NF4GemvArgs& a) {
  if (!nf4_gemv_needs_scratch(a)) return 0;
  return split_k_partials_floats(a) + 2 * nf4_gemv_counters(a);
}
int64_t x_half_at(const NF4GemvArgs& a) { return (split_k_floats(a) + 3) / 4 * 4; }
}  // namespace

int64_t nf4_gemv_scratch_floats(const NF4GemvArgs& a) {
  const int64_t x_half = nf4_gemv_x_half_floats(a);
  return x_half ? x_half_at(a) + x_half : split_k_floats(a);
}

void nf4_gemv_point_into_scratch(NF4GemvArgs& a, float* at, unsigned long long tag) {
  if (nf4_gemv_needs_scratch(a)) {
    a.partial = at;
    a.counters = reinterpret_cast<unsigned long long*>(at + split_k_partials_floats(a));
    a.counter_tag = tag;
  }
  if (nf4_gemv_x_half_floats(a)) {  // (else a.x_half / x_undo stay null)
    float* x_half = at + x_half_at(a);
    a.x_half = x_half;
    a.x_undo = x_half + (int64_t)a.M * a.K / 2;
  }
}

namespace {
template <typename T, int MT, bool LORA>
void launch_gemv_lora(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                      cudaStream_t stream) {
  allow_dynamic_smem<nf4_gemv_kernel<T, MT, LORA>>(kLevelBytes + kCode2Bytes + kMaxXBytes);
  const int xs_stride = a.per_split * kChunk + 16;  // 32 bytes mod 128: see the layout note
  const size_t smem = kLevelBytes + kCode2Bytes + (size_t)MT * 8 * xs_stride * sizeof(T);
  const dim3 grid((unsigned)((a.N + kBlockRows - 1) / kBlockRows), (unsigned)a.split);
  launch_kernel(nf4_gemv_kernel<T, MT, LORA>, grid, kGemvWarps * 32, smem, stream, a.pdl, 1, w,
                a, a.per_split, xs_stride, lr);
}

template <typename T, int MT>
void launch_gemv(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                 cudaStream_t stream) {
  if (lr.xa) launch_gemv_lora<T, MT, true>(w, a, lr, stream);
  else launch_gemv_lora<T, MT, false>(w, a, lr, stream);
}


template <typename T, int MT, bool NESTED>
void launch_gemv_v2(const NF4Weight& w, const NF4GemvArgs& a, cudaStream_t stream) {
  allow_dynamic_smem<nf4_gemv_v2_kernel<T, MT, NESTED>>(kV2MaxSmem);
  const int xs_stride = a.v2_steps * kV2Step + 8;  // halves: 16 bytes mod 128
  const size_t smem = 2 * kV2TableBytes + (size_t)MT * 8 * xs_stride * 2;
  nf4_gemv_v2_kernel<T, MT, NESTED>
      <<<(unsigned)a.v2_blocks, kV2Threads, smem, stream>>>(w, a, xs_stride);
}

template <typename T, int MT, bool NESTED, int DECODE, bool LORA, int WARPS>
void launch_gemv_v3_kernel(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                           cudaStream_t stream) {
  const bool wide = WARPS != kV3Warps;
  const int smem = wide ? kV3WideSmem : kV3Smem;
  allow_dynamic_smem<nf4_gemv_v3_kernel<MT, NESTED, T, DECODE, LORA, WARPS>>(smem);
  const dim3 grid((unsigned)nf4_gemv_counters(a), (unsigned)a.v3_splits);  // row groups x splits
  launch_kernel(nf4_gemv_v3_kernel<MT, NESTED, T, DECODE, LORA, WARPS>, grid, WARPS * 32,
                smem, stream, a.pdl, 1, w, a, lr);
}

template <typename T, int MT, bool NESTED, int DECODE, bool LORA>
void launch_gemv_v3_warps(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                          cudaStream_t stream) {
  // 16 K parts (one token tile only: the plan gives M 9..16 one part) run 16-warp CTAs
  if constexpr (MT == 1) {
    if (a.v3_kparts == kV3WidePartsCTA) {
      launch_gemv_v3_kernel<T, MT, NESTED, DECODE, LORA, 16>(w, a, lr, stream);
      return;
    }
  }
  launch_gemv_v3_kernel<T, MT, NESTED, DECODE, LORA, kV3Warps>(w, a, lr, stream);
}

template <typename T, int MT, bool NESTED, int DECODE>
void launch_gemv_v3_decode(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                           cudaStream_t stream) {
  if (lr.xa) launch_gemv_v3_warps<T, MT, NESTED, DECODE, true>(w, a, lr, stream);
  else launch_gemv_v3_warps<T, MT, NESTED, DECODE, false>(w, a, lr, stream);
}

template <typename T, int MT, bool NESTED>
void launch_gemv_v3(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
                    cudaStream_t stream) {
  if (a.v3_decode == 1) launch_gemv_v3_decode<T, MT, NESTED, 1>(w, a, lr, stream);
  else if (a.v3_decode == 2) launch_gemv_v3_decode<T, MT, NESTED, 2>(w, a, lr, stream);
  else launch_gemv_v3_decode<T, MT, NESTED, 0>(w, a, lr, stream);
}
}  // namespace

bool nf4_gemv(const NF4Weight& w, const NF4GemvArgs& a, const NF4LowRank& lr,
              cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0) return true;
  // v2 / v3 are compiled per token tiles (MT: 1 for M <= 8, else 2) and scale nesting:
  // `with_shape` calls its argument with both as compile-time constants.
  auto with_shape = [&](auto launch_one) {
    using One = std::integral_constant<int, 1>;
    using Two = std::integral_constant<int, 2>;
    if (a.M <= 8) {
      if (w.nested) launch_one(One{}, std::true_type{});
      else launch_one(One{}, std::false_type{});
    } else {
      if (w.nested) launch_one(Two{}, std::true_type{});
      else launch_one(Two{}, std::false_type{});
    }
  };
  if (a.variant == 7) return nf4_gemv_v4(w, a, lr, stream);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    if (a.variant == 3) {
      with_shape([&](auto mt, auto nested) {
        launch_gemv_v3<T, decltype(mt)::value, decltype(nested)::value>(w, a, lr, stream);
      });
      return;
    }
    if (a.variant == 2) {
      with_shape([&](auto mt, auto nested) {
        launch_gemv_v2<T, decltype(mt)::value, decltype(nested)::value>(w, a, stream);
      });
      return;
    }
    if (a.M <= 8) launch_gemv<T, 1>(w, a, lr, stream);
    else launch_gemv<T, 2>(w, a, lr, stream);
  };
  if (a.dtype == kBF16) launch(__nv_bfloat16{});
  else launch(__half{});
  return true;
}

}  // namespace fastft
