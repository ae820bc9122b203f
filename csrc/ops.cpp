// Every schema of the torch_dlt operator library, in one place.
// Kernels register per dispatch key in csrc/cpu/ and csrc/cuda/; fake kernels and autograd
// formulas are registered from Python (torch_dlt/ops/_fake.py).
#include <torch/library.h>

TORCH_LIBRARY(torch_dlt, m) {
  // Per-feature mean, population variance and excess kurtosis of x along `dim`, one pass over
  // memory with Chan/Pebay merges of block statistics. float32 and float64.
  m.def("moments(Tensor x, int dim) -> (Tensor mean, Tensor var, Tensor kurtosis)");
  // Filter visualisation. Conv weights [O, I, kh, kw] tiled into one image [C, H, W],
  // each filter (or all of them) min-max / max-abs normalised; channels: 'rgb' | 'tiles' | 'mean'.
  m.def(
      "filter_grid(Tensor weight, int nrow, int padding, float pad_value, str normalize, "
      "bool symmetric, str channels) -> Tensor");
  // Per-filter power spectrum (zero-padded fft_size-point DFT, summed over input channels)
  // binned through bin_index [fft_size, fft_size] into [O, n_orient, n_freq], with the peak's
  // orientation and frequency and the power-weighted spread of the radial frequency.
  m.def(
      "spectral_signature(Tensor weight, Tensor bin_index, int n_orient, int n_freq, "
      "int fft_size) -> (Tensor power, Tensor orientation, Tensor frequency, Tensor bandwidth)");
  // Hessian- / Gauss-Newton-vector products by the R-operator (Pearlmutter 1994).
  // R-tensors carry k directions as dim 1: [B, k, *x.shape[1:]]. activation kinds and the
  // sequential_hvp program encoding: torch_dlt/ops/_hvp_reference.py.
  // sigma'(x) v for an activation y = sigma(x).
  m.def("activation_jvp(Tensor x, Tensor y, Tensor v, int kind, float a, float b) -> Tensor");
  // (sigma'(x) g, sigma'(x) rg + sigma''(x) g rx): backward and R-backward of an activation.
  m.def(
      "activation_hvp_backward(Tensor x, Tensor y, Tensor g, Tensor rx, Tensor rg, int kind, "
      "float a, float b) -> (Tensor gx, Tensor rgx)");
  // Loss gradient wrt the outputs z and the loss Hessian applied to rz; loss 0 = cross-entropy,
  // 1 = MSE; reduction 0 = mean, 1 = sum.
  m.def(
      "loss_curvature(Tensor z, Tensor targets, Tensor rz, int loss, int reduction) -> "
      "(Tensor grad, Tensor hz)");
  // H V (ggn=False) or G V (ggn=True) of loss(program(inputs), targets) with respect to the params
  // that have a direction [k, *param.shape]; one result per params entry (empty where none).
  // primal: [] or sequential_primal's result for the same inputs, targets and params, which
  // spares the forward and the backward of the gradient.
  m.def(
      "sequential_hvp(Tensor inputs, Tensor targets, Tensor[] params, Tensor?[] directions, "
      "int[] program, float[] constants, int loss, int reduction, bool ggn, Tensor[] primal) -> "
      "Tensor[]");
  // The layers' outputs and (gradients) the loss gradient at each; empty tensors for Flatten's.
  m.def(
      "sequential_primal(Tensor inputs, Tensor targets, Tensor[] params, int[] program, "
      "float[] constants, int loss, int reduction, bool gradients) -> Tensor[]");
  // Certified bounds (torch_dlt/robust/bounds.py). CROWN's backward step through a ReLU whose
  // lower / upper lines have slopes slope_l / slope_u: for A [B, m, K] and vectors [B or 1, K],
  // A_in = slope_l A+ + slope_u A- and bias = A- . v_neg + A . v_all (v_neg carries the upper
  // line's intercept, v_all a bias of the layer below).
  m.def(
      "relu_lines(Tensor A, Tensor slope_l, Tensor slope_u, Tensor v_neg, Tensor? v_all) -> "
      "(Tensor A_in, Tensor bias)");
  // The same with A_in written over A (contiguous); returns the bias. Not differentiable.
  m.def(
      "relu_lines_(Tensor(a!) A, Tensor slope_l, Tensor slope_u, Tensor v_neg, Tensor? v_all) "
      "-> Tensor bias");
  // Its gradient with respect to A, slope_l, slope_u, v_neg and v_all (each [B, K], v_all's
  // summed by the caller where it was shared).
  m.def(
      "relu_lines_backward(Tensor grad_in, Tensor grad_bias, Tensor A, Tensor slope_l, "
      "Tensor slope_u, Tensor v_neg, Tensor? v_all) -> (Tensor grad_A, Tensor grad_slope_l, "
      "Tensor grad_slope_u, Tensor grad_v_neg, Tensor grad_v_all)");
  // Interval bound propagation through a ReLU in place: the box centre c, radius r becomes
  // (u + l, u - l) with u = relu(c + r), l = relu(c - r), i.e. twice the new centre and radius.
  m.def("ibp_relu_(Tensor(a!) c, Tensor(b!) r) -> ()");
  // conv2d(A, taps, padding=(th - 1, tw - 1)) for A [N, C, h, w] and taps [P, C, th, tw] with few
  // outputs P, and its gradient (grad [N, P, h + th - 1, w + tw - 1] -> grad_A, grad_taps).
  m.def("phase_conv(Tensor A, Tensor taps) -> Tensor");
  m.def("phase_conv_backward(Tensor grad, Tensor A, Tensor taps) -> (Tensor grad_A, Tensor grad_taps)");
  // The last two steps of CROWN's backward pass when a ReLU sits on a strided input convolution:
  // for A [B, m, K = h w C] (units channels-last), lower = relu_lines bias + the box's minimum of
  // phase_conv(relu_lines(A), taps) against the box frames [B, rows cols P]; returns the lower
  // bound [B, m] and the phases [B, m, rows cols P] (kept for the gradient).
  m.def(
      "relu_phase_lower(Tensor A, Tensor slope_l, Tensor slope_u, Tensor v_neg, Tensor? v_all, "
      "Tensor taps, Tensor c_frame, Tensor r_frame, int h, int w) -> (Tensor lower, Tensor phases)");
  // Its gradient: A, slope_l, slope_u, v_neg, v_all ([B, K], the caller sums a shared one),
  // taps, c_frame, r_frame.
  m.def(
      "relu_phase_lower_backward(Tensor grad, Tensor A, Tensor slope_l, Tensor slope_u, "
      "Tensor v_neg, Tensor? v_all, Tensor taps, Tensor c_frame, Tensor r_frame, Tensor phases, "
      "int h, int w) -> Tensor[]");
  // CROWN's ReLU relaxation from pre-activation bounds [B, C, ...]: the adaptive lower line's
  // slope, the upper line's slope and intercept, and the unstable mask; channels-last memory for
  // maps when channels_last. Differentiable in lower and upper through crown_lines_backward.
  m.def(
      "crown_lines(Tensor lower, Tensor upper, bool channels_last) -> (Tensor slope_l, "
      "Tensor slope_u, Tensor icpt_u, Tensor unstable)");
  m.def(
      "crown_lines_backward(Tensor grad_slope_u, Tensor grad_icpt_u, Tensor lower, Tensor upper, "
      "bool channels_last) -> (Tensor grad_lower, Tensor grad_upper)");
}
