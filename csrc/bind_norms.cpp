// torch.ops.fastft.{rms,layer}_norm_{fwd,bwd}: checks, then the launchers in norms.cu.
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include "binding.h"

namespace fastft {
namespace {

int weight_tag(const c10::optional<at::Tensor>& w, const at::Tensor& x, const char* name) {
  if (!w.has_value()) return dtype_tag(x);
  check_cuda(*w, name);
  FASTFT_CHECK(w->dim() == 1 && w->size(0) == x.size(1) && w->is_contiguous(), "fastft: ", name,
              " must be a contiguous 1-D tensor of size ", x.size(1), ", got ", w->sizes());
  FASTFT_CHECK(w->scalar_type() == x.scalar_type() || w->scalar_type() == at::kFloat, "fastft: ",
              name, " must have the input's dtype or float32, got ", w->scalar_type(), " for ",
              x.scalar_type(), " input");
  return dtype_tag(*w);
}

void check_out(const at::Tensor& out, const at::Tensor& like, const char* name) {
  check_rows(out, name);
  FASTFT_CHECK(out.sizes() == like.sizes() && out.scalar_type() == like.scalar_type(), "fastft: ",
              name, " must match the input's shape and dtype");
}

void check_stat(const at::Tensor& t, int64_t rows, const char* name) {
  check_cuda(t, name);
  FASTFT_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows && t.is_contiguous(), "fastft: ",
              name, " must be a contiguous float32 tensor of ", rows, " elements");
}

void forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
             const c10::optional<at::Tensor>& bias, const at::Tensor& y,
             const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, double eps,
             double offset, bool is_rms) {
  check_rows(x, "x");
  check_out(y, x, "y");
  check_stat(rstd, x.size(0), "rstd");
  if (mean) check_stat(*mean, x.size(0), "mean");
  const int w_tag = weight_tag(weight, x, "weight");
  if (bias) {
    int b_tag = weight_tag(bias, x, "bias");
    FASTFT_CHECK(!weight || b_tag == w_tag, "fastft: bias and weight must share a dtype");
  }
  c10::cuda::CUDAGuard guard(x.device());
  NormArgs a{};
  a.x = x.data_ptr(); a.x_stride = x.stride(0);
  a.weight = weight ? weight->data_ptr() : nullptr; a.w_dtype = w_tag;
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr(); a.y_stride = y.stride(0);
  a.mean = mean ? mean->data_ptr<float>() : nullptr;
  a.rstd = rstd.data_ptr<float>();
  a.rows = x.size(0); a.hidden = (int)x.size(1); a.dtype = dtype_tag(x);
  a.eps = (float)eps; a.offset = (float)offset; a.is_rms = is_rms;
  norm_forward(a, stream_of(x));
  check_launch();
}

void backward(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
              const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, const at::Tensor& dx,
              const c10::optional<at::Tensor>& dw, const c10::optional<at::Tensor>& db,
              double offset, bool is_rms) {
  check_rows(x, "x");
  check_rows(dy, "dy");
  FASTFT_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "fastft: dy must match x's shape and dtype");
  check_out(dx, x, "dx");
  check_stat(rstd, x.size(0), "rstd");
  if (mean) check_stat(*mean, x.size(0), "mean");
  const int w_tag = weight_tag(weight, x, "weight");
  FASTFT_CHECK(!dw || weight, "fastft: dw asked for without a weight");
  if (dw) FASTFT_CHECK(dw->sizes() == weight->sizes() && dw->scalar_type() == weight->scalar_type(),
                      "fastft: dw must match the weight's shape and dtype");
  if (db) FASTFT_CHECK(db->dim() == 1 && db->size(0) == x.size(1), "fastft: db has the wrong shape");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int hidden = (int)x.size(1);
  const bool partials = dw.has_value() || db.has_value();
  const int grid = partials ? norm_backward_partial_rows(rows, hidden, sm_count(x)) : (int)rows;
  at::Tensor dw_part, db_part;
  auto f32 = x.options().dtype(at::kFloat);
  if (dw && rows > 0) dw_part = at::empty({grid, hidden}, f32);
  if (db && rows > 0) db_part = at::empty({grid, hidden}, f32);
  NormBwdArgs a{};
  a.dy = dy.data_ptr(); a.dy_stride = dy.stride(0);
  a.x = x.data_ptr(); a.x_stride = x.stride(0);
  a.weight = weight ? weight->data_ptr() : nullptr; a.w_dtype = w_tag;
  a.mean = mean ? mean->data_ptr<float>() : nullptr;
  a.rstd = rstd.data_ptr<float>();
  a.dx = dx.data_ptr(); a.dx_stride = dx.stride(0);
  a.dw_partial = dw_part.defined() ? dw_part.data_ptr<float>() : nullptr;
  a.db_partial = db_part.defined() ? db_part.data_ptr<float>() : nullptr;
  a.rows = rows; a.hidden = hidden; a.dtype = dtype_tag(x);
  a.offset = (float)offset; a.is_rms = is_rms;
  norm_backward(a, grid, stream_of(x));
  check_launch();
  if (dw) {
    if (rows > 0) dw->copy_(at::sum(dw_part, {0}));
    else dw->zero_();
  }
  if (db) {
    if (rows > 0) db->copy_(at::sum(db_part, {0}));
    else db->zero_();
  }
}

void rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y,
                  const at::Tensor& rstd, double eps, double offset) {
  forward(x, weight, c10::nullopt, y, c10::nullopt, rstd, eps, offset, true);
}

void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& rstd, const at::Tensor& dx,
                  const c10::optional<at::Tensor>& dw, double offset) {
  backward(dy, x, weight, c10::nullopt, rstd, dx, dw, c10::nullopt, offset, true);
}

void layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& y,
                    const at::Tensor& mean, const at::Tensor& rstd, double eps) {
  forward(x, weight, bias, y, mean, rstd, eps, 0.0, false);
}

void layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                    const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                    const at::Tensor& rstd, const at::Tensor& dx,
                    const c10::optional<at::Tensor>& dw, const c10::optional<at::Tensor>& db) {
  backward(dy, x, weight, mean, rstd, dx, dw, db, 0.0, false);
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("rms_norm_fwd", &fastft::rms_norm_fwd);
  m.impl("rms_norm_bwd", &fastft::rms_norm_bwd);
  m.impl("layer_norm_fwd", &fastft::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastft::layer_norm_bwd);
}
