// Running moment statistics and their exact pairwise merge, shared by the CPU and CUDA kernels.
//
// A state holds the count n, the mean and the central sums M2, M3, M4 (M_k = sum (x - mean)^k).
// merge() combines two disjoint sets exactly (Chan, Golub & LeVeque 1983 for M2; Pebay 2008,
// "Formulas for robust, one-pass parallel computation of covariances and arbitrary-order
// statistical moments", for M3 and M4), so blocks can be reduced in any order.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <tuple>

namespace torch_dlt {

template <typename acc_t>
struct MomentState {
  acc_t n;
  acc_t mean;
  acc_t m2;
  acc_t m3;
  acc_t m4;
};

template <typename acc_t>
C10_HOST_DEVICE inline MomentState<acc_t> empty_state() {
  return {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Welford-style update with one new sample (Terriberry's extension to M3, M4).
template <typename acc_t>
C10_HOST_DEVICE inline void push(MomentState<acc_t>& s, acc_t x) {
  const acc_t n1 = s.n;
  s.n += acc_t(1);
  const acc_t n = s.n;
  const acc_t delta = x - s.mean;
  const acc_t delta_n = delta / n;
  const acc_t delta_n2 = delta_n * delta_n;
  const acc_t term1 = delta * delta_n * n1;
  s.mean += delta_n;
  s.m4 += term1 * delta_n2 * (n * n - acc_t(3) * n + acc_t(3)) + acc_t(6) * delta_n2 * s.m2 -
          acc_t(4) * delta_n * s.m3;
  s.m3 += term1 * delta_n * (n - acc_t(2)) - acc_t(3) * delta_n * s.m2;
  s.m2 += term1;
}

template <typename acc_t>
C10_HOST_DEVICE inline MomentState<acc_t> merge(const MomentState<acc_t>& a,
                                                const MomentState<acc_t>& b) {
  if (a.n == acc_t(0)) return b;
  if (b.n == acc_t(0)) return a;
  const acc_t na = a.n, nb = b.n, n = na + nb;
  const acc_t delta = b.mean - a.mean;
  const acc_t delta_n = delta / n;
  const acc_t nab = na * nb;
  MomentState<acc_t> r;
  r.n = n;
  r.mean = a.mean + nb * delta_n;
  r.m2 = a.m2 + b.m2 + delta * delta_n * nab;
  r.m3 = a.m3 + b.m3 + delta * delta_n * delta_n * nab * (na - nb) +
         acc_t(3) * delta_n * (na * b.m2 - nb * a.m2);
  r.m4 = a.m4 + b.m4 + delta * delta_n * delta_n * delta_n * nab * (na * na - nab + nb * nb) +
         acc_t(6) * delta_n * delta_n * (na * na * b.m2 + nb * nb * a.m2) +
         acc_t(4) * delta_n * (na * b.m3 - nb * a.m3);
  return r;
}

// Population variance m2 / n and excess kurtosis n * M4 / M2^2 - 3 (nan when M2 == 0).
template <typename acc_t>
C10_HOST_DEVICE inline void finalize(const MomentState<acc_t>& s, acc_t* mean, acc_t* var,
                                     acc_t* kurtosis) {
  *mean = s.mean;
  *var = s.m2 / s.n;
  *kurtosis = s.n * s.m4 / (s.m2 * s.m2) - acc_t(3);
}

// Shape bookkeeping common to both kernels: x (contiguous) is viewed as [outer, reduce, inner].
struct ReductionShape {
  int64_t outer;
  int64_t reduce;
  int64_t inner;
};

inline ReductionShape check_moments_input(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.dim() >= 1, "torch_dlt::moments: x must have at least one dimension");
  TORCH_CHECK(dim >= -x.dim() && dim < x.dim(), "torch_dlt::moments: dim=", dim,
              " is out of range for a tensor with ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "torch_dlt::moments: x must be float32 or float64, got ", x.scalar_type());
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK(x.size(d) > 0, "torch_dlt::moments: dimension ", d, " of x is empty");
  ReductionShape s{1, x.size(d), 1};
  for (int64_t i = 0; i < d; ++i) s.outer *= x.size(i);
  for (int64_t i = d + 1; i < x.dim(); ++i) s.inner *= x.size(i);
  return s;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> make_moments_outputs(const at::Tensor& x,
                                                                           int64_t dim) {
  auto sizes = x.sizes().vec();
  sizes.erase(sizes.begin() + (dim < 0 ? dim + x.dim() : dim));
  auto opts = x.options();
  return {at::empty(sizes, opts), at::empty(sizes, opts), at::empty(sizes, opts)};
}

}  // namespace torch_dlt
