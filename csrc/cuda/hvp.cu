// CUDA kernels of the R-operator ops: the fused activation R-forward / R-backward and the loss
// curvature products. The whole-program sweep sequential_hvp (csrc/cpu/hvp.cpp) is
// device-generic and is registered for CUDA here, so on a GPU its ATen calls and these kernels
// all run on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "hvp.h"

namespace torch_dlt {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::max<int64_t>(1, (n + kThreads - 1) / kThreads); }

void check_floating_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), "torch_dlt::", op, " (CUDA kernel): x is on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "torch_dlt::", op,
              ": x must be float32 or float64, got ", t.scalar_type());
}

// One thread per element of the direction block v [B, k, rest]; the primal index drops j.
template <typename scalar_t>
__global__ void activation_jvp_kernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ y,
                                      const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                      int64_t n, int64_t k, int64_t rest, int64_t kind,
                                      at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t p = (i / (k * rest)) * rest + i % rest;
  const auto d = activation_derivatives<acc_t>(kind, x[p], y[p], a, b);
  out[i] = static_cast<scalar_t>(d.d1 * static_cast<acc_t>(v[i]));
}

// One thread per primal element: its derivatives serve the plain gradient and all k directions.
template <typename scalar_t>
__global__ void activation_hvp_backward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ rx, const scalar_t* __restrict__ rg, scalar_t* __restrict__ gx,
    scalar_t* __restrict__ rgx, int64_t n, int64_t k, int64_t rest, int64_t kind,
    at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= n) return;
  const auto d = activation_derivatives<acc_t>(kind, x[p], y[p], a, b);
  const acc_t gp = g[p];
  gx[p] = static_cast<scalar_t>(d.d1 * gp);
  const acc_t d2g = d.d2 * gp;
  const int64_t base = (p / rest) * k * rest + p % rest;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t q = base + j * rest;
    rgx[q] = static_cast<scalar_t>(d.d1 * static_cast<acc_t>(rg[q]) +
                                   d2g * static_cast<acc_t>(rx[q]));
  }
}

// One warp per (sample, direction) row: hz = s m p (rz - <p, rz>); the j = 0 warp also writes
// the gradient s (m p - t).
template <typename scalar_t>
__global__ void cross_entropy_curvature_kernel(
    const scalar_t* __restrict__ p, const int64_t* __restrict__ labels,
    const scalar_t* __restrict__ probs, const scalar_t* __restrict__ rz,
    scalar_t* __restrict__ grad, scalar_t* __restrict__ hz, int64_t batch, int64_t k,
    int64_t classes, at::opmath_type<scalar_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= batch * k) return;
  const int64_t row = warp / k;
  const int64_t j = warp % k;
  const scalar_t* pr = p + row * classes;
  const scalar_t* rr = rz + (row * k + j) * classes;
  acc_t dot = 0, mass = 0;
  for (int64_t c = lane; c < classes; c += 32) {
    dot += static_cast<acc_t>(pr[c]) * static_cast<acc_t>(rr[c]);
    if (probs != nullptr) mass += static_cast<acc_t>(probs[row * classes + c]);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    mass += __shfl_xor_sync(0xffffffffu, mass, offset);
  }
  if (probs == nullptr) mass = acc_t(1);
  scalar_t* hr = hz + (row * k + j) * classes;
  for (int64_t c = lane; c < classes; c += 32) {
    const acc_t pc = pr[c];
    hr[c] = static_cast<scalar_t>(s * mass * pc * (static_cast<acc_t>(rr[c]) - dot));
    if (j == 0) {
      const acc_t t = probs != nullptr ? static_cast<acc_t>(probs[row * classes + c])
                                       : (labels[row] == c ? acc_t(1) : acc_t(0));
      grad[row * classes + c] = static_cast<scalar_t>(s * (mass * pc - t));
    }
  }
}

at::Tensor activation_jvp_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
                               int64_t kind, double a, double b) {
  check_activation_kind(kind, "activation_jvp");
  check_floating_cuda(x, "activation_jvp");
  TORCH_CHECK(y.sizes().equals(x.sizes()), "torch_dlt::activation_jvp: y must have x's shape");
  const auto [batch, k, rest] = direction_block_shape(x, v, "activation_jvp", "v");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), yc = y.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(vc);
  const int64_t n = vc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_dlt::activation_jvp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_jvp_kernel<scalar_t>
        <<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
            vc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, k, rest, kind,
            static_cast<acc_t>(a), static_cast<acc_t>(b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> activation_hvp_backward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& g, const at::Tensor& rx,
    const at::Tensor& rg, int64_t kind, double a, double b) {
  check_activation_kind(kind, "activation_hvp_backward");
  check_floating_cuda(x, "activation_hvp_backward");
  TORCH_CHECK(y.sizes().equals(x.sizes()) && g.sizes().equals(x.sizes()),
              "torch_dlt::activation_hvp_backward: y and g must have x's shape ", x.sizes());
  const auto [batch, k, rest] = direction_block_shape(x, rg, "activation_hvp_backward", "rg");
  TORCH_CHECK(rx.sizes().equals(rg.sizes()),
              "torch_dlt::activation_hvp_backward: rx must have rg's shape ", rg.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), yc = y.contiguous(), gc = g.contiguous();
  const at::Tensor rxc = rx.contiguous(), rgc = rg.contiguous();
  at::Tensor gx = at::empty_like(xc);
  at::Tensor rgx = at::empty_like(rgc);
  const int64_t n = xc.numel();
  if (n == 0) return {gx, rgx};
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_dlt::activation_hvp_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_hvp_backward_kernel<scalar_t>
        <<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            xc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
            gc.const_data_ptr<scalar_t>(), rxc.const_data_ptr<scalar_t>(),
            rgc.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
            rgx.mutable_data_ptr<scalar_t>(), n, k, rest, kind, static_cast<acc_t>(a),
            static_cast<acc_t>(b));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, rgx};
}

std::tuple<at::Tensor, at::Tensor> loss_curvature_cuda(const at::Tensor& z,
                                                       const at::Tensor& targets,
                                                       const at::Tensor& rz, int64_t loss,
                                                       int64_t reduction) {
  check_floating_cuda(z, "loss_curvature");
  TORCH_CHECK(loss == kCrossEntropy || loss == kMSE,
              "torch_dlt::loss_curvature: loss must be 0 (cross-entropy) or 1 (MSE), got ", loss);
  TORCH_CHECK(reduction == kMean || reduction == kSum,
              "torch_dlt::loss_curvature: reduction must be 0 (mean) or 1 (sum), got ", reduction);
  const auto [batch, k, rest] = direction_block_shape(z, rz, "loss_curvature", "rz");
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous(), rzc = rz.contiguous();
  if (loss == kMSE) {
    TORCH_CHECK(targets.sizes().equals(z.sizes()) && targets.scalar_type() == z.scalar_type(),
                "torch_dlt::loss_curvature: MSE targets must have z's shape ", z.sizes(),
                " and dtype");
    const double s = 2.0 / (reduction == kMean ? static_cast<double>(z.numel()) : 1.0);
    return {at::mul(at::sub(zc, targets), s), at::mul(rzc, s)};
  }
  TORCH_CHECK(z.dim() == 2, "torch_dlt::loss_curvature: cross-entropy logits must be [B, C], got ",
              z.sizes());
  const bool indices = targets.scalar_type() == at::kLong;
  TORCH_CHECK(indices ? targets.sizes().equals({batch})
                      : (targets.sizes().equals(z.sizes()) &&
                         targets.scalar_type() == z.scalar_type()),
              "torch_dlt::loss_curvature: cross-entropy targets must be class indices (int64 [B]) "
              "or probabilities shaped like z, got ",
              targets.scalar_type(), " ", targets.sizes());
  const at::Tensor tc = targets.contiguous();
  const at::Tensor p = at::softmax(zc, 1);
  at::Tensor grad = at::empty_like(zc);
  at::Tensor hz = at::empty_like(rzc);
  const int64_t rows = batch * k;
  if (rows == 0) return {grad, hz};
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "torch_dlt::loss_curvature_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = reduction == kMean ? acc_t(1) / static_cast<acc_t>(batch) : acc_t(1);
    cross_entropy_curvature_kernel<scalar_t>
        <<<blocks_for(rows * 32), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            p.const_data_ptr<scalar_t>(), indices ? tc.const_data_ptr<int64_t>() : nullptr,
            indices ? nullptr : tc.const_data_ptr<scalar_t>(), rzc.const_data_ptr<scalar_t>(),
            grad.mutable_data_ptr<scalar_t>(), hz.mutable_data_ptr<scalar_t>(), batch, k, rest, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad, hz};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CUDA, m) {
  m.impl("activation_jvp", &activation_jvp_cuda);
  m.impl("activation_hvp_backward", &activation_hvp_backward_cuda);
  m.impl("loss_curvature", &loss_curvature_cuda);
  m.impl("sequential_hvp", &sequential_hvp);
  m.impl("sequential_primal", &sequential_primal);
}

}  // namespace torch_dlt
