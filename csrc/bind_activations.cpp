// torch.ops.fastft.glu_{fwd,bwd}: checks, then the launchers in activations.cu.
#include "activations.h"
#include "binding.h"

namespace fastft {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check_rows(t, name);
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "fastft: ", name,
              " must match gate's shape ", like.sizes(), " and dtype ", like.scalar_type(),
              ", got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastft: ", name, " is on ", t.device(),
              ", gate on ", like.device());
}

void check_act(int64_t act) {
  TORCH_CHECK(act == kSiLU || act == kGeluErf || act == kGeluTanh,
              "fastft: act must be 0 (SiLU), 1 (GELU erf) or 2 (GELU tanh), got ", act);
}

void glu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out, int64_t act) {
  check_rows(gate, "gate");
  check_like(up, gate, "up");
  check_like(out, gate, "out");
  check_act(act);
  c10::cuda::CUDAGuard guard(gate.device());
  GluFwdArgs a{};
  a.gate = gate.data_ptr(); a.g_stride = gate.stride(0);
  a.up = up.data_ptr(); a.u_stride = up.stride(0);
  a.out = out.data_ptr(); a.o_stride = out.stride(0);
  a.rows = gate.size(0); a.n = gate.size(1);
  a.dtype = dtype_tag(gate); a.act = (int)act;
  glu_forward(a, stream_of(gate));
  check_launch();
}

// d_gate / d_up absent: the gradients are written into gate / up (in place).
void backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
              const c10::optional<at::Tensor>& d_gate, const c10::optional<at::Tensor>& d_up,
              int64_t act) {
  check_rows(gate, "gate");
  check_like(up, gate, "up");
  check_like(dh, gate, "dh");
  const at::Tensor& dg = d_gate ? *d_gate : gate;
  const at::Tensor& du = d_up ? *d_up : up;
  if (d_gate) check_like(*d_gate, gate, "d_gate");
  if (d_up) check_like(*d_up, gate, "d_up");
  check_act(act);
  c10::cuda::CUDAGuard guard(gate.device());
  GluBwdArgs a{};
  a.dh = dh.data_ptr(); a.dh_stride = dh.stride(0);
  a.gate = gate.data_ptr(); a.g_stride = gate.stride(0);
  a.up = up.data_ptr(); a.u_stride = up.stride(0);
  a.d_gate = dg.data_ptr(); a.dg_stride = dg.stride(0);
  a.d_up = du.data_ptr(); a.du_stride = du.stride(0);
  a.rows = gate.size(0); a.n = gate.size(1);
  a.dtype = dtype_tag(gate); a.act = (int)act;
  glu_backward(a, stream_of(gate));
  check_launch();
}

void glu_bwd(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
             const at::Tensor& d_gate, const at::Tensor& d_up, int64_t act) {
  backward(dh, gate, up, d_gate, d_up, act);
}

void glu_bwd_inplace(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
                     int64_t act) {
  backward(dh, gate, up, c10::nullopt, c10::nullopt, act);
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("glu_fwd", &fastft::glu_fwd);
  m.impl("glu_bwd", &fastft::glu_bwd);
  m.impl("glu_bwd_inplace", &fastft::glu_bwd_inplace);
}
