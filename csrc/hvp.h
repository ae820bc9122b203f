// R-operator (Pearlmutter 1994, "Fast exact multiplication by the Hessian") building blocks shared
// by the CPU and CUDA kernels of the Hessian- / Gauss-Newton-vector product ops.
//
// Layouts: a primal activation is [B, *rest]; its R-tensors (directional derivatives along k
// parameter directions at once) are [B, k, *rest], so every direction shares the primal's batch
// index and a block of k directions is a single tensor for matmuls, convolutions and pooling.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace torch_dlt {

// Activation kinds of the `kind` argument (torch_dlt/ops/_hvp_reference.py: ActivationKind).
// (a, b) carry each kind's constants: LeakyReLU slope; ELU (alpha, scale) so SELU is an ELU;
// Softplus (beta, threshold); Hardtanh (min, max); CELU alpha.
enum ActivationKind : int64_t {
  kReLU = 1,
  kLeakyReLU = 2,
  kTanh = 3,
  kSigmoid = 4,
  kGELU = 5,
  kGELUTanh = 6,
  kELU = 7,
  kSoftplus = 8,
  kSiLU = 9,
  kHardtanh = 10,
  kErf = 11,
  kCELU = 12,
};

template <typename acc_t>
struct Derivatives {
  acc_t d1;  // sigma'(x)
  acc_t d2;  // sigma''(x)
};

// First and second derivative of the activation at pre-activation x with output y = sigma(x).
// Where y gives them more cheaply than x (tanh, sigmoid) it is used. Non-smooth points take the
// one-sided values PyTorch's own backward formulas take, so the products agree with autograd.
template <typename acc_t>
C10_HOST_DEVICE inline Derivatives<acc_t> activation_derivatives(int64_t kind, acc_t x, acc_t y,
                                                                 acc_t a, acc_t b) {
  const acc_t one = acc_t(1);
  const acc_t zero = acc_t(0);
  switch (kind) {
    case kReLU:
      return {x > zero ? one : zero, zero};
    case kLeakyReLU:
      return {x > zero ? one : a, zero};
    case kTanh: {
      const acc_t d1 = one - y * y;
      return {d1, acc_t(-2) * y * d1};
    }
    case kSigmoid: {
      const acc_t d1 = y * (one - y);
      return {d1, d1 * (one - acc_t(2) * y)};
    }
    case kGELU: {
      const acc_t pdf = ::exp(acc_t(-0.5) * x * x) * acc_t(0.3989422804014327);
      const acc_t cdf = acc_t(0.5) * (one + ::erf(x * acc_t(0.7071067811865476)));
      return {cdf + x * pdf, pdf * (acc_t(2) - x * x)};
    }
    case kGELUTanh: {
      const acc_t c = acc_t(0.7978845608028654);  // sqrt(2 / pi)
      const acc_t kappa = acc_t(0.044715);
      const acc_t t = ::tanh(c * (x + kappa * x * x * x));
      const acc_t sech2 = one - t * t;
      const acc_t du = c * (one + acc_t(3) * kappa * x * x);
      const acc_t ddu = c * acc_t(6) * kappa * x;
      return {acc_t(0.5) * (one + t) + acc_t(0.5) * x * sech2 * du,
              sech2 * du + acc_t(0.5) * x * sech2 * (ddu - acc_t(2) * t * du * du)};
    }
    case kELU: {
      if (x > zero) return {b, zero};
      const acc_t e = b * a * ::exp(x);
      return {e, e};
    }
    case kSoftplus: {
      if (x * a > b) return {one, zero};
      const acc_t s = one / (one + ::exp(-a * x));
      return {s, a * s * (one - s)};
    }
    case kSiLU: {
      const acc_t s = one / (one + ::exp(-x));
      return {s * (one + x * (one - s)), s * (one - s) * (acc_t(2) + x * (one - acc_t(2) * s))};
    }
    case kHardtanh:
      return {(x > a && x < b) ? one : zero, zero};
    case kErf: {
      const acc_t d1 = acc_t(1.1283791670955126) * ::exp(-x * x);  // 2 / sqrt(pi)
      return {d1, acc_t(-2) * x * d1};
    }
    case kCELU: {
      if (x > zero) return {one, zero};
      const acc_t e = ::exp(x / a);
      return {e, e / a};
    }
    default:
      return {zero, zero};
  }
}

inline void check_activation_kind(int64_t kind, const char* op) {
  TORCH_CHECK(kind >= kReLU && kind <= kCELU, "torch_dlt::", op, ": unknown activation kind ",
              kind, " (accepted: 1 to 12, see torch_dlt/ops/_hvp_reference.py)");
}

// x: [B, *rest] and a direction block v: [B, k, *rest]; returns (B, k, rest).
inline std::tuple<int64_t, int64_t, int64_t> direction_block_shape(const at::Tensor& x,
                                                                   const at::Tensor& v,
                                                                   const char* op,
                                                                   const char* name) {
  TORCH_CHECK(x.dim() >= 1, "torch_dlt::", op, ": x must have a batch dimension");
  TORCH_CHECK(v.dim() == x.dim() + 1 && v.size(0) == x.size(0) &&
                  v.sizes().slice(2).equals(x.sizes().slice(1)),
              "torch_dlt::", op, ": ", name, " must have shape [B, k, *x.shape[1:]] for x of shape ",
              x.sizes(), ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.device() == x.device(), "torch_dlt::", op,
              ": ", name, " must have x's dtype and device");
  const int64_t batch = x.size(0);
  const int64_t rest = batch == 0 ? 0 : x.numel() / batch;
  return {batch, v.size(1), rest};
}

// Loss kinds and reductions of loss_curvature / sequential_hvp.
enum LossKind : int64_t { kCrossEntropy = 0, kMSE = 1 };
enum Reduction : int64_t { kMean = 0, kSum = 1 };

// The whole-program R-operator sweep; device-generic (ATen calls + the fused ops through the
// dispatcher), registered for CPU in csrc/cpu/hvp.cpp and for CUDA in csrc/cuda/hvp.cu.
std::vector<at::Tensor> sequential_hvp(const at::Tensor& inputs, const at::Tensor& targets,
                                       at::TensorList params,
                                       const c10::List<std::optional<at::Tensor>>& directions,
                                       at::IntArrayRef program, at::ArrayRef<double> constants,
                                       int64_t loss, int64_t reduction, bool ggn,
                                       at::TensorList primal);

// The primal pass sequential_hvp can reuse across calls with the same inputs and params: every
// layer's output, then (gradients) the loss gradient with respect to each; empty tensors where
// the output is a view of the layer's input (Flatten).
std::vector<at::Tensor> sequential_primal(const at::Tensor& inputs, const at::Tensor& targets,
                                          at::TensorList params, at::IntArrayRef program,
                                          at::ArrayRef<double> constants, int64_t loss,
                                          int64_t reduction, bool gradients);

}  // namespace torch_dlt
