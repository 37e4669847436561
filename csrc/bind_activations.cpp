// torch.ops.fastft.glu_{fwd,bwd,bwd_inplace}: checks, then the launchers in activations.cu.
#include "activations.h"
#include "binding.h"

namespace fastft {
namespace {

// gate: a [rows, n] CUDA view with a contiguous last dim; every other tensor of the op: the
// same shape, dtype and device as gate (rows may have their own stride).
void check_gate(const at::Tensor& gate, int64_t act) {
  check_rows(gate, "gate");
  FASTFT_CHECK(act == kSiLU || act == kGeluErf || act == kGeluTanh,
              "fastft: act must be 0 (SiLU), 1 (GELU erf) or 2 (GELU tanh), got ", act);
}

void check_like(const at::Tensor& t, const at::Tensor& gate, const char* name) {
  check_rows(t, name);
  FASTFT_CHECK(t.sizes() == gate.sizes() && t.scalar_type() == gate.scalar_type(), "fastft: ", name,
              " must match gate's shape ", gate.sizes(), " and dtype ", gate.scalar_type(),
              ", got ", t.sizes(), " ", t.scalar_type());
  FASTFT_CHECK(t.device() == gate.device(), "fastft: ", name, " is on ", t.device(),
              ", gate on ", gate.device());
}

void glu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out, int64_t act) {
  check_gate(gate, act);
  check_like(up, gate, "up");
  check_like(out, gate, "out");
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

// d_gate / d_up: where the gradients go (gate / up themselves for the in-place op); h, when
// given, also receives act(gate) * up (it may be dh itself, never gate or up).
void backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
              const at::Tensor& d_gate, const at::Tensor& d_up,
              const c10::optional<at::Tensor>& h, int64_t act) {
  check_gate(gate, act);
  check_like(up, gate, "up");
  check_like(dh, gate, "dh");
  check_like(d_gate, gate, "d_gate");
  check_like(d_up, gate, "d_up");
  if (h) check_like(*h, gate, "h");
  c10::cuda::CUDAGuard guard(gate.device());
  GluBwdArgs a{};
  a.dh = dh.data_ptr(); a.dh_stride = dh.stride(0);
  a.gate = gate.data_ptr(); a.g_stride = gate.stride(0);
  a.up = up.data_ptr(); a.u_stride = up.stride(0);
  a.d_gate = d_gate.data_ptr(); a.dg_stride = d_gate.stride(0);
  a.d_up = d_up.data_ptr(); a.du_stride = d_up.stride(0);
  a.h = h ? h->data_ptr() : nullptr; a.h_stride = h ? h->stride(0) : 0;
  a.rows = gate.size(0); a.n = gate.size(1);
  a.dtype = dtype_tag(gate); a.act = (int)act;
  glu_backward(a, stream_of(gate));
  check_launch();
}

void glu_bwd(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
             const at::Tensor& d_gate, const at::Tensor& d_up, int64_t act,
             const c10::optional<at::Tensor>& h) {
  backward(dh, gate, up, d_gate, d_up, h, act);
}

void glu_bwd_inplace(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up,
                     int64_t act, const c10::optional<at::Tensor>& h) {
  backward(dh, gate, up, gate, up, h, act);
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("glu_fwd", &fastft::glu_fwd);
  m.impl("glu_bwd", &fastft::glu_bwd);
  m.impl("glu_bwd_inplace", &fastft::glu_bwd_inplace);
}
