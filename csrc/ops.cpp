// Every schema of the torch_dlt operator library, in one place.
// Kernels register per dispatch key in csrc/cpu/ and csrc/cuda/; fake kernels and autograd
// formulas are registered from Python (torch_dlt/ops/_fake.py).
#include <torch/library.h>

TORCH_LIBRARY(torch_dlt, m) {
  // Per-feature mean, population variance and excess kurtosis of x along `dim`, one pass over
  // memory with Chan/Pebay merges of block statistics. float32 and float64.
  m.def("moments(Tensor x, int dim) -> (Tensor mean, Tensor var, Tensor kurtosis)");
}
