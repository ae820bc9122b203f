// CPU kernels of the certified-bound ops (torch_dlt/robust/bounds.py):
//
//   relu_lines           CROWN's backward step through a ReLU relaxed by per-unit lines:
//                        A_in = slope_l A+ + slope_u A-  and  bias = A- . v_neg + A . v_all,
//   relu_lines_backward  its gradient with respect to every input,
//   ibp_relu_            interval propagation through a ReLU, centre and radius in place.
//
// Each is one pass over memory, where the same expressions in ATen ops take four (forward) to
// eight (gradient) passes over the A-matrix, the largest tensor of a bound computation. Rows of
// A are [K] contiguous; a batch stride of 0 (an expanded A or vector) is read as is.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "bounds.h"

namespace torch_dlt {
namespace {

using namespace bounds_rows;

constexpr int64_t kTile = 512;    // columns per tile of the gradient: its 8 vectors stay in L1
constexpr int64_t kGrain = 32768; // elements per parallel task

// out == nullptr: A_in is written over A (contiguous), each row through a buffer.
template <typename T, bool kAll>
void lines_forward(const Lines& s, T* A, int64_t sa, const LineRows<T>& v, T* out, T* bias) {
  const int64_t K = s.cols;
  at::parallel_for(0, s.batch * s.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(out == nullptr ? K : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.rows, i = row % s.rows;
      T* a = A + b * sa + i * K;
      T* o = out == nullptr ? buffer.data() : out + row * K;
      bias[row] = forward_row<T, kAll>(K, a, v.l(b), v.u(b), v.n(b), v.v(b), o);
      if (out == nullptr) std::copy(o, o + K, a);
    }
  });
}

template <typename T, bool kAll>
void lines_backward(const Lines& s, const T* G, const T* GB, const T* A, int64_t sa,
                    const LineRows<T>& v, T* gA, T* gl, T* gu, T* gn, T* gv) {
  const int64_t K = s.cols, m = s.rows;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(K * m, 1));
  at::parallel_for(0, s.batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* out_l = gl + b * K;
      T* out_u = gu + b * K;
      T* out_n = gn + b * K;
      T* out_v = gv + b * K;
      std::fill(out_l, out_l + K, T(0));
      std::fill(out_u, out_u + K, T(0));
      std::fill(out_n, out_n + K, T(0));
      std::fill(out_v, out_v + K, T(0));  // stays 0 without v_all
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        const int64_t k1 = std::min(K, k0 + kTile);
        for (int64_t i = 0; i < m; ++i) {
          backward_row<T, kAll>(k0, k1, GB[b * m + i], A + b * sa + i * K, G + (b * m + i) * K,
                                v.l(b), v.u(b), v.n(b), v.v(b), gA + (b * m + i) * K, out_l,
                                out_u, out_n, out_v);
        }
      }
    }
  });
}

// relu_lines into out, or over A (contiguous) when out is undefined; returns the bias.
at::Tensor lines_forward_into(const Lines& s, const at::Tensor& A, const LineVectors& vectors,
                              const at::Tensor& out) {
  at::Tensor bias = at::empty({s.batch, s.rows}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "relu_lines_cpu", [&] {
    auto kernel =
        vectors.has_all() ? lines_forward<scalar_t, true> : lines_forward<scalar_t, false>;
    kernel(s, const_cast<scalar_t*>(A.const_data_ptr<scalar_t>()), batch_stride(A),
           vectors.rows<scalar_t>(), out.defined() ? out.data_ptr<scalar_t>() : nullptr,
           bias.data_ptr<scalar_t>());
  });
  return bias;
}

std::tuple<at::Tensor, at::Tensor> relu_lines_cpu(const at::Tensor& A_, const at::Tensor& slope_l,
                                                  const at::Tensor& slope_u,
                                                  const at::Tensor& v_neg,
                                                  const c10::optional<at::Tensor>& v_all) {
  const Lines s = check_lines("relu_lines", A_, slope_l, slope_u, v_neg, v_all);
  const at::Tensor A = rows_contiguous(A_);
  at::Tensor out = at::empty({s.batch, s.rows, s.cols}, A.options());
  at::Tensor bias = lines_forward_into(s, A, LineVectors(slope_l, slope_u, v_neg, v_all), out);
  return {out, bias};
}

at::Tensor relu_lines_in_place_cpu(const at::Tensor& A, const at::Tensor& slope_l,
                                   const at::Tensor& slope_u, const at::Tensor& v_neg,
                                   const c10::optional<at::Tensor>& v_all) {
  const Lines s = check_lines("relu_lines_", A, slope_l, slope_u, v_neg, v_all);
  TORCH_CHECK(A.is_contiguous(), "torch_dlt::relu_lines_: A must be contiguous (it is written "
              "in place)");
  return lines_forward_into(s, A, LineVectors(slope_l, slope_u, v_neg, v_all), at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relu_lines_backward_cpu(
    const at::Tensor& grad_in_, const at::Tensor& grad_bias_, const at::Tensor& A_,
    const at::Tensor& slope_l, const at::Tensor& slope_u, const at::Tensor& v_neg,
    const c10::optional<at::Tensor>& v_all) {
  const Lines s = check_lines("relu_lines_backward", A_, slope_l, slope_u, v_neg, v_all);
  TORCH_CHECK(grad_in_.sizes() == at::IntArrayRef({s.batch, s.rows, s.cols}),
              "torch_dlt::relu_lines_backward: grad_in must be [B, m, K] = ", A_.sizes(), ", got ",
              grad_in_.sizes());
  TORCH_CHECK(grad_bias_.sizes() == at::IntArrayRef({s.batch, s.rows}),
              "torch_dlt::relu_lines_backward: grad_bias must be [B, m] = [", s.batch, ", ",
              s.rows, "], got ", grad_bias_.sizes());
  TORCH_CHECK(grad_in_.scalar_type() == A_.scalar_type() &&
                  grad_bias_.scalar_type() == A_.scalar_type(),
              "torch_dlt::relu_lines_backward: gradients must have A's dtype");
  const at::Tensor G = grad_in_.contiguous(), GB = grad_bias_.contiguous();
  const at::Tensor A = rows_contiguous(A_);
  const LineVectors vectors(slope_l, slope_u, v_neg, v_all);
  at::Tensor grad_A = at::empty({s.batch, s.rows, s.cols}, A.options());
  at::Tensor grad_l = at::empty({s.batch, s.cols}, A.options());
  at::Tensor grad_u = at::empty({s.batch, s.cols}, A.options());
  at::Tensor grad_n = at::empty({s.batch, s.cols}, A.options());
  at::Tensor grad_v = at::empty({s.batch, s.cols}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "relu_lines_backward_cpu", [&] {
    auto kernel =
        vectors.has_all() ? lines_backward<scalar_t, true> : lines_backward<scalar_t, false>;
    kernel(s, G.data_ptr<scalar_t>(), GB.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
           batch_stride(A), vectors.rows<scalar_t>(), grad_A.data_ptr<scalar_t>(),
           grad_l.data_ptr<scalar_t>(), grad_u.data_ptr<scalar_t>(), grad_n.data_ptr<scalar_t>(),
           grad_v.data_ptr<scalar_t>());
  });
  return {grad_A, grad_l, grad_u, grad_n, grad_v};
}

void ibp_relu_cpu(const at::Tensor& c, const at::Tensor& r) {
  TORCH_CHECK(c.device().is_cpu() && r.device().is_cpu(),
              "torch_dlt::ibp_relu_: tensors must be on the CPU");
  TORCH_CHECK(c.sizes() == r.sizes(), "torch_dlt::ibp_relu_: centre ", c.sizes(),
              " and radius ", r.sizes(), " must have the same shape");
  TORCH_CHECK(c.is_contiguous() && r.is_contiguous(),
              "torch_dlt::ibp_relu_: centre and radius must be contiguous (they are written in "
              "place)");
  TORCH_CHECK(c.scalar_type() == r.scalar_type() &&
                  (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble),
              "torch_dlt::ibp_relu_: centre and radius must both be float32 or float64");
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "ibp_relu_cpu", [&] {
    scalar_t* __restrict cp = c.data_ptr<scalar_t>();
    scalar_t* __restrict rp = r.data_ptr<scalar_t>();
    at::parallel_for(0, c.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t hi = cp[k] + rp[k], lo = cp[k] - rp[k];
        const scalar_t upper = scalar_t(0.5) * (hi + std::abs(hi));  // relu, without a branch
        const scalar_t lower = scalar_t(0.5) * (lo + std::abs(lo));
        rp[k] = upper - lower;
        cp[k] = lower + upper;
      }
    });
  });
}

// ---------------------------------------------------------------- CROWN's ReLU lines
//
// From the pre-activation bounds l, u [B, C, S] (S = H W, or 1): the upper line u (z - l) / (u - l)
// (slope_u, icpt_u = -slope_u l) and the adaptive lower line's slope (1 where u > -l) on unstable
// units (l < 0 < u); slope 1, 0 on active (l >= 0) and inactive units. Outputs [B, C, S] in either
// the input's order or channels-last [B, S, C] memory (the order of CROWN's A-matrices on maps),
// so no permuted copy follows.

// f(in, out) for every unit: its index in the bounds [B, C, S] and in the lines' layout.
template <typename F>
void for_each_unit(int64_t B, int64_t C, int64_t S, bool cl, const F& f) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < S; ++x)
          f((b * C + c) * S + x, cl ? (b * S + x) * C + c : (b * C + c) * S + x);
  });
}

template <typename T>
void lines_of_bounds(const T* lo, const T* up, int64_t B, int64_t C, int64_t S, bool cl, T* sl,
                     T* su, T* icpt, bool* unstable) {
  for_each_unit(B, C, S, cl, [&](int64_t in, int64_t out) {
    const T l = lo[in], u = up[in];
    const bool mid = l < T(0) && u > T(0);
    const T slope = mid ? u / (u - l) : T(l >= T(0));
    su[out] = slope;
    icpt[out] = mid ? -slope * l : T(0);
    sl[out] = mid ? T(u > -l) : T(l >= T(0));
    unstable[out] = mid;
  });
}

template <typename T>
void lines_of_bounds_backward(const T* g_su, const T* g_icpt, const T* lo, const T* up, int64_t B,
                              int64_t C, int64_t S, bool cl, T* g_lo, T* g_up) {
  for_each_unit(B, C, S, cl, [&](int64_t in, int64_t out) {
    const T l = lo[in], u = up[in];
    if (l < T(0) && u > T(0)) {
      // slope = u / (u - l), icpt = -slope l
      const T inv = T(1) / (u - l), inv2 = inv * inv;
      const T gs = g_su[out], gi = g_icpt[out];
      g_up[in] = gs * (-l * inv2) + gi * (l * l * inv2);
      g_lo[in] = gs * (u * inv2) + gi * (-u * u * inv2);
    } else {
      g_up[in] = T(0);
      g_lo[in] = T(0);
    }
  });
}

struct BoundsLayout {
  int64_t B, C, S;
};

BoundsLayout check_bounds(const char* op, const at::Tensor& lower, const at::Tensor& upper) {
  TORCH_CHECK(lower.sizes() == upper.sizes() && lower.dim() >= 2, "torch_dlt::", op,
              ": lower and upper must have the same shape [B, C, ...], got ", lower.sizes(),
              " and ", upper.sizes());
  TORCH_CHECK(lower.device().is_cpu() && upper.device().is_cpu(), "torch_dlt::", op,
              ": tensors must be on the CPU");
  TORCH_CHECK(lower.scalar_type() == upper.scalar_type() &&
                  (lower.scalar_type() == at::kFloat || lower.scalar_type() == at::kDouble),
              "torch_dlt::", op, ": lower and upper must both be float32 or float64");
  BoundsLayout s{lower.size(0), lower.size(1), 1};
  for (int64_t d = 2; d < lower.dim(); ++d) s.S *= lower.size(d);
  return s;
}

// An empty tensor shaped like t: channels-last memory for a 4-d map when cl.
at::Tensor empty_like_layout(const at::Tensor& t, bool cl, at::ScalarType dtype) {
  auto opts = t.options().dtype(dtype);
  if (cl && t.dim() == 4) return at::empty(t.sizes(), opts, at::MemoryFormat::ChannelsLast);
  return at::empty(t.sizes(), opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crown_lines_cpu(
    const at::Tensor& lower_, const at::Tensor& upper_, bool channels_last) {
  const BoundsLayout s = check_bounds("crown_lines", lower_, upper_);
  const bool cl = channels_last && lower_.dim() == 4;
  const at::Tensor lower = lower_.contiguous(), upper = upper_.contiguous();
  at::Tensor sl = empty_like_layout(lower, cl, lower.scalar_type());
  at::Tensor su = empty_like_layout(lower, cl, lower.scalar_type());
  at::Tensor icpt = empty_like_layout(lower, cl, lower.scalar_type());
  at::Tensor unstable = empty_like_layout(lower, cl, at::kBool);
  AT_DISPATCH_FLOATING_TYPES(lower.scalar_type(), "crown_lines_cpu", [&] {
    lines_of_bounds<scalar_t>(lower.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>(), s.B, s.C,
                              s.S, cl, sl.data_ptr<scalar_t>(), su.data_ptr<scalar_t>(),
                              icpt.data_ptr<scalar_t>(), unstable.data_ptr<bool>());
  });
  return {sl, su, icpt, unstable};
}

std::tuple<at::Tensor, at::Tensor> crown_lines_backward_cpu(const at::Tensor& grad_slope_u,
                                                            const at::Tensor& grad_icpt_u,
                                                            const at::Tensor& lower_,
                                                            const at::Tensor& upper_,
                                                            bool channels_last) {
  const BoundsLayout s = check_bounds("crown_lines_backward", lower_, upper_);
  const bool cl = channels_last && lower_.dim() == 4;
  const at::Tensor lower = lower_.contiguous(), upper = upper_.contiguous();
  auto in_layout = [&](const at::Tensor& g) {
    TORCH_CHECK(g.sizes() == lower.sizes(), "torch_dlt::crown_lines_backward: gradients must be ",
                lower.sizes(), ", got ", g.sizes());
    return cl ? g.contiguous(at::MemoryFormat::ChannelsLast) : g.contiguous();
  };
  const at::Tensor gs = in_layout(grad_slope_u), gi = in_layout(grad_icpt_u);
  at::Tensor g_lo = at::empty(lower.sizes(), lower.options());
  at::Tensor g_up = at::empty(lower.sizes(), lower.options());
  AT_DISPATCH_FLOATING_TYPES(lower.scalar_type(), "crown_lines_backward_cpu", [&] {
    lines_of_bounds_backward<scalar_t>(gs.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(),
                                       lower.data_ptr<scalar_t>(), upper.data_ptr<scalar_t>(),
                                       s.B, s.C, s.S, cl, g_lo.data_ptr<scalar_t>(),
                                       g_up.data_ptr<scalar_t>());
  });
  return {g_lo, g_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CPU, m) {
  m.impl("relu_lines", &relu_lines_cpu);
  m.impl("relu_lines_", &relu_lines_in_place_cpu);
  m.impl("relu_lines_backward", &relu_lines_backward_cpu);
  m.impl("ibp_relu_", &ibp_relu_cpu);
  m.impl("crown_lines", &crown_lines_cpu);
  m.impl("crown_lines_backward", &crown_lines_backward_cpu);
}

}  // namespace torch_dlt
