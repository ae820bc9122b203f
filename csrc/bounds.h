// Row kernels of CROWN's ReLU step (csrc/cpu/bounds.cpp), shared with the fused input-layer
// bound (csrc/cpu/phase_conv.cpp). A row is one specification row of an A-matrix over K units.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace torch_dlt {
namespace bounds_rows {

// t with unit stride along its last dimension and, for A [B, m, K], rows K apart; the batch
// stride may be anything (0 for an expanded tensor).
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  const int64_t d = t.dim();
  bool ok = t.stride(d - 1) == 1 || t.size(d - 1) <= 1;
  if (d == 3) ok = ok && (t.stride(1) == t.size(2) || t.size(1) <= 1);
  return ok ? t : t.contiguous();
}

inline int64_t batch_stride(const at::Tensor& t) { return t.size(0) == 1 ? 0 : t.stride(0); }

// Geometry of A [B, m, K] and of the [B or 1, K] vectors.
struct Lines {
  int64_t batch, rows, cols;
};

inline Lines check_lines(const char* op, const at::Tensor& A, const at::Tensor& slope_l,
                         const at::Tensor& slope_u, const at::Tensor& v_neg,
                         const c10::optional<at::Tensor>& v_all) {
  TORCH_CHECK(A.dim() == 3, "torch_dlt::", op, ": A must be [B, m, K], got ", A.sizes());
  TORCH_CHECK(A.device().is_cpu(), "torch_dlt::", op, ": tensors must be on the CPU");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "torch_dlt::", op, ": A must be float32 or float64, got ", A.scalar_type());
  const Lines s{A.size(0), A.size(1), A.size(2)};
  auto check_vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && (t.size(0) == s.batch || t.size(0) == 1) && t.size(1) == s.cols,
                "torch_dlt::", op, ": ", name, " must be [B or 1, K] = [", s.batch, " or 1, ",
                s.cols, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == A.scalar_type() && t.device() == A.device(), "torch_dlt::", op,
                ": ", name, " must have A's dtype and device");
  };
  check_vector(slope_l, "slope_l");
  check_vector(slope_u, "slope_u");
  check_vector(v_neg, "v_neg");
  if (v_all.has_value()) check_vector(*v_all, "v_all");
  return s;
}

// Example b's rows of the relaxation's vectors (v == nullptr without v_all).
template <typename T>
struct LineRows {
  const T *sl, *su, *vn, *va;
  int64_t ssl, ssu, svn, sva;
  const T* l(int64_t b) const { return sl + b * ssl; }
  const T* u(int64_t b) const { return su + b * ssu; }
  const T* n(int64_t b) const { return vn + b * svn; }
  const T* v(int64_t b) const { return va == nullptr ? nullptr : va + b * sva; }
};

// The vectors of an op's arguments, rows contiguous, kept alive for the kernel.
struct LineVectors {
  at::Tensor sl, su, vn, va;
  LineVectors(const at::Tensor& slope_l, const at::Tensor& slope_u, const at::Tensor& v_neg,
              const c10::optional<at::Tensor>& v_all)
      : sl(rows_contiguous(slope_l)),
        su(rows_contiguous(slope_u)),
        vn(rows_contiguous(v_neg)),
        va(v_all.has_value() ? rows_contiguous(*v_all) : at::Tensor()) {}
  bool has_all() const { return va.defined(); }
  template <typename T>
  LineRows<T> rows() const {
    return {sl.const_data_ptr<T>(),
            su.const_data_ptr<T>(),
            vn.const_data_ptr<T>(),
            va.defined() ? va.const_data_ptr<T>() : nullptr,
            batch_stride(sl),
            batch_stride(su),
            batch_stride(vn),
            va.defined() ? batch_stride(va) : 0};
  }
};

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
