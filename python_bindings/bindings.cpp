// Registers the C++ kernel as torch ops in the `atman_kernels` namespace and provides the
// Python module `atman_kernels._C` whose import loads this library:
//
//   torch.ops.atman_kernels.suppressed_attention(q, k, v, factors, key_padding_mask, causal,
//                                                scale, suppression_mode) -> Tensor
//   torch.ops.atman_kernels.suppressed_attention_out(..., out) -> ()   (writes into out)
//
// The mode argument is called suppression_mode, not mode: torch's auto-functionalization of
// mutable ops (torch.compile, opcheck of the out op) has a parameter named `mode` of its own.
//
// The module itself has three functions about the kernel's instruction-set level
// (csrc/cpu_isa.h): `isa()`, `supported_isa()` -> "default" | "avx2" | "avx512", and
// `_set_isa(name)` (tests; "" restores the ATEN_CPU_CAPABILITY / CPUID choice; returns the
// level active before; ValueError when the CPU cannot run it).
//
// Shapes and semantics: csrc/suppressed_attention.h. Fake (meta) implementations for
// torch.compile live in atman_kernels/ops/cpp_backend.py.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "../csrc/cpu_isa.h"
#include "../csrc/suppressed_attention.h"

namespace {

PyObject* isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(atman::active_isa().c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* supported_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(atman::supported_isa().c_str());
}

PyObject* set_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;  // not a str: TypeError already set
  try {
    return PyUnicode_FromString(atman::set_isa_override(name).c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "The active instruction-set level of the CPU kernel."},
    {"supported_isa", supported_isa, METH_NOARGS,
     "The best instruction-set level this CPU and this build run."},
    {"_set_isa", set_isa, METH_O,
     "Tests only: force a level ('' restores the default choice); returns the previous one."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing the module runs the static op registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "C++ CPU kernels of atman_kernels; the ops live in torch.ops.atman_kernels.",
      -1,  // no per-module state
      methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(atman_kernels, m) {
  m.def(
      "suppressed_attention(Tensor q, Tensor k, Tensor v, Tensor? factors, "
      "Tensor? key_padding_mask, bool causal, float scale, str suppression_mode, "
      "float? softcap=None, Tensor? sinks=None) -> Tensor");
  m.def(
      "suppressed_attention_out(Tensor q, Tensor k, Tensor v, Tensor? factors, "
      "Tensor? key_padding_mask, bool causal, float scale, str suppression_mode, "
      "Tensor(a!) out, float? softcap=None, Tensor? sinks=None) -> ()");
}

TORCH_LIBRARY_IMPL(atman_kernels, CPU, m) {
  m.impl("suppressed_attention", &atman::suppressed_attention_cpu);
  m.impl("suppressed_attention_out", &atman::suppressed_attention_out_cpu);
}
