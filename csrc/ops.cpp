// Schemas of the roli:: ops and the Python module stub of roli._C. Kernels register per device in
// pgd_cpu.cpp (CPU) and cuda/ops_cuda.cpp (CUDA); fake (meta) kernels are registered from Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(roli, m) {
  m.def(
      "pgd_step_linf_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_t, float eps, Tensor? step_t, "
      "float step, float lo, float hi) -> ()");
  m.def(
      "pgd_step_l2_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_t, float eps, Tensor? step_t, "
      "float step, float lo, float hi) -> ()");
  m.def("keep_best_(Tensor(a!) best_x, Tensor(b!) best_score, Tensor x_adv, Tensor score) -> ()");
}

// Importing roli._C as a Python module loads the library and thereby runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "roli fused PGD ops (CPU/CUDA kernels)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
