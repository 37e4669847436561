// torch.ops.fastft.cross_entropy_fwd{,_inplace}: checks, then the launcher in cross_entropy.cu.
#include <cstdlib>

#include "binding.h"
#include "cross_entropy.h"

namespace fastft {
namespace {

void check_common(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& loss) {
  check_rows(logits, "logits");
  FASTFT_CHECK(logits.size(1) >= 1, "fastft: logits need a vocab dim of at least 1");
  check_cuda(labels, "labels");
  FASTFT_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.is_contiguous() &&
                  labels.size(0) == logits.size(0),
              "fastft: labels must be a contiguous int64 tensor of ", logits.size(0),
              " elements (one per logits row), got ", labels.scalar_type(), " ", labels.sizes());
  check_cuda(loss, "loss");
  FASTFT_CHECK(loss.scalar_type() == at::kFloat && loss.dim() == 1 && loss.is_contiguous() &&
                  loss.size(0) == logits.size(0),
              "fastft: loss must be a contiguous float32 tensor of ", logits.size(0), " elements");
  FASTFT_CHECK(labels.device() == logits.device() && loss.device() == logits.device(),
              "fastft: logits, labels and loss must be on one device");
}

void check_weight(const at::Tensor& w, const at::Tensor& logits) {
  check_cuda(w, "row_weight");
  FASTFT_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() &&
                  (w.numel() == 1 || w.numel() == logits.size(0)),
              "fastft: row_weight must be a contiguous float32 tensor of 1 or ", logits.size(0),
              " elements, got ", w.scalar_type(), " ", w.sizes());
  FASTFT_CHECK(w.device() == logits.device(), "fastft: row_weight must be on the logits' device");
}

// Layout switches (benchmarks and tests compare them): FASTFT_CE_BLOCKS_PER_SM=1|2 forces the
// one-block-per-row kernel with that layout; FASTFT_CE_CLUSTER=1|2|4|8 forces the sm_90
// cluster kernel's blocks per row (H200, 16384 x 128256 bf16 fwd+bwd: 4 blocks 86.6% of copy
// bandwidth, 8 blocks 83.6%). Unset or 0 = the defaults.
int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

void launch(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& loss,
            void* grad, int64_t grad_stride, const c10::optional<at::Tensor>& row_weight,
            int64_t ignore_index, double softcap, double logit_scale, double label_smoothing) {
  c10::cuda::CUDAGuard guard(logits.device());
  CrossEntropyArgs a{};
  a.logits = logits.data_ptr(); a.logits_stride = logits.stride(0);
  a.labels = labels.data_ptr<int64_t>();
  a.loss = loss.data_ptr<float>();
  a.grad = grad; a.grad_stride = grad_stride;
  a.row_weight = row_weight ? row_weight->data_ptr<float>() : nullptr;
  a.weight_stride = row_weight && row_weight->numel() > 1 ? 1 : 0;
  a.rows = logits.size(0); a.vocab = logits.size(1); a.dtype = dtype_tag(logits);
  a.ignore_index = ignore_index;
  a.softcap = (float)softcap; a.scale = (float)logit_scale; a.smoothing = (float)label_smoothing;
  FASTFT_CHECK(a.rows < (int64_t{1} << 31), "fastft: cross_entropy takes fewer than 2^31 rows");
  CrossEntropyLayout layout;
  layout.blocks_per_sm = env_int("FASTFT_CE_BLOCKS_PER_SM");
  layout.cluster_size = env_int("FASTFT_CE_CLUSTER");
  cross_entropy_forward(a, layout, stream_of(logits));
  check_launch();
}

void cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& loss,
                       const c10::optional<at::Tensor>& grad,
                       const c10::optional<at::Tensor>& row_weight, int64_t ignore_index,
                       double softcap, double logit_scale, double label_smoothing) {
  check_common(logits, labels, loss);
  if (grad) {
    check_rows(*grad, "grad");
    FASTFT_CHECK(grad->sizes() == logits.sizes() && grad->scalar_type() == logits.scalar_type(),
                "fastft: grad must match the logits' shape and dtype");
    FASTFT_CHECK(row_weight.has_value(), "fastft: a gradient needs row_weight");
  }
  if (row_weight) check_weight(*row_weight, logits);
  launch(logits, labels, loss, grad ? grad->data_ptr() : nullptr, grad ? grad->stride(0) : 0,
         row_weight, ignore_index, softcap, logit_scale, label_smoothing);
}

void cross_entropy_fwd_inplace(const at::Tensor& logits, const at::Tensor& labels,
                               const at::Tensor& loss, const at::Tensor& row_weight,
                               int64_t ignore_index, double softcap, double logit_scale,
                               double label_smoothing) {
  check_common(logits, labels, loss);
  check_weight(row_weight, logits);
  launch(logits, labels, loss, logits.data_ptr(), logits.stride(0), row_weight, ignore_index,
         softcap, logit_scale, label_smoothing);
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("cross_entropy_fwd", &fastft::cross_entropy_fwd);
  m.impl("cross_entropy_fwd_inplace", &fastft::cross_entropy_fwd_inplace);
}
