// The one place where every fastft op schema is declared (TORCH_LIBRARY), plus the Python
// module init that makes `import fastft._C` load the kernels. CUDA implementations are
// registered beside their bindings in bind_*.cpp; fake (meta) ones in Python.
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(fastft, m) {
  // The SASS/PTX version the driver picked for our kernels on this device, or -1 when _C
  // holds no code that runs there: the dispatch table's "built for this GPU" test.
  m.def("kernel_image_version(int device) -> int", &fastft::kernel_image_version);
  // ---- norms (outputs are written into caller-allocated tensors)
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor(a!) y, Tensor(b!) rstd, float eps, "
        "float offset) -> ()");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor(a!) dx, "
        "Tensor(b!)? dw, float offset) -> ()");
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) y, Tensor(b!) mean, "
        "Tensor(c!) rstd, float eps) -> ()");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "Tensor(a!) dx, Tensor(b!)? dw, Tensor(c!)? db) -> ()");
  // ---- rope, swiglu / geglu (activations.cu, rope.cu)
  // q/k: [batch, seq, heads, head_dim] views; in place or into q_out/k_out (each op declares
  // exactly what it mutates: a declared mutation bumps version counters).
  m.def("rope_inplace(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool backward) -> ()");
  m.def("rope_out(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor(a!) q_out, "
        "Tensor(b!) k_out, bool backward) -> ()");
  // act: 0 SiLU, 1 GELU (erf), 2 GELU (tanh); glu_bwd_inplace writes d_gate/d_up into gate/up;
  // h, when given, also receives act(gate) * up (the forward's output; it may be dh itself).
  m.def("glu_fwd(Tensor gate, Tensor up, Tensor(a!) out, int act) -> ()");
  m.def("glu_bwd(Tensor dh, Tensor gate, Tensor up, Tensor(a!) d_gate, Tensor(b!) d_up, "
        "int act, Tensor(c!)? h=None) -> ()");
  m.def("glu_bwd_inplace(Tensor dh, Tensor(a!) gate, Tensor(b!) up, int act, "
        "Tensor(c!)? h=None) -> ()");
  // ---- cross_entropy (cross_entropy.cu)
  m.def("cross_entropy_fwd(Tensor logits, Tensor labels, Tensor(a!) loss, Tensor(b!)? grad, "
        "Tensor? row_weight, int ignore_index, float softcap, float logit_scale, "
        "float label_smoothing) -> ()");
  m.def("cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor labels, Tensor(b!) loss, "
        "Tensor row_weight, int ignore_index, float softcap, float logit_scale, "
        "float label_smoothing) -> ()");
  // ---- nf4 (nf4.cu)
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, "
        "Tensor? offset, Tensor code, int blocksize, int blocksize2, int numel, "
        "Tensor(a!) out) -> ()");
  m.def("nf4_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, "
        "Tensor? offset, Tensor code, Tensor? bias, int blocksize, int blocksize2, "
        "int variant, int v3_splits, int v3_kparts, int pdl, Tensor? lora_xa, Tensor? lora_b, "
        "float lora_scale, Tensor(a!) y) -> ()");
  // nf4_gemv over several weights of one x, one entry per weight in every list (q, k, v)
  m.def("nf4_gemv_group(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] absmax2, "
        "Tensor?[] code2, Tensor?[] offset, Tensor[] code, Tensor?[] bias, int[] blocksize, "
        "int[] blocksize2, int variant, int v3_splits, int v3_kparts, int pdl, "
        "Tensor?[] lora_xa, Tensor?[] lora_b, float[] lora_scale, Tensor(a!)[] y) -> ()");
  // out = x·aᵀ at M <= 16: a LoRA adapter's x·Aᵀ for nf4_gemv's low-rank term (lora_xa)
  m.def("nf4_low_rank_input(Tensor x, Tensor a, bool pdl, Tensor(a!) out) -> ()");
}

static PyModuleDef fastft_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fastft CUDA kernels (ops under torch.ops.fastft)", -1,
                                      nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastft_c_module);
  if (m == nullptr) return nullptr;
  return m;
}
