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
  // ---- cross_entropy (cross_entropy.cu)
  // ---- nf4 (nf4.cu)
}

static PyModuleDef fastft_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fastft CUDA kernels (ops under torch.ops.fastft)", -1,
                                      nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastft_c_module);
  if (m == nullptr) return nullptr;
  return m;
}
