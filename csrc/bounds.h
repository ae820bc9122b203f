// Row kernels of CROWN's ReLU step (csrc/cpu/bounds.cpp), shared with the fused input-layer
// bound (csrc/cpu/phase_conv.cpp). A row is one specification row of an A-matrix over K units.
#pragma once

#include <cmath>
#include <cstdint>

namespace torch_dlt {
namespace bounds_rows {

constexpr int64_t kLanes = 8;  // independent partial sums: the dot products vectorise

// min(x, 0) without a branch (a data-dependent branch per element costs a misprediction on
// every other one): x - |x| is exactly 2x or 0.
template <typename T>
inline T negative_part(T x) {
  return T(0.5) * (x - std::abs(x));
}

// One row of relu_lines: writes o, returns the row's bias. Pointer parameters (GCC honours
// restrict on parameters, not on local pointers) let the loops vectorise.
template <typename T, bool kAll>
inline T forward_row(int64_t K, const T* __restrict a, const T* __restrict l,
                     const T* __restrict u, const T* __restrict n, const T* __restrict v,
                     T* __restrict o) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const T x = a[k + j];
      const T neg = negative_part(x);
      o[k + j] = l[k + j] * x + (u[k + j] - l[k + j]) * neg;
      acc[j] += kAll ? neg * n[k + j] + x * v[k + j] : neg * n[k + j];
    }
  }
  T total = 0;
  for (; k < K; ++k) {
    const T x = a[k];
    const T neg = negative_part(x);
    o[k] = l[k] * x + (u[k] - l[k]) * neg;
    total += kAll ? neg * n[k] + x * v[k] : neg * n[k];
  }
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// forward_row writing A_in over the row itself.
template <typename T, bool kAll>
inline T forward_row_in_place(int64_t K, T* __restrict a, const T* __restrict l,
                              const T* __restrict u, const T* __restrict n,
                              const T* __restrict v) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const T x = a[k + j];
      const T neg = negative_part(x);
      a[k + j] = l[k + j] * x + (u[k + j] - l[k + j]) * neg;
      acc[j] += kAll ? neg * n[k + j] + x * v[k + j] : neg * n[k + j];
    }
  }
  T total = 0;
  for (; k < K; ++k) {
    const T x = a[k];
    const T neg = negative_part(x);
    a[k] = l[k] * x + (u[k] - l[k]) * neg;
    total += kAll ? neg * n[k] + x * v[k] : neg * n[k];
  }
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// Columns [k0, k1) of one row of the gradient: writes o, accumulates the four vector gradients.
template <typename T, bool kAll>
inline void backward_row(int64_t k0, int64_t k1, T h, const T* __restrict a,
                         const T* __restrict g, const T* __restrict l, const T* __restrict u,
                         const T* __restrict n, const T* __restrict v, T* __restrict o,
                         T* __restrict out_l, T* __restrict out_u, T* __restrict out_n,
                         T* __restrict out_v) {
  for (int64_t k = k0; k < k1; ++k) {
    const T x = a[k], gk = g[k];
    const T neg = negative_part(x);
    const T below = T(x < T(0));  // 1 or 0, without a branch
    // slope_l (and v_all) everywhere, plus (slope_u - slope_l) and v_neg where A < 0
    const T grad = gk * l[k] + below * (gk * (u[k] - l[k]) + h * n[k]);
    o[k] = kAll ? grad + h * v[k] : grad;
    out_l[k] += gk * (x - neg);
    out_u[k] += gk * neg;
    out_n[k] += h * neg;
    if (kAll) out_v[k] += h * x;
  }
}

}  // namespace bounds_rows
}  // namespace torch_dlt
