// Registers the C++ kernel as torch ops in the `atman_kernels` namespace and provides the
// (empty) Python module `atman_kernels._C` whose import loads this library:
//
//   torch.ops.atman_kernels.suppressed_attention(q, k, v, factors, key_padding_mask, causal,
//                                                scale, suppression_mode) -> Tensor
//   torch.ops.atman_kernels.suppressed_attention_out(..., out) -> ()   (writes into out)
//
// The mode argument is called suppression_mode, not mode: torch's auto-functionalization of
// mutable ops (torch.compile, opcheck of the out op) has a parameter named `mode` of its own.
//
// Shapes and semantics: csrc/suppressed_attention.h. Fake (meta) implementations for
// torch.compile live in atman_kernels/ops/cpp_backend.py.
#include <Python.h>
#include <torch/library.h>

#include "../csrc/suppressed_attention.h"

extern "C" {
// A module with no Python-level members: importing it runs the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "C++ CPU kernels of atman_kernels; the ops live in torch.ops.atman_kernels.",
      -1,      // no per-module state
      nullptr  // no methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(atman_kernels, m) {
  m.def(
      "suppressed_attention(Tensor q, Tensor k, Tensor v, Tensor? factors, "
      "Tensor? key_padding_mask, bool causal, float scale, str suppression_mode) -> Tensor");
  m.def(
      "suppressed_attention_out(Tensor q, Tensor k, Tensor v, Tensor? factors, "
      "Tensor? key_padding_mask, bool causal, float scale, str suppression_mode, "
      "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(atman_kernels, CPU, m) {
  m.impl("suppressed_attention", &atman::suppressed_attention_cpu);
  m.impl("suppressed_attention_out", &atman::suppressed_attention_out_cpu);
}
