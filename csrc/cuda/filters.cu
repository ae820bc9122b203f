// CUDA kernels of the filter-visualisation ops torch_dlt::filter_grid and
// torch_dlt::spectral_signature.
//
// filter_grid: the channel mean (channels='mean') is taken first; one block per filter reduces
// its min / max (or max |w|); then one thread per tile pixel writes it into the padded grid.
// spectral_signature: one thread per (filter, half-plane frequency) evaluates the zero-padded
// DFT directly (kh kw I terms: filters are small, so this beats an FFT of n^2 mostly-zero
// points); then one block per filter bins the power through the bin table (shared-memory
// atomics), finds the peak and the power-weighted mean and spread of the radial frequency.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "filters.h"

namespace torch_dlt {
namespace {

constexpr int kThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// w: [O, planes, kh, kw] contiguous after the channel mapping, plane = tile * C + c.
template <typename scalar_t, typename acc_t>
__global__ void filter_stats_kernel(const scalar_t* __restrict__ w, int64_t per_filter,
                                    bool symmetric, acc_t* __restrict__ lo,
                                    acc_t* __restrict__ hi) {
  const int64_t o = blockIdx.x;
  const scalar_t* f = w + o * per_filter;
  acc_t mn = INFINITY, mx = -INFINITY, mabs = 0;
  for (int64_t p = threadIdx.x; p < per_filter; p += blockDim.x) {
    const acc_t v = static_cast<acc_t>(f[p]);
    mn = min(mn, v);
    mx = max(mx, v);
    mabs = max(mabs, abs(v));
  }
  __shared__ acc_t s_mn[kThreads], s_mx[kThreads], s_abs[kThreads];
  s_mn[threadIdx.x] = mn;
  s_mx[threadIdx.x] = mx;
  s_abs[threadIdx.x] = mabs;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      s_mn[threadIdx.x] = min(s_mn[threadIdx.x], s_mn[threadIdx.x + stride]);
      s_mx[threadIdx.x] = max(s_mx[threadIdx.x], s_mx[threadIdx.x + stride]);
      s_abs[threadIdx.x] = max(s_abs[threadIdx.x], s_abs[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    lo[o] = s_mn[0];
    hi[o] = symmetric ? s_abs[0] : s_mx[0];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void fill_grid_kernel(const scalar_t* __restrict__ w, GridSpec s,
                                 const acc_t* __restrict__ lo, const acc_t* __restrict__ hi,
                                 bool global, scalar_t* __restrict__ out) {
  const int64_t total = s.tiles * s.image_channels * s.kh * s.kw;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= total) return;
  const int64_t x = idx % s.kw, y = (idx / s.kw) % s.kh;
  const int64_t c = (idx / (s.kw * s.kh)) % s.image_channels;
  const int64_t tile = idx / (s.kw * s.kh * s.image_channels);
  const int64_t o = tile / s.tiles_per_filter;
  acc_t origin = 0, scale = 1, shift = 0;
  if (s.normalize != GridNormalize::kNone) {
    const int64_t k = global ? 0 : o;
    normalisation<acc_t>(lo[k], hi[k], s.symmetric, &origin, &scale, &shift);
  }
  const acc_t v = static_cast<acc_t>(w[idx]);  // idx runs over (tile, c, y, x) = the planes
  const int64_t top = (tile / s.cols) * (s.kh + s.padding) + s.padding;
  const int64_t left = (tile % s.cols) * (s.kw + s.padding) + s.padding;
  out[(c * s.height + top + y) * s.width + left + x] =
      static_cast<scalar_t>((v - origin) * scale + shift);
}

at::Tensor filter_grid_cuda(const at::Tensor& weight, int64_t nrow, int64_t padding,
                            double pad_value, c10::string_view normalize, bool symmetric,
                            c10::string_view channels) {
  TORCH_CHECK(weight.is_cuda(), "torch_dlt::filter_grid (CUDA kernel): weight is on ",
              weight.device());
  const GridSpec s = check_filter_grid(weight, nrow, padding, normalize, channels, symmetric);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor mapped = s.channels == GridChannels::kMean ? weight.mean(1, /*keepdim=*/true)
                                                              : weight;
  const at::Tensor wc = mapped.contiguous();
  at::Tensor out = at::full({s.image_channels, s.height, s.width}, pad_value, weight.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "torch_dlt::filter_grid_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = wc.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor lo = at::zeros({s.filters}, acc_options);
    at::Tensor hi = at::zeros({s.filters}, acc_options);
    const bool global = s.normalize == GridNormalize::kGlobal;
    if (s.normalize != GridNormalize::kNone) {
      const int64_t per_filter = s.tiles_per_filter * s.image_channels * s.kh * s.kw;
      filter_stats_kernel<scalar_t, acc_t><<<s.filters, kThreads, 0, stream>>>(
          wc.const_data_ptr<scalar_t>(), per_filter, s.symmetric, lo.mutable_data_ptr<acc_t>(),
          hi.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (global) {
        lo = lo.min().reshape({1});
        hi = hi.max().reshape({1});
      }
    }
    const int64_t total = s.tiles * s.image_channels * s.kh * s.kw;
    fill_grid_kernel<scalar_t, acc_t><<<ceil_div(total, kThreads), kThreads, 0, stream>>>(
        wc.const_data_ptr<scalar_t>(), s, lo.const_data_ptr<acc_t>(), hi.const_data_ptr<acc_t>(),
        global, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// power[o, ky * half + kx] = sum_i |DFT_n(w[o, i])(ky, kx)|^2 for kx <= n/2.
template <typename scalar_t, typename acc_t>
__global__ void half_power_kernel(const scalar_t* __restrict__ w, int64_t filters,
                                  int64_t in_channels, int64_t kh, int64_t kw, int64_t n,
                                  const acc_t* __restrict__ cos_t,
                                  const acc_t* __restrict__ sin_t, acc_t* __restrict__ power) {
  const int64_t half = n / 2 + 1;
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= filters * n * half) return;
  const int64_t kx = idx % half, ky = (idx / half) % n, o = idx / (half * n);
  acc_t p = 0;
  for (int64_t i = 0; i < in_channels; ++i) {
    const scalar_t* f = w + (o * in_channels + i) * kh * kw;
    acc_t re = 0, im = 0;
    for (int64_t y = 0; y < kh; ++y) {
      const int64_t my = (ky * y) % n;
      for (int64_t x = 0; x < kw; ++x) {
        const int64_t m = (my + kx * x) % n;
        const acc_t v = static_cast<acc_t>(f[y * kw + x]);
        re += v * cos_t[m];
        im -= v * sin_t[m];
      }
    }
    p += re * re + im * im;
  }
  power[idx] = p;
}

template <typename acc_t>
__device__ inline acc_t radius_of(int64_t index, int64_t n) {
  const acc_t fy = static_cast<acc_t>(signed_index(index / n, n)) / static_cast<acc_t>(n);
  const acc_t fx = static_cast<acc_t>(signed_index(index % n, n)) / static_cast<acc_t>(n);
  return sqrt(fx * fx + fy * fy);
}

// On the self-mirrored columns kx = 0 and n/2 the pair (ky, -ky) is averaged, so that mirrored
// points tie exactly and the peak is the first in row-major order, as in the reference.
template <typename acc_t>
__device__ inline acc_t half_plane_power(const acc_t* p, int64_t ky, int64_t kx, int64_t n) {
  const int64_t half = n / 2 + 1;
  if (kx > 0 && 2 * kx != n) return p[ky * half + kx];
  return acc_t(0.5) * (p[ky * half + kx] + p[((n - ky) % n) * half + kx]);
}

template <typename acc_t>
__device__ inline acc_t block_sum(acc_t v, acc_t* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = scratch[0];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void signature_kernel(const acc_t* __restrict__ power, const int64_t* __restrict__ bins,
                                 int64_t n, int64_t n_bins, scalar_t* __restrict__ power_out,
                                 scalar_t* __restrict__ orient_out,
                                 scalar_t* __restrict__ freq_out, scalar_t* __restrict__ bw_out) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* binned = reinterpret_cast<acc_t*>(shared_bytes);
  __shared__ acc_t scratch[kThreads];
  __shared__ acc_t best_value[kThreads];
  __shared__ int64_t best_at[kThreads];
  const int64_t o = blockIdx.x;
  const int64_t half = n / 2 + 1;
  const acc_t* p_o = power + o * n * half;
  for (int64_t b = threadIdx.x; b < n_bins; b += blockDim.x) binned[b] = 0;
  __syncthreads();

  acc_t total = 0, first = 0, best = -1;
  int64_t best_index = 0;
  for (int64_t h = threadIdx.x; h < n * half; h += blockDim.x) {
    const int64_t ky = h / half, kx = h % half;
    const acc_t p = half_plane_power(p_o, ky, kx, n);
    // The point itself and, off the self-mirrored columns, its mirror (-ky, -kx).
    const int count = (kx > 0 && 2 * kx != n) ? 2 : 1;
    for (int k = 0; k < count; ++k) {
      const int64_t index = k == 0 ? ky * n + kx : ((n - ky) % n) * n + (n - kx);
      const int64_t b = bins[index];
      if (b < 0) continue;
      atomicAdd(binned + b, p);
      total += p;
      first += p * radius_of<acc_t>(index, n);
      if (p > best || (p == best && index < best_index)) {
        best = p;
        best_index = index;
      }
    }
  }
  total = block_sum(total, scratch);
  first = block_sum(first, scratch);
  best_value[threadIdx.x] = best;
  best_at[threadIdx.x] = best_index;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const acc_t v = best_value[threadIdx.x + stride];
      const int64_t where = best_at[threadIdx.x + stride];
      if (v > best_value[threadIdx.x] ||
          (v == best_value[threadIdx.x] && where < best_at[threadIdx.x])) {
        best_value[threadIdx.x] = v;
        best_at[threadIdx.x] = where;
      }
    }
    __syncthreads();
  }
  const acc_t mean = total > 0 ? first / total : acc_t(0);
  acc_t second = 0;
  for (int64_t h = threadIdx.x; h < n * half; h += blockDim.x) {
    const int64_t ky = h / half, kx = h % half;
    const acc_t p = half_plane_power(p_o, ky, kx, n);
    const int count = (kx > 0 && 2 * kx != n) ? 2 : 1;
    for (int k = 0; k < count; ++k) {
      const int64_t index = k == 0 ? ky * n + kx : ((n - ky) % n) * n + (n - kx);
      if (bins[index] < 0) continue;
      const acc_t d = radius_of<acc_t>(index, n) - mean;
      second += p * d * d;
    }
  }
  second = block_sum(second, scratch);
  for (int64_t b = threadIdx.x; b < n_bins; b += blockDim.x) {
    power_out[o * n_bins + b] = static_cast<scalar_t>(binned[b]);
  }
  if (threadIdx.x == 0) {
    const int64_t peak = best_at[0];
    const acc_t fy = static_cast<acc_t>(signed_index(peak / n, n)) / static_cast<acc_t>(n);
    const acc_t fx = static_cast<acc_t>(signed_index(peak % n, n)) / static_cast<acc_t>(n);
    const acc_t pi = static_cast<acc_t>(kPi);
    acc_t angle = atan2(fy, fx);
    if (angle < 0) angle += pi;
    if (angle >= pi) angle -= pi;
    orient_out[o] = static_cast<scalar_t>(angle);
    freq_out[o] = static_cast<scalar_t>(radius_of<acc_t>(peak, n));
    const acc_t var = total > 0 ? max(second / total, acc_t(0)) : acc_t(0);
    bw_out[o] = static_cast<scalar_t>(sqrt(var));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_signature_cuda(
    const at::Tensor& weight, const at::Tensor& bin_index, int64_t n_orient, int64_t n_freq,
    int64_t fft_size) {
  TORCH_CHECK(weight.is_cuda(), "torch_dlt::spectral_signature (CUDA kernel): weight is on ",
              weight.device());
  check_spectral_signature(weight, bin_index, n_orient, n_freq, fft_size);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bins = bin_index.to(weight.device()).contiguous();
  const int64_t o = weight.size(0), n = fft_size, half = fft_size / 2 + 1;
  const int64_t n_bins = n_orient * n_freq;
  at::Tensor power = at::empty({o, n_orient, n_freq}, weight.options());
  at::Tensor orient = at::empty({o}, weight.options());
  at::Tensor freq = at::empty({o}, weight.options());
  at::Tensor bw = at::empty({o}, weight.options());
  if (o == 0) return {power, orient, freq, bw};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "torch_dlt::spectral_signature_cuda", [&] {
    // double throughout, as on the CPU: near-equal spectral peaks then resolve the same way.
    using acc_t = double;
    const auto acc_options = wc.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor angles = at::arange(n, wc.options().dtype(at::kDouble)) * (2.0 * kPi / n);
    const at::Tensor cos_t = angles.cos().to(acc_options.dtype());
    const at::Tensor sin_t = angles.sin().to(acc_options.dtype());
    at::Tensor half_power = at::empty({o, n * half}, acc_options);
    const int64_t points = o * n * half;
    half_power_kernel<scalar_t, acc_t><<<ceil_div(points, kThreads), kThreads, 0, stream>>>(
        wc.const_data_ptr<scalar_t>(), o, weight.size(1), weight.size(2), weight.size(3), n,
        cos_t.const_data_ptr<acc_t>(), sin_t.const_data_ptr<acc_t>(),
        half_power.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t shared = static_cast<size_t>(n_bins) * sizeof(acc_t);
    TORCH_CHECK(shared <= 40 * 1024, "torch_dlt::spectral_signature (CUDA): n_orient * n_freq = ",
                n_bins, " bins do not fit in shared memory");
    signature_kernel<scalar_t, acc_t><<<o, kThreads, shared, stream>>>(
        half_power.const_data_ptr<acc_t>(), bins.const_data_ptr<int64_t>(), n, n_bins,
        power.mutable_data_ptr<scalar_t>(), orient.mutable_data_ptr<scalar_t>(),
        freq.mutable_data_ptr<scalar_t>(), bw.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {power, orient, freq, bw};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CUDA, m) {
  m.impl("filter_grid", &filter_grid_cuda);
  m.impl("spectral_signature", &spectral_signature_cuda);
}

}  // namespace torch_dlt
