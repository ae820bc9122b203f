// CPU kernels of the R-operator ops, and the device-generic whole-program sweep sequential_hvp.
//
// sequential_hvp computes H V (or the generalised Gauss-Newton G V = J^T H_loss J V, Schraudolph
// 2002) of a loss over a sequence of layers for a block of k directions V in one forward, one
// R-forward, one backward and one R-backward sweep (Pearlmutter 1994). The k directions ride along
// as a second dimension of every R-tensor ([B, k, *rest]), so each layer does a few large
// matmuls / grouped convolutions for all of them. Work that is zero is skipped: the R of the
// layers below the first one with a direction, and the input gradients of that first layer.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "hvp.h"

namespace torch_dlt {
namespace {

constexpr int64_t kChunk = 256;  // primal elements whose derivatives are computed at once

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "torch_dlt::", op,
              ": ", name, " must be float32 or float64, got ", t.scalar_type());
}

// out[b, j, r] = sigma'(x[b, r]) v[b, j, r]: the R-forward of an activation, and its backward.
at::Tensor activation_jvp_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
                              int64_t kind, double a, double b) {
  check_activation_kind(kind, "activation_jvp");
  check_floating(x, "activation_jvp", "x");
  TORCH_CHECK(y.sizes().equals(x.sizes()), "torch_dlt::activation_jvp: y must have x's shape");
  const auto [batch, k, rest] = direction_block_shape(x, v, "activation_jvp", "v");
  const at::Tensor xc = x.contiguous(), yc = y.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_dlt::activation_jvp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t chunks = (rest + kChunk - 1) / kChunk;
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      acc_t d1[kChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / chunks;
        const int64_t r0 = (task % chunks) * kChunk;
        const int64_t n = std::min(kChunk, rest - r0);
        const int64_t p0 = bi * rest + r0;
        for (int64_t i = 0; i < n; ++i) {
          d1[i] = activation_derivatives<acc_t>(kind, xp[p0 + i], yp[p0 + i], acc_t(a), acc_t(b)).d1;
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t q0 = (bi * k + j) * rest + r0;
          for (int64_t i = 0; i < n; ++i) op[q0 + i] = static_cast<scalar_t>(d1[i] * vp[q0 + i]);
        }
      }
    });
  });
  return out;
}

// The backward and R-backward of an activation in one pass:
//   gx = sigma'(x) g,   rgx[b, j] = sigma'(x) rg[b, j] + sigma''(x) g rx[b, j].
std::tuple<at::Tensor, at::Tensor> activation_hvp_backward_cpu(const at::Tensor& x,
                                                               const at::Tensor& y,
                                                               const at::Tensor& g,
                                                               const at::Tensor& rx,
                                                               const at::Tensor& rg, int64_t kind,
                                                               double a, double b) {
  check_activation_kind(kind, "activation_hvp_backward");
  check_floating(x, "activation_hvp_backward", "x");
  TORCH_CHECK(y.sizes().equals(x.sizes()) && g.sizes().equals(x.sizes()),
              "torch_dlt::activation_hvp_backward: y and g must have x's shape ", x.sizes());
  const auto [batch, k, rest] = direction_block_shape(x, rg, "activation_hvp_backward", "rg");
  TORCH_CHECK(rx.sizes().equals(rg.sizes()),
              "torch_dlt::activation_hvp_backward: rx must have rg's shape ", rg.sizes());
  const at::Tensor xc = x.contiguous(), yc = y.contiguous(), gc = g.contiguous();
  const at::Tensor rxc = rx.contiguous(), rgc = rg.contiguous();
  at::Tensor gx = at::empty_like(xc);
  at::Tensor rgx = at::empty_like(rgc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_dlt::activation_hvp_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* rxp = rxc.const_data_ptr<scalar_t>();
    const scalar_t* rgp = rgc.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* rgxp = rgx.mutable_data_ptr<scalar_t>();
    const int64_t chunks = (rest + kChunk - 1) / kChunk;
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      acc_t d1[kChunk], d2g[kChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / chunks;
        const int64_t r0 = (task % chunks) * kChunk;
        const int64_t n = std::min(kChunk, rest - r0);
        const int64_t p0 = bi * rest + r0;
        for (int64_t i = 0; i < n; ++i) {
          const auto d =
              activation_derivatives<acc_t>(kind, xp[p0 + i], yp[p0 + i], acc_t(a), acc_t(b));
          const acc_t gi = gp[p0 + i];
          d1[i] = d.d1;
          d2g[i] = d.d2 * gi;
          gxp[p0 + i] = static_cast<scalar_t>(d.d1 * gi);
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t q0 = (bi * k + j) * rest + r0;
          for (int64_t i = 0; i < n; ++i) {
            rgxp[q0 + i] = static_cast<scalar_t>(d1[i] * rgp[q0 + i] + d2g[i] * rxp[q0 + i]);
          }
        }
      }
    });
  });
  return {gx, rgx};
}

// Per-sample soft-max cross-entropy target mass: 1 for class indices, sum_c t_c for probabilities.
template <typename scalar_t, typename acc_t>
inline acc_t target_row(const at::Tensor& targets, bool indices, int64_t row, int64_t classes,
                        acc_t* t) {
  if (indices) {
    const int64_t label = targets.const_data_ptr<int64_t>()[row];
    for (int64_t c = 0; c < classes; ++c) t[c] = c == label ? acc_t(1) : acc_t(0);
    return acc_t(1);
  }
  const scalar_t* tp = targets.const_data_ptr<scalar_t>() + row * classes;
  acc_t mass = 0;
  for (int64_t c = 0; c < classes; ++c) {
    t[c] = tp[c];
    mass += t[c];
  }
  return mass;
}

// Gradient of the loss with respect to the logits z, and the loss Hessian applied to rz:
//   cross-entropy: grad = s (m p - t), hz = s m (p * rz - p <p, rz>), p = softmax(z), m = sum t;
//   MSE:           grad = 2 s (z - t), hz = 2 s rz;
// s = 1 / (batch for cross-entropy, numel for MSE) with mean reduction, 1 with sum.
std::tuple<at::Tensor, at::Tensor> loss_curvature_cpu(const at::Tensor& z,
                                                      const at::Tensor& targets,
                                                      const at::Tensor& rz, int64_t loss,
                                                      int64_t reduction) {
  check_floating(z, "loss_curvature", "z");
  TORCH_CHECK(loss == kCrossEntropy || loss == kMSE,
              "torch_dlt::loss_curvature: loss must be 0 (cross-entropy) or 1 (MSE), got ", loss);
  TORCH_CHECK(reduction == kMean || reduction == kSum,
              "torch_dlt::loss_curvature: reduction must be 0 (mean) or 1 (sum), got ", reduction);
  const auto [batch, k, rest] = direction_block_shape(z, rz, "loss_curvature", "rz");
  const at::Tensor zc = z.contiguous(), rzc = rz.contiguous();
  at::Tensor grad = at::empty_like(zc);
  at::Tensor hz = at::empty_like(rzc);
  if (loss == kMSE) {
    TORCH_CHECK(targets.sizes().equals(z.sizes()) && targets.scalar_type() == z.scalar_type(),
                "torch_dlt::loss_curvature: MSE targets must have z's shape ", z.sizes(),
                " and dtype");
    const double s = 2.0 / (reduction == kMean ? static_cast<double>(z.numel()) : 1.0);
    at::mul_out(grad, at::sub(zc, targets), s);
    at::mul_out(hz, rzc, s);
    return {grad, hz};
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
  const int64_t classes = rest;
  if (indices && batch > 0) {
    const auto [lo, hi] = at::aminmax(tc);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < classes,
                "torch_dlt::loss_curvature: class indices must be in [0, ", classes, "), got ",
                lo.item<int64_t>(), " to ", hi.item<int64_t>());
  }
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "torch_dlt::loss_curvature", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = reduction == kMean ? acc_t(1) / static_cast<acc_t>(batch) : acc_t(1);
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* rzp = rzc.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    scalar_t* hp = hz.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> p(classes), t(classes);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* zr = zp + row * classes;
        acc_t zmax = zr[0];
        for (int64_t c = 1; c < classes; ++c) zmax = std::max<acc_t>(zmax, zr[c]);
        acc_t total = 0;
        for (int64_t c = 0; c < classes; ++c) {
          p[c] = std::exp(static_cast<acc_t>(zr[c]) - zmax);
          total += p[c];
        }
        for (int64_t c = 0; c < classes; ++c) p[c] /= total;
        const acc_t mass = target_row<scalar_t, acc_t>(tc, indices, row, classes, t.data());
        for (int64_t c = 0; c < classes; ++c) {
          gp[row * classes + c] = static_cast<scalar_t>(s * (mass * p[c] - t[c]));
        }
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* rr = rzp + (row * k + j) * classes;
          scalar_t* hr = hp + (row * k + j) * classes;
          acc_t dot = 0;
          for (int64_t c = 0; c < classes; ++c) dot += p[c] * rr[c];
          for (int64_t c = 0; c < classes; ++c) {
            hr[c] = static_cast<scalar_t>(s * mass * p[c] * (rr[c] - dot));
          }
        }
      }
    });
  });
  return {grad, hz};
}

// ----------------------------------------------------------------------------------------------
// The whole-program sweep. The program is a flat int list of records (opcode, attributes...);
// the opcodes and record lengths are those of torch_dlt/ops/_hvp_reference.py: Opcode.
enum Opcode : int64_t {
  kLinear = 1,
  kConv2d = 2,
  kActivation = 3,
  kMaxPool2d = 4,
  kAvgPool2d = 5,
  kAdaptiveAvgPool2d = 6,
  kAdaptiveMaxPool2d = 7,
  kFlatten = 8,
  kBatchNorm = 9,
};

struct Layer {
  int64_t op = 0;
  std::vector<int64_t> attr;
  std::vector<int64_t> param;  // indices into params / directions
  double c0 = 0, c1 = 0;       // float constants (activation a, b; batch-norm eps)
};

int64_t record_length(int64_t op) {
  switch (op) {
    case kLinear: return 1;
    case kConv2d: return 8;
    case kActivation: return 1;
    case kMaxPool2d: return 9;
    case kAvgPool2d: return 9;
    case kAdaptiveAvgPool2d: return 2;
    case kAdaptiveMaxPool2d: return 2;
    case kFlatten: return 2;
    case kBatchNorm: return 2;
    default: TORCH_CHECK(false, "torch_dlt::sequential_hvp: unknown opcode ", op, " in program");
  }
}

std::vector<Layer> parse_program(at::IntArrayRef program, at::ArrayRef<double> constants,
                                 int64_t num_params) {
  std::vector<Layer> layers;
  size_t pos = 0, cpos = 0;
  int64_t next_param = 0;
  auto take_param = [&](Layer& layer) {
    TORCH_CHECK(next_param < num_params,
                "torch_dlt::sequential_hvp: the program uses more tensors than params holds (",
                num_params, ")");
    layer.param.push_back(next_param++);
  };
  auto take_constant = [&]() {
    TORCH_CHECK(cpos < constants.size(),
                "torch_dlt::sequential_hvp: the program uses more constants than given");
    return constants[cpos++];
  };
  while (pos < program.size()) {
    Layer layer;
    layer.op = program[pos++];
    const int64_t len = record_length(layer.op);
    TORCH_CHECK(pos + len <= program.size(), "torch_dlt::sequential_hvp: truncated record");
    layer.attr.assign(program.begin() + pos, program.begin() + pos + len);
    pos += len;
    switch (layer.op) {
      case kLinear:
      case kConv2d:
        take_param(layer);
        if (layer.attr[0]) take_param(layer);
        break;
      case kActivation:
        check_activation_kind(layer.attr[0], "sequential_hvp");
        layer.c0 = take_constant();
        layer.c1 = take_constant();
        break;
      case kBatchNorm:
        take_param(layer);  // running mean
        take_param(layer);  // running var
        if (layer.attr[0]) take_param(layer);
        if (layer.attr[1]) take_param(layer);
        layer.c0 = take_constant();
        break;
      default:
        break;
    }
    layers.push_back(std::move(layer));
  }
  TORCH_CHECK(next_param == num_params, "torch_dlt::sequential_hvp: the program uses ", next_param,
              " tensors but params holds ", num_params);
  TORCH_CHECK(cpos == constants.size(), "torch_dlt::sequential_hvp: ", constants.size() - cpos,
              " constants are left unused by the program");
  return layers;
}

// What the backward sweep needs of a layer's forward.
struct Saved {
  at::Tensor x;   // primal input
  at::Tensor rx;  // R of the input [B, k, *x.shape[1:]], undefined where it is zero
  at::Tensor y;   // primal output (activations)
  at::Tensor indices;  // max-pooling argmax
  at::Tensor xhat;     // batch-norm normalised input
  at::Tensor scale;    // batch-norm per-channel gamma / sqrt(var + eps)
  at::Tensor inv_std;  // batch-norm per-channel 1 / sqrt(var + eps)
};

// A [B, C, ...] primal repeated k times along channels, as [B, k * C, ...] (no copy for k = 1).
at::Tensor tile_channels(const at::Tensor& x, int64_t k) {
  if (k == 1) return x;
  std::vector<int64_t> reps(x.dim(), 1);
  reps[1] = k;
  return x.repeat(reps);
}

// [B, k, *rest] -> [B, k * rest[0], *rest[1:]]
at::Tensor fold(const at::Tensor& r) {
  auto sizes = r.sizes().vec();
  sizes[1] *= sizes[2];
  sizes.erase(sizes.begin() + 2);
  return r.reshape(sizes);
}

// [B, k * C, *rest] -> [B, k, C, *rest]
at::Tensor unfold(const at::Tensor& r, int64_t k) {
  auto sizes = r.sizes().vec();
  sizes[1] /= k;
  sizes.insert(sizes.begin() + 1, k);
  return r.view(sizes);
}

// The per-sample-block shape of R-tensors of a primal shaped like x.
std::vector<int64_t> block_shape(const at::Tensor& x, int64_t k) {
  auto sizes = x.sizes().vec();
  sizes.insert(sizes.begin() + 1, k);
  return sizes;
}

struct ConvAttr {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};

at::Tensor conv(const at::Tensor& input, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, const ConvAttr& c, int64_t groups) {
  return at::convolution(input, weight, bias, c.stride, c.padding, c.dilation, false, {0, 0},
                         groups);
}

at::Tensor conv_input_grad(const at::Tensor& grad_out, const at::Tensor& input_like,
                           const at::Tensor& weight, const ConvAttr& c, int64_t groups) {
  return std::get<0>(at::convolution_backward(grad_out, input_like, weight, std::nullopt,
                                              c.stride, c.padding, c.dilation, false, {0, 0},
                                              groups, {true, false, false}));
}

at::Tensor conv_weight_grad(const at::Tensor& grad_out, const at::Tensor& input,
                            const at::Tensor& weight_like, const ConvAttr& c, int64_t groups) {
  return std::get<1>(at::convolution_backward(grad_out, input, weight_like, std::nullopt,
                                              c.stride, c.padding, c.dilation, false, {0, 0},
                                              groups, {false, true, false}));
}

// Conv weights [out, in / G, kh, kw] repeated k times along the output channels, for the
// k * G-group convolutions that treat the k directions as independent groups.
at::Tensor tile_out_channels(const at::Tensor& w, int64_t k) {
  return k == 1 ? w : w.repeat({k, 1, 1, 1});
}

// The [a, b] channel pairs of the paired grouped convolutions below.
at::Tensor pair(const at::Tensor& a, const at::Tensor& b, int64_t dim) { return at::cat({a, b}, dim); }

using JvpOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                         double);
using HvpBackwardOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, int64_t, double,
                                                         double);
using LossOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, int64_t, int64_t);

at::Tensor call_activation_jvp(const at::Tensor& x, const at::Tensor& y, const at::Tensor& v,
                               const Layer& l) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_dlt::activation_jvp", "")
                       .typed<JvpOp>();
  return op.call(x, y, v, l.attr[0], l.c0, l.c1);
}

std::tuple<at::Tensor, at::Tensor> call_activation_hvp_backward(const at::Tensor& x,
                                                                const at::Tensor& y,
                                                                const at::Tensor& g,
                                                                const at::Tensor& rx,
                                                                const at::Tensor& rg,
                                                                const Layer& l) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_dlt::activation_hvp_backward", "")
                       .typed<HvpBackwardOp>();
  return op.call(x, y, g, rx, rg, l.attr[0], l.c0, l.c1);
}

std::tuple<at::Tensor, at::Tensor> call_loss_curvature(const at::Tensor& z,
                                                       const at::Tensor& targets,
                                                       const at::Tensor& rz, int64_t loss,
                                                       int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_dlt::loss_curvature", "")
                       .typed<LossOp>();
  return op.call(z, targets, rz, loss, reduction);
}

at::Tensor activation_forward(const at::Tensor& x, const Layer& l) {
  const double a = l.c0, b = l.c1;
  switch (l.attr[0]) {
    case kReLU: return at::relu(x);
    case kLeakyReLU: return at::leaky_relu(x, a);
    case kTanh: return at::tanh(x);
    case kSigmoid: return at::sigmoid(x);
    case kGELU: return at::gelu(x, "none");
    case kGELUTanh: return at::gelu(x, "tanh");
    case kELU: return at::elu(x, a, b, 1.0);
    case kSoftplus: return at::softplus(x, a, b);
    case kSiLU: return at::silu(x);
    case kHardtanh: return at::hardtanh(x, a, b);
    case kErf: return at::erf(x);
    case kCELU: return at::celu(x, a);
    default: TORCH_CHECK(false, "torch_dlt::sequential_hvp: unknown activation ", l.attr[0]);
  }
}

std::vector<int64_t> channel_view(int64_t channels, int64_t dims, int64_t channel_dim) {
  std::vector<int64_t> shape(dims, 1);
  shape[channel_dim] = channels;
  return shape;
}

ConvAttr conv_attr(const Layer& layer) {
  return ConvAttr{{layer.attr[1], layer.attr[2]},
                  {layer.attr[3], layer.attr[4]},
                  {layer.attr[5], layer.attr[6]},
                  layer.attr[7]};
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward(const Layer& layer, const at::Tensor& x) {
  if (layer.op == kAdaptiveMaxPool2d) {
    return at::adaptive_max_pool2d(x, {layer.attr[0], layer.attr[1]});
  }
  return at::max_pool2d_with_indices(x, {layer.attr[0], layer.attr[1]},
                                     {layer.attr[2], layer.attr[3]}, {layer.attr[4], layer.attr[5]},
                                     {layer.attr[6], layer.attr[7]}, layer.attr[8] != 0);
}

at::Tensor max_pool_backward(const Layer& layer, const at::Tensor& grad, const at::Tensor& like,
                             const at::Tensor& indices) {
  if (layer.op == kAdaptiveMaxPool2d) return at::adaptive_max_pool2d_backward(grad, like, indices);
  return at::max_pool2d_with_indices_backward(
      grad, like, {layer.attr[0], layer.attr[1]}, {layer.attr[2], layer.attr[3]},
      {layer.attr[4], layer.attr[5]}, {layer.attr[6], layer.attr[7]}, layer.attr[8] != 0, indices);
}

std::optional<int64_t> avg_divisor(const Layer& layer) {
  return layer.attr[8] != 0 ? std::optional<int64_t>(layer.attr[8]) : std::nullopt;
}

at::Tensor avg_pool_forward(const Layer& layer, const at::Tensor& x) {
  return at::avg_pool2d(x, {layer.attr[0], layer.attr[1]}, {layer.attr[2], layer.attr[3]},
                        {layer.attr[4], layer.attr[5]}, layer.attr[6] != 0, layer.attr[7] != 0,
                        avg_divisor(layer));
}

at::Tensor avg_pool_backward(const Layer& layer, const at::Tensor& grad, const at::Tensor& like) {
  return at::avg_pool2d_backward(grad, like, {layer.attr[0], layer.attr[1]},
                                 {layer.attr[2], layer.attr[3]}, {layer.attr[4], layer.attr[5]},
                                 layer.attr[6] != 0, layer.attr[7] != 0, avg_divisor(layer));
}

// The batch-norm layer's parameter indices: mean, var, then weight and bias where present.
struct BatchNormParams {
  int64_t weight, bias;  // -1 where absent
};

BatchNormParams batch_norm_params(const Layer& layer) {
  const bool has_w = layer.attr[0] != 0, has_b = layer.attr[1] != 0;
  return {has_w ? layer.param[2] : -1, has_b ? layer.param[has_w ? 3 : 2] : -1};
}

// The primal forward of one layer. Where `keep` is set it also stores in `s` what the sweeps
// need besides the input and output: max-pooling's argmax, batch norm's normalised input and
// scales.
at::Tensor layer_forward(const Layer& layer, const at::Tensor& a, at::TensorList params, Saved& s,
                         bool keep) {
  switch (layer.op) {
    case kLinear: {
      TORCH_CHECK(a.dim() == 2, "torch_dlt::sequential_hvp: Linear takes [B, in] inputs, got ",
                  a.sizes());
      const at::Tensor& w = params[layer.param[0]];
      return layer.attr[0] != 0 ? at::addmm(params[layer.param[1]], a, w.t()) : at::mm(a, w.t());
    }
    case kConv2d: {
      const ConvAttr c = conv_attr(layer);
      const std::optional<at::Tensor> bias =
          layer.attr[0] != 0 ? std::optional<at::Tensor>(params[layer.param[1]]) : std::nullopt;
      return conv(a, params[layer.param[0]], bias, c, c.groups);
    }
    case kActivation:
      return activation_forward(a, layer);
    case kMaxPool2d:
    case kAdaptiveMaxPool2d: {
      auto [out, indices] = max_pool_forward(layer, a);
      if (keep) s.indices = indices;
      return out;
    }
    case kAvgPool2d:
      return avg_pool_forward(layer, a);
    case kAdaptiveAvgPool2d:
      return at::adaptive_avg_pool2d(a, {layer.attr[0], layer.attr[1]});
    case kFlatten: {
      const int64_t start = layer.attr[0];
      TORCH_CHECK(start >= 1 || (start < 0 && start + a.dim() >= 1),
                  "torch_dlt::sequential_hvp: Flatten must keep the batch dimension");
      return a.flatten(start, layer.attr[1]);
    }
    case kBatchNorm: {
      TORCH_CHECK(a.dim() >= 2, "torch_dlt::sequential_hvp: BatchNorm takes [B, C, ...]");
      const auto cview = channel_view(a.size(1), a.dim(), 1);
      const BatchNormParams bn = batch_norm_params(layer);
      const at::Tensor inv_std = at::rsqrt(params[layer.param[1]] + layer.c0);
      const at::Tensor scale = bn.weight >= 0 ? inv_std * params[bn.weight] : inv_std;
      const at::Tensor xhat = (a - params[layer.param[0]].view(cview)) * inv_std.view(cview);
      at::Tensor out = bn.weight >= 0 ? xhat * params[bn.weight].view(cview) : xhat;
      if (bn.bias >= 0) out = out + params[bn.bias].view(cview);
      if (keep) {
        s.xhat = xhat;
        s.scale = scale;
        s.inv_std = inv_std;
      }
      return out;
    }
    default:
      TORCH_CHECK(false, "torch_dlt::sequential_hvp: unknown opcode ", layer.op);
  }
}

// The loss gradient with respect to a layer's input, from `g`, the one with respect to its output.
at::Tensor layer_input_grad(const Layer& layer, const Saved& s, const at::Tensor& g,
                            at::TensorList params) {
  const at::Tensor& x = s.x;
  switch (layer.op) {
    case kLinear:
      return at::mm(g, params[layer.param[0]]);
    case kConv2d: {
      const ConvAttr c = conv_attr(layer);
      return conv_input_grad(g, x, params[layer.param[0]], c, c.groups);
    }
    case kActivation:
      return call_activation_jvp(x, s.y, g.unsqueeze(1), layer).squeeze(1);
    case kMaxPool2d:
    case kAdaptiveMaxPool2d:
      return max_pool_backward(layer, g, x, s.indices);
    case kAvgPool2d:
      return avg_pool_backward(layer, g, x);
    case kAdaptiveAvgPool2d:
      return at::_adaptive_avg_pool2d_backward(g, x);
    case kFlatten:
      return g.reshape(x.sizes());
    case kBatchNorm:
      return g * s.scale.view(channel_view(x.size(1), x.dim(), 1));
    default:
      TORCH_CHECK(false, "torch_dlt::sequential_hvp: unknown opcode ", layer.op);
  }
}

// A layer's output is a view of its input (Flatten), or a fresh tensor worth keeping.
bool is_view(const Layer& layer) { return layer.op == kFlatten; }

// Which entries of sequential_primal's list hold a tensor (the others are empty): layer l's
// output unless it is a view, and the gradient at it unless layer l + 1 is a view (the gradient
// at a view's input is a view of the one at its output).
bool output_kept(const std::vector<Layer>& layers, int64_t l) { return !is_view(layers[l]); }
bool gradient_kept(const std::vector<Layer>& layers, int64_t l) {
  return l + 1 >= static_cast<int64_t>(layers.size()) || !is_view(layers[l + 1]);
}

}  // namespace

std::vector<at::Tensor> sequential_primal(const at::Tensor& inputs, const at::Tensor& targets,
                                          at::TensorList params, at::IntArrayRef program,
                                          at::ArrayRef<double> constants, int64_t loss,
                                          int64_t reduction, bool gradients) {
  check_floating(inputs, "sequential_primal", "inputs");
  TORCH_CHECK(inputs.dim() >= 2, "torch_dlt::sequential_primal: inputs must be [B, ...], got ",
              inputs.sizes());
  const std::vector<Layer> layers =
      parse_program(program, constants, static_cast<int64_t>(params.size()));
  const int64_t num_layers = static_cast<int64_t>(layers.size());
  TORCH_CHECK(num_layers > 0, "torch_dlt::sequential_primal: the program has no layer");
  std::vector<Saved> saved(num_layers);
  std::vector<at::Tensor> result;
  result.reserve(gradients ? 2 * num_layers : num_layers);
  auto none = [&] { return at::empty({0}, inputs.options()); };  // one each: outputs never alias
  at::Tensor a = inputs.contiguous();
  for (int64_t l = 0; l < num_layers; ++l) {
    saved[l].x = a;
    a = layer_forward(layers[l], a, params, saved[l], gradients);
    saved[l].y = a;
    result.push_back(output_kept(layers, l) ? a : none());
  }
  if (!gradients) return result;
  // The loss gradient; loss_curvature's Hessian term is asked of a zero direction.
  std::vector<int64_t> rshape = block_shape(a, 1);
  at::Tensor g = std::get<0>(call_loss_curvature(a, targets, at::zeros(rshape, a.options()), loss,
                                                 reduction));
  std::vector<at::Tensor> grads(num_layers);
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    grads[l] = g;
    if (l > 0) g = layer_input_grad(layers[l], saved[l], g, params);
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    result.push_back(gradient_kept(layers, l) ? grads[l] : none());
  }
  return result;
}

std::vector<at::Tensor> sequential_hvp(const at::Tensor& inputs, const at::Tensor& targets,
                                       at::TensorList params,
                                       const c10::List<std::optional<at::Tensor>>& directions,
                                       at::IntArrayRef program, at::ArrayRef<double> constants,
                                       int64_t loss, int64_t reduction, bool ggn,
                                       at::TensorList primal) {
  const int64_t num_params = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(directions.size()) == num_params,
              "torch_dlt::sequential_hvp: directions must have one entry per params entry (",
              num_params, "), got ", directions.size());
  check_floating(inputs, "sequential_hvp", "inputs");
  TORCH_CHECK(inputs.dim() >= 2, "torch_dlt::sequential_hvp: inputs must be [B, ...], got ",
              inputs.sizes());
  const std::vector<Layer> layers = parse_program(program, constants, num_params);
  std::vector<at::Tensor> dir(num_params);
  int64_t k = -1;
  for (int64_t i = 0; i < num_params; ++i) {
    const std::optional<at::Tensor> d = directions.get(i);
    if (!d.has_value() || !d->defined()) continue;
    const at::Tensor& p = params[i];
    TORCH_CHECK(d->dim() == p.dim() + 1 && d->sizes().slice(1).equals(p.sizes()),
                "torch_dlt::sequential_hvp: directions[", i, "] must be [k, *params[", i,
                "].shape] = [k, ", p.sizes(), "], got ", d->sizes());
    TORCH_CHECK(k < 0 || d->size(0) == k,
                "torch_dlt::sequential_hvp: every direction must hold the same number k of "
                "vectors");
    TORCH_CHECK(d->scalar_type() == inputs.scalar_type() && d->device() == inputs.device(),
                "torch_dlt::sequential_hvp: directions[", i, "] must have the inputs' dtype and "
                "device");
    k = d->size(0);
    dir[i] = d->contiguous();
  }
  TORCH_CHECK(k > 0, "torch_dlt::sequential_hvp: no parameter has a direction (k >= 1)");
  auto has_dir = [&](int64_t i) { return dir[i].defined(); };

  const int64_t num_layers = static_cast<int64_t>(layers.size());
  int64_t first = num_layers;  // the first layer with a direction
  for (int64_t l = 0; l < num_layers && first == num_layers; ++l) {
    for (int64_t i : layers[l].param) {
      if (has_dir(i)) first = l;
    }
  }
  TORCH_CHECK(first < num_layers, "torch_dlt::sequential_hvp: no layer has a direction");

  // A primal pass of sequential_primal: layer outputs, then (for H) the loss gradients at them.
  const bool cached = !primal.empty();
  const int64_t primal_size = static_cast<int64_t>(primal.size());
  TORCH_CHECK(!cached || primal_size == 2 * num_layers || (ggn && primal_size == num_layers),
              "torch_dlt::sequential_hvp: primal must be sequential_primal's ", 2 * num_layers,
              " tensors (", num_layers, " without gradients, for ggn), got ", primal_size);
  for (int64_t i = 0; cached && i < std::min(primal_size, ggn ? num_layers : 2 * num_layers); ++i) {
    const bool kept =
        i < num_layers ? output_kept(layers, i) : gradient_kept(layers, i - num_layers);
    TORCH_CHECK(!kept || (primal[i].dim() >= 1 && primal[i].size(0) == inputs.size(0) &&
                          primal[i].scalar_type() == inputs.scalar_type() &&
                          primal[i].device() == inputs.device()),
                "torch_dlt::sequential_hvp: primal[", i, "] is not sequential_primal's tensor for "
                "these inputs (", primal[i].sizes(), ")");
  }

  // Forward and R-forward; with a primal pass, only R-forward from the first layer with a
  // direction, where the layers' outputs are read back (max pooling's argmax and batch norm's
  // statistics are recomputed: they cost a fraction of their layer).
  std::vector<Saved> saved(num_layers);
  at::Tensor a = inputs.contiguous();
  if (cached) {
    // The first layer's input: the last kept output below it, through the views after that.
    int64_t l = first - 1;
    while (l >= 0 && !output_kept(layers, l)) --l;
    if (l >= 0) a = primal[l];
    for (Saved unused; ++l < first;) a = layer_forward(layers[l], a, params, unused, false);
  }
  at::Tensor ra;  // undefined: zero
  for (int64_t l = cached ? first : 0; l < num_layers; ++l) {
    const Layer& layer = layers[l];
    Saved& s = saved[l];
    const bool track = l >= first;
    s.x = a;
    s.rx = ra;
    const bool reuse = cached && layer.op != kMaxPool2d && layer.op != kAdaptiveMaxPool2d &&
                       layer.op != kBatchNorm && output_kept(layers, l);
    const at::Tensor out = reuse ? primal[l] : layer_forward(layer, a, params, s, track);
    s.y = out;
    at::Tensor rout;
    const int64_t batch = a.size(0);
    if (!track) {
      a = out;
      continue;
    }
    switch (layer.op) {
      case kLinear: {
        const at::Tensor& w = params[layer.param[0]];
        const bool has_bias = layer.attr[0] != 0;
        const int64_t out_f = w.size(0), in_f = w.size(1);
        const at::Tensor& rw = dir[layer.param[0]];
        if (rw.defined()) rout = at::mm(a, rw.view({k * out_f, in_f}).t());
        if (ra.defined()) {
          if (rout.defined()) {
            rout.view({batch * k, out_f}).addmm_(ra.view({batch * k, in_f}), w.t());
          } else {
            rout = at::mm(ra.view({batch * k, in_f}), w.t());
          }
        }
        if (has_bias && has_dir(layer.param[1])) {
          const at::Tensor rb = dir[layer.param[1]].unsqueeze(0);
          if (rout.defined()) {
            rout.view({batch, k, out_f}).add_(rb);
          } else {
            rout = rb.expand({batch, k, out_f}).contiguous();
          }
        }
        rout = rout.view({batch, k, out_f});
        break;
      }
      case kConv2d: {
        const at::Tensor& w = params[layer.param[0]];
        const bool has_bias = layer.attr[0] != 0;
        const ConvAttr c = conv_attr(layer);
        const int64_t groups = c.groups;
        const at::Tensor& rw = dir[layer.param[0]];
        const std::optional<at::Tensor> rb =
            has_bias && has_dir(layer.param[1])
                ? std::optional<at::Tensor>(dir[layer.param[1]].reshape({-1}))
                : std::nullopt;
        const int64_t out_c = w.size(0), in_g = w.size(1), kh = w.size(2), kw = w.size(3);
        const int64_t in_c = a.size(1), h = a.size(2), wd = a.size(3);
        if (groups == 1) {
          // R(y)_j = conv(x, R(W)_j) + conv(R(x)_j, W). The k directions become extra output
          // channels where the input is shared and extra batch rows where the weight is, so
          // both land in the [B, k, out] layout without copies or grouped convolutions.
          if (rw.defined()) rout = conv(a, rw.view({k * out_c, in_c, kh, kw}), rb, c, 1);
          if (ra.defined()) {
            at::Tensor t = conv(ra.view({batch * k, in_c, h, wd}), w, std::nullopt, c, 1);
            if (rout.defined()) {
              rout.view_as(t).add_(t);
            } else {
              rout = t;
              if (rb) rout.view(block_shape(out, k)).add_(rb->view({1, k, out_c, 1, 1}));
            }
          }
          if (!rout.defined()) rout = rb->view({1, k, out_c, 1, 1}).expand(block_shape(out, k));
          rout = rout.reshape(block_shape(out, k));
          break;
        }
        if (rw.defined() && ra.defined()) {
          // R(y)_j = conv(R(x)_j, W) + conv(x, R(W)_j): one convolution with k * G groups whose
          // inputs are [R(x)_j, x] and weights [W, R(W)_j] per (direction, group).
          const at::Tensor xin = pair(
              ra.view({batch, k, groups, in_g, h, wd}),
              a.view({batch, 1, groups, in_g, h, wd}).expand({batch, k, groups, in_g, h, wd}), 3);
          const at::Tensor win = pair(
              w.view({1, groups, out_c / groups, in_g, kh, kw})
                  .expand({k, groups, out_c / groups, in_g, kh, kw}),
              rw.view({k, groups, out_c / groups, in_g, kh, kw}), 3);
          rout = conv(xin.view({batch, k * 2 * in_c, h, wd}),
                      win.view({k * out_c, 2 * in_g, kh, kw}), rb, c, k * groups);
        } else if (rw.defined()) {
          rout = conv(tile_channels(a, k), rw.view({k * out_c, in_g, kh, kw}), rb, c, k * groups);
        } else if (ra.defined()) {
          rout = conv(fold(ra), tile_out_channels(w, k), rb, c, k * groups);
        } else {
          auto sizes = block_shape(out, k);
          rout = rb->view({1, k, out_c, 1, 1}).expand(sizes).contiguous();
        }
        rout = unfold(rout, k);
        break;
      }
      case kActivation:
        rout = call_activation_jvp(a, out, ra, layer);
        break;
      case kMaxPool2d:
      case kAdaptiveMaxPool2d: {
        const int64_t ch = a.size(1), plane = a.size(2) * a.size(3);
        const int64_t out_plane = out.size(2) * out.size(3);
        const at::Tensor idx =
            s.indices.view({batch, 1, ch, out_plane}).expand({batch, k, ch, out_plane});
        rout = ra.view({batch, k, ch, plane}).gather(3, idx).view(block_shape(out, k));
        break;
      }
      case kAvgPool2d:
        rout = unfold(avg_pool_forward(layer, fold(ra)), k);
        break;
      case kAdaptiveAvgPool2d:
        rout = unfold(at::adaptive_avg_pool2d(fold(ra), {layer.attr[0], layer.attr[1]}), k);
        break;
      case kFlatten: {
        const int64_t s0 = layer.attr[0] < 0 ? layer.attr[0] + a.dim() : layer.attr[0];
        const int64_t e0 = layer.attr[1] < 0 ? layer.attr[1] + a.dim() : layer.attr[1];
        rout = ra.flatten(s0 + 1, e0 + 1);
        break;
      }
      case kBatchNorm: {
        const int64_t ch = a.size(1);
        const BatchNormParams bn = batch_norm_params(layer);
        const auto rview = channel_view(ch, a.dim() + 1, 2);
        auto rsizes = block_shape(a, k);
        if (ra.defined()) rout = ra * s.scale.view(rview);
        auto kview = rview;
        kview[1] = k;
        if (bn.weight >= 0 && has_dir(bn.weight)) {
          const at::Tensor term = s.xhat.unsqueeze(1) * dir[bn.weight].view(kview);
          rout = rout.defined() ? rout.add_(term) : term;
        }
        if (bn.bias >= 0 && has_dir(bn.bias)) {
          const at::Tensor term = dir[bn.bias].view(kview);
          rout = rout.defined() ? rout.add_(term) : term.expand(rsizes).contiguous();
        }
        break;
      }
      default:
        TORCH_CHECK(false, "torch_dlt::sequential_hvp: unknown opcode ", layer.op);
    }
    a = out;
    ra = rout.defined() ? rout.contiguous() : rout;
  }

  TORCH_CHECK(ra.defined(), "torch_dlt::sequential_hvp: the output does not depend on the "
              "directions");
  auto [grad_z, hz] = call_loss_curvature(a, targets, ra, loss, reduction);

  // Backward (g, Hessian only) and R-backward (rg) from the loss down to the first layer with a
  // direction; with a primal pass, g is read back instead of computed.
  std::vector<at::Tensor> result(num_params);
  at::Tensor g = ggn ? at::Tensor() : cached ? primal[2 * num_layers - 1] : grad_z;
  at::Tensor rg = hz;
  for (int64_t l = num_layers - 1; l >= first; --l) {
    const Layer& layer = layers[l];
    const Saved& s = saved[l];
    const bool need_input = l > first;
    const at::Tensor& x = s.x;
    const at::Tensor& rx = s.rx;
    const int64_t batch = x.size(0);
    const bool second = !ggn && rx.defined();  // the product-rule terms g * R(.) of the Hessian
    at::Tensor gx, rgx;
    switch (layer.op) {
      case kLinear: {
        const at::Tensor& w = params[layer.param[0]];
        const int64_t out_f = w.size(0), in_f = w.size(1);
        const at::Tensor& rw = dir[layer.param[0]];
        const at::Tensor rg2 = rg.view({batch * k, out_f});
        if (rw.defined()) {
          at::Tensor rgw = at::mm(rg.view({batch, k * out_f}).t(), x).view({k, out_f, in_f});
          if (second) {
            rgw.add_(at::mm(g.t(), rx.view({batch, k * in_f})).view({out_f, k, in_f}).permute({1, 0, 2}));
          }
          result[layer.param[0]] = rgw;
        }
        if (layer.attr[0] != 0 && has_dir(layer.param[1])) result[layer.param[1]] = rg.sum(0);
        if (!need_input) break;
        rgx = at::mm(rg2, w);
        if (!ggn && rw.defined()) {
          rgx.view({batch, k * in_f}).addmm_(g, rw.permute({1, 0, 2}).reshape({out_f, k * in_f}));
        }
        rgx = rgx.view({batch, k, in_f});
        break;
      }
      case kConv2d: {
        const at::Tensor& w = params[layer.param[0]];
        const ConvAttr c = conv_attr(layer);
        const int64_t groups = c.groups;
        const int64_t out_c = w.size(0), in_g = w.size(1), kh = w.size(2), kw = w.size(3);
        const int64_t ho = rg.size(3), wo = rg.size(4);
        const at::Tensor& rw = dir[layer.param[0]];
        if (groups == 1) {
          // As in the forward: directions as output channels against the shared x / g, as
          // batch rows against the shared W.
          const int64_t in_c = x.size(1), h = x.size(2), wd = x.size(3);
          if (rw.defined()) {
            at::Tensor rgw = conv_weight_grad(rg.view({batch, k * out_c, ho, wo}), x,
                                              rw.view({k * out_c, in_c, kh, kw}), c, 1)
                                 .view(rw.sizes());
            if (second) {
              const at::Tensor like = at::empty({out_c, k * in_c, kh, kw}, w.options());
              const at::Tensor cross =
                  conv_weight_grad(g, rx.view({batch, k * in_c, h, wd}), like, c, 1);
              rgw.add_(cross.view({out_c, k, in_c, kh, kw}).permute({1, 0, 2, 3, 4}));
            }
            result[layer.param[0]] = rgw;
          }
          if (layer.attr[0] != 0 && has_dir(layer.param[1])) {
            result[layer.param[1]] = rg.sum({0, 3, 4});
          }
          if (!need_input) break;
          rgx = conv_input_grad(rg.view({batch * k, out_c, ho, wo}),
                                rx.view({batch * k, in_c, h, wd}), w, c, 1);
          if (!ggn && rw.defined()) {
            const at::Tensor wt = rw.permute({1, 0, 2, 3, 4}).reshape({out_c, k * in_c, kh, kw});
            rgx.view({batch, k * in_c, h, wd})
                .add_(conv_input_grad(g, rx.view({batch, k * in_c, h, wd}), wt, c, 1));
          }
          rgx = rgx.view(block_shape(x, k));
          break;
        }
        const at::Tensor rgf = fold(rg);
        if (rw.defined()) {
          const at::Tensor rw_flat = rw.view({k * out_c, in_g, kh, kw});
          at::Tensor rgw;
          if (second) {
            // sum_b R(g)_j x^T + g R(x)_j^T as one weight gradient over a doubled batch.
            rgw = conv_weight_grad(at::cat({rgf, tile_channels(g, k)}, 0),
                                   at::cat({tile_channels(x, k), fold(rx)}, 0), rw_flat, c,
                                   k * groups);
          } else {
            rgw = conv_weight_grad(rgf, tile_channels(x, k), rw_flat, c, k * groups);
          }
          result[layer.param[0]] = rgw.view(rw.sizes());
        }
        if (layer.attr[0] != 0 && has_dir(layer.param[1])) {
          result[layer.param[1]] = rg.sum({0, 3, 4});
        }
        if (!need_input) break;
        const at::Tensor rx_like = fold(rx);
        if (!ggn && rw.defined()) {
          // R(g_x)_j = conv^T(R(g)_j, W) + conv^T(g, R(W)_j): one transposed convolution whose
          // output-gradient channels are [R(g)_j, g] against weights [W; R(W)_j].
          const int64_t og = out_c / groups;
          const at::Tensor gin = pair(
              rg.view({batch, k, groups, og, ho, wo}),
              g.view({batch, 1, groups, og, ho, wo}).expand({batch, k, groups, og, ho, wo}), 3);
          const at::Tensor win =
              pair(w.view({1, groups, og, in_g, kh, kw}).expand({k, groups, og, in_g, kh, kw}),
                   rw.view({k, groups, og, in_g, kh, kw}), 2);
          rgx = conv_input_grad(gin.view({batch, k * 2 * out_c, ho, wo}),
                                rx_like, win.view({k * 2 * out_c, in_g, kh, kw}), c, k * groups);
        } else {
          rgx = conv_input_grad(rgf, rx_like, tile_out_channels(w, k), c, k * groups);
        }
        rgx = unfold(rgx, k);
        break;
      }
      case kActivation: {
        if (ggn) {
          rgx = call_activation_jvp(x, s.y, rg, layer);
        } else {
          std::tie(gx, rgx) = call_activation_hvp_backward(x, s.y, g, rx, rg, layer);
        }
        break;
      }
      case kMaxPool2d:
      case kAdaptiveMaxPool2d: {
        const int64_t ch = x.size(1);
        const at::Tensor idx = k == 1 ? s.indices
                                      : s.indices.unsqueeze(1)
                                            .expand(block_shape(s.indices, k))
                                            .reshape({batch, k * ch, s.indices.size(2),
                                                      s.indices.size(3)});
        rgx = unfold(max_pool_backward(layer, fold(rg), fold(rx), idx), k);
        break;
      }
      case kAvgPool2d:
        rgx = unfold(avg_pool_backward(layer, fold(rg), fold(rx)), k);
        break;
      case kAdaptiveAvgPool2d:
        rgx = unfold(at::_adaptive_avg_pool2d_backward(fold(rg), fold(rx)), k);
        break;
      case kFlatten:
        rgx = rg.reshape(block_shape(x, k));
        break;
      case kBatchNorm: {
        const BatchNormParams bn = batch_norm_params(layer);
        const int64_t ch = x.size(1);
        const auto rview = channel_view(ch, x.dim() + 1, 2);
        auto kview = rview;
        kview[1] = k;
        std::vector<int64_t> reduce_dims{0};
        for (int64_t d = 3; d < x.dim() + 1; ++d) reduce_dims.push_back(d);
        if (bn.weight >= 0 && has_dir(bn.weight)) {
          at::Tensor prod = rg * s.xhat.unsqueeze(1);
          if (second) prod.add_(g.unsqueeze(1) * rx * s.inv_std.view(rview));
          result[bn.weight] = prod.sum(reduce_dims);
        }
        if (bn.bias >= 0 && has_dir(bn.bias)) result[bn.bias] = rg.sum(reduce_dims);
        if (!need_input) break;
        rgx = rg * s.scale.view(rview);
        if (!ggn && bn.weight >= 0 && has_dir(bn.weight)) {
          rgx.add_(g.unsqueeze(1) * s.inv_std.view(rview) * dir[bn.weight].view(kview));
        }
        break;
      }
      default:
        break;
    }
    if (!ggn && need_input) {
      if (cached && gradient_kept(layers, l - 1)) {
        gx = primal[num_layers + l - 1];
      } else if (!gx.defined()) {
        gx = layer_input_grad(layer, s, g, params);
      }
    }
    g = gx;
    rg = rgx.defined() ? rgx.contiguous() : rgx;
  }

  for (int64_t i = 0; i < num_params; ++i) {
    if (!has_dir(i)) {
      result[i] = at::empty({0}, inputs.options());
    } else if (!result[i].defined()) {
      result[i] = at::zeros_like(dir[i]);
    }
  }
  return result;
}

TORCH_LIBRARY_IMPL(torch_dlt, CPU, m) {
  m.impl("activation_jvp", &activation_jvp_cpu);
  m.impl("activation_hvp_backward", &activation_hvp_backward_cpu);
  m.impl("loss_curvature", &loss_curvature_cpu);
  m.impl("sequential_primal", &sequential_primal);
  m.impl("sequential_hvp", &sequential_hvp);
}

}  // namespace torch_dlt
