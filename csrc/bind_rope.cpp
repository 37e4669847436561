// torch.ops.fastft.rope: checks, then the launcher in rope.cu.
#include "binding.h"
#include "rope.h"

namespace fastft {
namespace {

void check_heads(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  FASTFT_CHECK(t.dim() == 4, "fastft: ", name, " must be 4-D [batch, seq, heads, head_dim], got ",
              t.sizes());
  FASTFT_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "fastft: ", name,
              " must have a contiguous last dim (call .contiguous())");
}

void check_out(const at::Tensor& out, const at::Tensor& like, const char* name) {
  check_heads(out, name);
  FASTFT_CHECK(out.sizes() == like.sizes() && out.scalar_type() == like.scalar_type(), "fastft: ",
              name, " must match its input's shape ", like.sizes(), " and dtype");
}

void check_table(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_cuda(t, name);
  FASTFT_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1), "fastft: ", name,
              " must be [batch, seq, rot] = [", q.size(0), ", ", q.size(1), ", rot] (expand a "
              "shared table), got ", t.sizes());
  FASTFT_CHECK(t.size(2) <= 1 || t.stride(2) == 1, "fastft: ", name,
              " must have a contiguous last dim");
  FASTFT_CHECK(t.scalar_type() == q.scalar_type(), "fastft: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
}

// q_out / k_out absent: rotated in place.
void rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
          const c10::optional<at::Tensor>& q_out, const c10::optional<at::Tensor>& k_out,
          bool backward) {
  check_heads(q, "q");
  check_heads(k, "k");
  FASTFT_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "fastft: q ", q.sizes(), " and k ", k.sizes(), " must agree on batch, seq, head_dim");
  FASTFT_CHECK(k.scalar_type() == q.scalar_type(), "fastft: q and k must share a dtype");
  check_table(cos, q, "cos");
  check_table(sin, q, "sin");
  FASTFT_CHECK(cos.size(2) == sin.size(2), "fastft: cos and sin must have the same rot dim");
  const int64_t rot = cos.size(2);
  FASTFT_CHECK(rot > 0 && rot % 2 == 0 && rot <= q.size(3), "fastft: rot dim ", rot,
              " must be even, positive and at most head_dim ", q.size(3));
  if (q_out) check_out(*q_out, q, "q_out");
  if (k_out) check_out(*k_out, k, "k_out");
  const at::Tensor& qo = q_out ? *q_out : q;
  const at::Tensor& ko = k_out ? *k_out : k;
  c10::cuda::CUDAGuard guard(q.device());
  RopeArgs a{};
  a.q = q.data_ptr(); a.k = k.data_ptr();
  a.q_out = qo.data_ptr(); a.k_out = ko.data_ptr();
  a.cos = cos.data_ptr(); a.sin = sin.data_ptr();
  a.q_sb = q.stride(0); a.q_ss = q.stride(1); a.q_sh = q.stride(2);
  a.k_sb = k.stride(0); a.k_ss = k.stride(1); a.k_sh = k.stride(2);
  a.qo_sb = qo.stride(0); a.qo_ss = qo.stride(1); a.qo_sh = qo.stride(2);
  a.ko_sb = ko.stride(0); a.ko_ss = ko.stride(1); a.ko_sh = ko.stride(2);
  a.c_sb = cos.stride(0); a.c_ss = cos.stride(1);
  a.s_sb = sin.stride(0); a.s_ss = sin.stride(1);
  a.batch = q.size(0); a.seq = q.size(1);
  a.hq = (int)q.size(2); a.hk = (int)k.size(2);
  a.head_dim = (int)q.size(3); a.rot = (int)rot;
  a.dtype = dtype_tag(q);
  a.backward = backward;
  a.copy_tail_q = q_out.has_value();
  a.copy_tail_k = k_out.has_value();
  rope_apply(a, stream_of(q));
  check_launch();
}

void rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                  const at::Tensor& sin, bool backward) {
  rope(q, k, cos, sin, c10::nullopt, c10::nullopt, backward);
}

void rope_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
              const at::Tensor& sin, const at::Tensor& q_out, const at::Tensor& k_out,
              bool backward) {
  rope(q, k, cos, sin, q_out, k_out, backward);
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("rope_inplace", &fastft::rope_inplace);
  m.impl("rope_out", &fastft::rope_out);
}
