// torch.ops.fastft.nf4_dequantize / nf4_gemv: checks, then the launchers in nf4.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <vector>

#include "binding.h"
#include "nf4.h"

namespace fastft {
namespace {

int log2_of(int64_t v, const char* name) {
  FASTFT_CHECK(v > 0 && (v & (v - 1)) == 0, "fastft nf4: ", name, " must be a power of two, got ",
              v);
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

void check_vector(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype,
                  int64_t min_numel, const char* name) {
  check_cuda(t, name);
  FASTFT_CHECK(t.device() == like.device(), "fastft nf4: ", name, " is on ", t.device(),
              ", the packed weight on ", like.device());
  FASTFT_CHECK(t.scalar_type() == dtype, "fastft nf4: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  FASTFT_CHECK(t.is_contiguous() && t.numel() >= min_numel, "fastft nf4: ", name,
              " must be contiguous with at least ", min_numel, " elements, got ", t.numel());
}

// The weight's tensors checked for `numel` values.
NF4Weight weight_of(const at::Tensor& packed, const at::Tensor& absmax,
                    const c10::optional<at::Tensor>& absmax2,
                    const c10::optional<at::Tensor>& code2,
                    const c10::optional<at::Tensor>& offset, const at::Tensor& code,
                    int64_t blocksize, int64_t blocksize2, int64_t numel) {
  check_vector(packed, packed, at::kByte, (numel + 1) / 2, "packed");
  check_vector(code, packed, at::kFloat, 16, "code");
  const int bs_log2 = log2_of(blocksize, "blocksize");
  FASTFT_CHECK(blocksize >= 32, "fastft nf4: blocksize must be >= 32, got ", blocksize);
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  const bool nested = absmax2.has_value();
  FASTFT_CHECK(nested == code2.has_value() && nested == offset.has_value(),
              "fastft nf4: absmax2, code2 and offset come together (nested state) or not at all");
  NF4Weight w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.code = code.data_ptr<float>();
  w.bs_log2 = bs_log2;
  w.nested = nested;
  if (nested) {
    check_vector(absmax, packed, at::kByte, blocks, "absmax (nested)");
    w.bs2_log2 = log2_of(blocksize2, "blocksize2");
    check_vector(*absmax2, packed, at::kFloat, (blocks + blocksize2 - 1) / blocksize2, "absmax2");
    check_vector(*code2, packed, at::kFloat, 256, "code2");
    check_vector(*offset, packed, at::kFloat, 1, "offset");
    w.absmax2 = absmax2->data_ptr<float>();
    w.code2 = code2->data_ptr<float>();
    w.offset = offset->data_ptr<float>();
  } else {
    check_vector(absmax, packed, at::kFloat, blocks, "absmax");
  }
  w.absmax = absmax.data_ptr();
  return w;
}

void dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                const c10::optional<at::Tensor>& offset, const at::Tensor& code, int64_t blocksize,
                int64_t blocksize2, int64_t numel, const at::Tensor& out) {
  FASTFT_CHECK(numel >= 0, "fastft nf4: numel must be >= 0");
  NF4Weight w = weight_of(packed, absmax, absmax2, code2, offset, code, blocksize, blocksize2,
                          numel);
  check_cuda(out, "out");
  FASTFT_CHECK(out.device() == packed.device(), "fastft nf4: out is on ", out.device(),
              ", the packed weight on ", packed.device());
  FASTFT_CHECK(out.is_contiguous() && out.numel() >= numel, "fastft nf4: out must be contiguous "
              "with at least ", numel, " elements");
  const int tag = dtype_tag(out);
  c10::cuda::CUDAGuard guard(packed.device());
  nf4_dequantize(w, numel, out.data_ptr(), tag, stream_of(packed));
  check_launch();
}

// One weight's call, checked: nf4_gemv's arguments, and the aligned copies they point into.
struct GemvCall {
  NF4Weight w{};
  NF4GemvArgs a{};
  NF4LowRank lr{};
  at::Tensor x, packed;
};

// x rows are read in 16-byte pieces: a copy when x is misaligned (a fresh allocation is aligned;
// views with odd offsets are rare).
at::Tensor aligned_rows(const at::Tensor& x) {
  if (x.stride(0) % 8 != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0)
    return x.clone(at::MemoryFormat::Contiguous);
  return x;
}

GemvCall prepare_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                      const c10::optional<at::Tensor>& absmax2,
                      const c10::optional<at::Tensor>& code2,
                      const c10::optional<at::Tensor>& offset, const at::Tensor& code,
                      const c10::optional<at::Tensor>& bias, int64_t blocksize,
                      int64_t blocksize2, int64_t variant, int64_t v3_splits, int64_t v3_kparts,
                      int64_t pdl, const c10::optional<at::Tensor>& lora_xa,
                      const c10::optional<at::Tensor>& lora_b, double lora_scale,
                      const at::Tensor& y) {
  // variant / v3_splits / v3_kparts / pdl: fastft/ops/nf4.py reads and checks FASTFT_NF4_GEMV,
  // FASTFT_NF4_V3_SPLITS, FASTFT_NF4_V3_KPARTS (0 = the plan chooses) and FASTFT_NF4_PDL, so the
  // extension reads no environment. pdl: 0 off, 1 on, 2 on with the weight frozen (its first
  // loads before the wait: NF4GemvArgs::weights_frozen; fastft.ops.nf4.frozen_weights).
  FASTFT_CHECK((variant >= 0 && variant <= 3) || (variant >= 5 && variant <= 7),
              "fastft nf4: variant must be 0..3 or 5..7, got ", variant);
  FASTFT_CHECK(v3_splits >= 0 && v3_splits <= 65535, "fastft nf4: v3_splits must be 0..65535, got ",
              v3_splits);
  FASTFT_CHECK(pdl >= 0 && pdl <= 2, "fastft nf4: pdl must be 0, 1 or 2, got ", pdl);
  FASTFT_CHECK(v3_kparts == 0 || v3_kparts == 1 || v3_kparts == 2 || v3_kparts == 4 ||
                  v3_kparts == 8 || v3_kparts == 16,
              "fastft nf4: v3_kparts must be 0, 1, 2, 4, 8 or 16, got ", v3_kparts);
  check_rows(x, "x");
  check_rows(y, "y");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  FASTFT_CHECK(y.size(0) == M, "fastft nf4: y must have x's ", M, " rows, got ", y.size(0));
  FASTFT_CHECK(M <= 16, "fastft nf4: the fused kernel takes at most 16 rows of x, got ", M,
              " (larger inputs: dequantise and use a matmul)");
  FASTFT_CHECK(K % 32 == 0, "fastft nf4: the fused kernel needs in_features % 32 == 0, got ", K,
              " (use nf4_dequantize + matmul)");
  FASTFT_CHECK(blocksize >= 32, "fastft nf4: the fused kernel needs blocksize >= 32, got ",
              blocksize, " (use nf4_dequantize + matmul)");
  FASTFT_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "fastft nf4: the fused kernel takes bfloat16 or float16 x, got ", x.scalar_type());
  FASTFT_CHECK(y.scalar_type() == x.scalar_type(), "fastft nf4: y must have x's dtype");
  FASTFT_CHECK(y.device() == x.device() && packed.device() == x.device(),
              "fastft nf4: x, y and the weight must be on one device");
  // The kernel reads x rows and the packed weight in 16-byte pieces: copy what is misaligned.
  at::Tensor xa = aligned_rows(x), pa = packed;
  if (reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 != 0)
    pa = packed.clone(at::MemoryFormat::Contiguous);
  NF4Weight w = weight_of(pa, absmax, absmax2, code2, offset, code, blocksize, blocksize2,
                          N * K);
  if (bias) {
    check_cuda(*bias, "bias");
    FASTFT_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "fastft nf4: bias must be a contiguous [", N, "] tensor of x's dtype");
  }
  // The low-rank term (y += lora_scale * lora_xa lora_bᵀ): read in 16-byte pieces, so rows must
  // be aligned and the rank a multiple of 8 (fastft/ops/nf4.py checks this before asking).
  FASTFT_CHECK(lora_xa.has_value() == lora_b.has_value(),
              "fastft nf4: lora_xa and lora_b come together (or neither)");
  int64_t rank = 0;
  if (lora_xa) {
    check_cuda(*lora_xa, "lora_xa");
    check_cuda(*lora_b, "lora_b");
    rank = lora_xa->dim() == 2 ? lora_xa->size(1) : -1;
    FASTFT_CHECK(lora_xa->dim() == 2 && lora_xa->size(0) == M && lora_b->dim() == 2 &&
                    lora_b->size(0) == N && lora_b->size(1) == rank,
                "fastft nf4: lora_xa must be [", M, ", r] and lora_b [", N, ", r], got ",
                lora_xa->sizes(), " and ", lora_b->sizes());
    FASTFT_CHECK(lora_xa->scalar_type() == x.scalar_type() &&
                    lora_b->scalar_type() == x.scalar_type(),
                "fastft nf4: lora_xa and lora_b must have x's dtype");
    for (const at::Tensor* t : {&*lora_xa, &*lora_b})
      FASTFT_CHECK(rank > 0 && rank % 8 == 0 && t->stride(1) == 1 && t->stride(0) % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                  "fastft nf4: the low-rank term needs a rank that is a multiple of 8 and "
                  "16-byte aligned rows (got rank ", rank, ", strides ", t->strides(), ")");
  }
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  FASTFT_CHECK(major >= 8, "fastft nf4: the fused kernel needs compute capability >= 8.0");
  GemvCall call;
  call.x = xa;
  call.packed = pa;
  call.w = w;
  NF4GemvArgs& a = call.a;
  a.x = xa.data_ptr(); a.x_stride = xa.stride(0);
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr(); a.y_stride = y.stride(0);
  a.M = (int)M; a.N = (int)N; a.K = (int)K;
  a.dtype = dtype_tag(x);
  // v4 needs sm_90 (tensor-map copies): v3's plan takes a forced v4 elsewhere
  a.v4_allowed = major >= 9;
  a.variant = variant == 7 && major < 9 ? 3 : (int)variant;
  a.v3_splits = variant == 3 || variant >= 5 ? (int)v3_splits : 0;  // (5, 6: v3's decodes)
  a.v3_kparts = variant == 3 || variant >= 5 ? (int)v3_kparts : 0;
  a.pdl = pdl >= 1 && major >= 9;  // griddepcontrol: sm_90
  a.weights_frozen = a.pdl && pdl == 2;
  NF4LowRank& lr = call.lr;
  if (lora_xa) {
    lr.xa = lora_xa->data_ptr(); lr.xa_stride = lora_xa->stride(0);
    lr.b = lora_b->data_ptr(); lr.b_stride = lora_b->stride(0);
    lr.rank = (int)rank;
    lr.scale = (float)lora_scale;
  }
  return call;
}

const char* launch_hint(bool pdl) {
  return pdl ? " (nf4_gemv, launched with programmatic dependent launch; if the driver or a "
               "graph capture rejects that, FASTFT_NF4_PDL=0 turns it off)"
             : " (nf4_gemv)";
}

void launch_gemv_call(GemvCall& call) {
  NF4GemvArgs& a = call.a;
  c10::cuda::CUDAGuard guard(call.x.device());
  nf4_gemv_plan(call.w, a, sm_count(call.x));
  FASTFT_CHECK(call.lr.xa == nullptr || a.variant != 2,
              "fastft nf4: the low-rank term is not implemented in the v2 kernel "
              "(FASTFT_NF4_GEMV=v2): add it after the call");
  // (stream-ordered by the caching allocator; under capture, from the CUDA graph's pool)
  at::Tensor scratch;
  if (const int64_t floats = nf4_gemv_scratch_floats(a)) {
    scratch = at::empty({floats}, call.x.options().dtype(at::kFloat));
    nf4_gemv_point_into_scratch(a, scratch.data_ptr<float>(), nf4_gemv_counter_tag());
  }
  FASTFT_CHECK(nf4_gemv(call.w, a, call.lr, stream_of(call.x)),
              "fastft nf4: the driver could not describe the weight to the copy engine for the v4 "
              "kernel (cuTensorMapEncodeTiled failed); FASTFT_NF4_GEMV=v3 (or unset) avoids v4");
  check_launch(launch_hint(a.pdl));
}

void gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
          const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
          const c10::optional<at::Tensor>& offset, const at::Tensor& code,
          const c10::optional<at::Tensor>& bias, int64_t blocksize, int64_t blocksize2,
          int64_t variant, int64_t v3_splits, int64_t v3_kparts, int64_t pdl,
          const c10::optional<at::Tensor>& lora_xa, const c10::optional<at::Tensor>& lora_b,
          double lora_scale, const at::Tensor& y) {
  GemvCall call = prepare_gemv(x, packed, absmax, absmax2, code2, offset, code, bias, blocksize,
                               blocksize2, variant, v3_splits, v3_kparts, pdl, lora_xa, lora_b,
                               lora_scale, y);
  launch_gemv_call(call);
}

// Several weights of one x, each into its own y (q, k and v; gate and up): one launch where
// nf4_gemv_group_plan takes them (see nf4.h), else one nf4_gemv call per weight. The lists are
// per weight; every weight is checked as nf4_gemv checks it.
void gemv_group(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                const c10::List<c10::optional<at::Tensor>>& absmax2,
                const c10::List<c10::optional<at::Tensor>>& code2,
                const c10::List<c10::optional<at::Tensor>>& offset, at::TensorList code,
                const c10::List<c10::optional<at::Tensor>>& bias, at::IntArrayRef blocksize,
                at::IntArrayRef blocksize2, int64_t variant, int64_t v3_splits,
                int64_t v3_kparts, int64_t pdl,
                const c10::List<c10::optional<at::Tensor>>& lora_xa,
                const c10::List<c10::optional<at::Tensor>>& lora_b,
                at::ArrayRef<double> lora_scale, at::TensorList y) {
  const size_t n = packed.size();
  FASTFT_CHECK(n >= 1, "fastft nf4: nf4_gemv_group needs at least one weight");
  for (size_t len : {absmax.size(), absmax2.size(), code2.size(), offset.size(), code.size(),
                     bias.size(), blocksize.size(), blocksize2.size(), lora_xa.size(),
                     lora_b.size(), lora_scale.size(), y.size()})
    FASTFT_CHECK(len == n, "fastft nf4: nf4_gemv_group takes one entry per weight in every list "
                "(", n, " packed weights, a list of ", len, ")");
  check_rows(x, "x");
  const at::Tensor xa = aligned_rows(x);  // once: the group shares one x
  std::vector<GemvCall> calls;
  calls.reserve(n);
  for (size_t s = 0; s < n; ++s)
    calls.push_back(prepare_gemv(xa, packed[s], absmax[s], absmax2.get(s), code2.get(s),
                                 offset.get(s), code[s], bias.get(s), blocksize[s],
                                 blocksize2[s], variant, v3_splits, v3_kparts, pdl,
                                 lora_xa.get(s), lora_b.get(s), lora_scale[s], y[s]));
  NF4GemvGroup g{};
  g.count = (int)n;
  if (n <= (size_t)kNF4GroupMax) {
    for (size_t s = 0; s < n; ++s) {
      g.w[s] = calls[s].w;
      g.a[s] = calls[s].a;
      g.lr[s] = calls[s].lr;
    }
  }
  c10::cuda::CUDAGuard guard(xa.device());
  if (n > (size_t)kNF4GroupMax || !nf4_gemv_group_plan(g, sm_count(xa))) {
    for (GemvCall& call : calls) launch_gemv_call(call);
    return;
  }
  int64_t floats = 0;
  for (int s = 0; s < g.count; ++s) floats += nf4_gemv_scratch_floats(g.a[s]);
  at::Tensor scratch;
  if (floats > 0) {
    scratch = at::empty({floats}, xa.options().dtype(at::kFloat));
    const unsigned long long tag = nf4_gemv_counter_tag();
    float* at = scratch.data_ptr<float>();
    for (int s = 0; s < g.count; ++s) {
      const int64_t mine = nf4_gemv_scratch_floats(g.a[s]);
      if (mine > 0) nf4_gemv_point_into_scratch(g.a[s], at, tag);
      at += mine;
    }
  }
  nf4_gemv_group(g, stream_of(xa));
  check_launch(launch_hint(g.a[0].pdl));
}

// out = x·aᵀ for M <= 16 rows of x (nf4_low_rank_input in nf4.h).
void low_rank_input(const at::Tensor& x, const at::Tensor& a, bool pdl, const at::Tensor& out) {
  check_rows(x, "x");
  check_rows(a, "a");
  check_rows(out, "out");
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0);
  FASTFT_CHECK(M >= 1 && M <= 16, "fastft nf4_low_rank_input: takes 1 to 16 rows of x, got ", M,
              " (use a matmul)");
  FASTFT_CHECK(a.size(1) == K, "fastft nf4_low_rank_input: a must be [R, ", K, "], got ",
              a.sizes());
  FASTFT_CHECK(out.size(0) == M && out.size(1) == R, "fastft nf4_low_rank_input: out must be [",
              M, ", ", R, "], got ", out.sizes());
  FASTFT_CHECK(R >= 1 && R <= INT32_MAX, "fastft nf4_low_rank_input: a needs 1 to 2^31 - 1 rows");
  FASTFT_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "fastft nf4_low_rank_input: takes bfloat16 or float16, got ", x.scalar_type());
  FASTFT_CHECK(a.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "fastft nf4_low_rank_input: x, a and out must have one dtype");
  FASTFT_CHECK(a.device() == x.device() && out.device() == x.device(),
              "fastft nf4_low_rank_input: x, a and out must be on one device");
  for (const at::Tensor* t : {&x, &a})
    FASTFT_CHECK(K % 8 == 0 && t->stride(0) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "fastft nf4_low_rank_input: needs in_features % 8 == 0 and 16-byte aligned rows "
                "(got K = ", K, ", strides ", t->strides(), ")");
  c10::cuda::CUDAGuard guard(x.device());
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  NF4LowRankInput p{};
  p.x = x.data_ptr(); p.x_stride = x.stride(0);
  p.a = a.data_ptr(); p.a_stride = a.stride(0);
  p.out = out.data_ptr(); p.out_stride = out.stride(0);
  p.M = (int)M; p.K = (int)K; p.R = (int)R;
  p.dtype = dtype_tag(x);
  p.pdl = pdl && major >= 9;
  p.clusters = major >= 9;
  nf4_low_rank_input(p, stream_of(x));
  check_launch(p.pdl ? " (nf4_low_rank_input, launched with programmatic dependent launch; "
                       "FASTFT_NF4_PDL=0 turns it off)"
                     : " (nf4_low_rank_input)");
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("nf4_dequantize", &fastft::dequantize);
  m.impl("nf4_gemv", &fastft::gemv);
  m.impl("nf4_gemv_group", &fastft::gemv_group);
  m.impl("nf4_low_rank_input", &fastft::low_rank_input);
}
