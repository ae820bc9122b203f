// An empty Python module `torch_dlt._C`: importing it loads this shared library, whose static
// initialisers (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) register the ops with the dispatcher.
// No pybind11: the ops are reached through torch.ops.torch_dlt.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled kernels of torch_dlt, reached through torch.ops.torch_dlt.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
