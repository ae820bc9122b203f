// CPU kernels of the filter-visualisation ops torch_dlt::filter_grid and
// torch_dlt::spectral_signature, parallel over filters (at::parallel_for, OpenMP).
//
// filter_grid: the channel mean (channels='mean') is taken first; then each filter's tiles are
// contiguous planes of kh x kw, so one pass over them gives the min / max (or max |w|) and a
// second writes every tile row straight into the padded grid.
// spectral_signature: the zero-padded DFT of a kh x kw filter is a pruned separable DFT - one
// kh x kw -> kh x (n/2+1) pass along rows and a kh -> n pass along columns, kh n (kw + n) work
// instead of an n^2 log n FFT of mostly zeros - over the half plane kx <= n/2 (the power
// spectrum of a real filter is symmetric), with twiddle tables per row / column offset so the
// inner loops run over contiguous kx; then binned through the caller's bin table.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "filters.h"

namespace torch_dlt {
namespace {

// w: [O, planes, kh, kw] contiguous after the channel mapping, plane = tile * C + c.
template <typename scalar_t>
void filter_grid_kernel(const scalar_t* w, const GridSpec& s, scalar_t* out) {
  const int64_t plane = s.kh * s.kw;
  const int64_t per_filter = s.tiles_per_filter * s.image_channels * plane;
  std::vector<scalar_t> origin(s.filters, 0), scale(s.filters, 1), shift(s.filters, 0);
  if (s.normalize != GridNormalize::kNone) {
    std::vector<scalar_t> lo(s.filters), hi(s.filters);
    at::parallel_for(0, s.filters, 64, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const scalar_t* f = w + o * per_filter;
        scalar_t mn = f[0], mx = f[0], mabs = std::abs(f[0]);
        for (int64_t p = 1; p < per_filter; ++p) {
          mn = std::min(mn, f[p]);
          mx = std::max(mx, f[p]);
          mabs = std::max(mabs, std::abs(f[p]));
        }
        lo[o] = mn;
        hi[o] = s.symmetric ? mabs : mx;
      }
    });
    if (s.normalize == GridNormalize::kGlobal) {
      const scalar_t glo = *std::min_element(lo.begin(), lo.end());
      const scalar_t ghi = *std::max_element(hi.begin(), hi.end());
      std::fill(lo.begin(), lo.end(), glo);
      std::fill(hi.begin(), hi.end(), ghi);
    }
    for (int64_t o = 0; o < s.filters; ++o) {
      normalisation<scalar_t>(lo[o], hi[o], s.symmetric, &origin[o], &scale[o], &shift[o]);
    }
  }
  const int64_t channel_stride = s.height * s.width;
  at::parallel_for(0, s.tiles, 64, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t o = tile / s.tiles_per_filter;
      const scalar_t org = origin[o], sc = scale[o], sh = shift[o];
      const int64_t top = (tile / s.cols) * (s.kh + s.padding) + s.padding;
      const int64_t left = (tile % s.cols) * (s.kw + s.padding) + s.padding;
      for (int64_t c = 0; c < s.image_channels; ++c) {
        const scalar_t* src = w + (tile * s.image_channels + c) * plane;
        for (int64_t y = 0; y < s.kh; ++y) {
          scalar_t* dst = out + c * channel_stride + (top + y) * s.width + left;
          const scalar_t* row = src + y * s.kw;
          for (int64_t x = 0; x < s.kw; ++x) dst[x] = (row[x] - org) * sc + sh;
        }
      }
    }
  });
}

at::Tensor filter_grid_cpu(const at::Tensor& weight, int64_t nrow, int64_t padding,
                           double pad_value, c10::string_view normalize, bool symmetric,
                           c10::string_view channels) {
  TORCH_CHECK(weight.device().is_cpu(), "torch_dlt::filter_grid (CPU kernel): weight is on ",
              weight.device());
  const GridSpec s = check_filter_grid(weight, nrow, padding, normalize, channels, symmetric);
  const at::Tensor mapped = s.channels == GridChannels::kMean ? weight.mean(1, /*keepdim=*/true)
                                                              : weight;
  const at::Tensor wc = mapped.contiguous();
  at::Tensor out = at::full({s.image_channels, s.height, s.width}, pad_value, weight.options());
  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "torch_dlt::filter_grid", [&] {
    filter_grid_kernel<scalar_t>(wc.const_data_ptr<scalar_t>(), s,
                                 out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

template <typename scalar_t>
void spectral_signature_kernel(const scalar_t* w, const int64_t* bins, int64_t filters,
                               int64_t in_channels, int64_t kh, int64_t kw, int64_t n,
                               int64_t n_bins, scalar_t* power_out, scalar_t* orient_out,
                               scalar_t* freq_out, scalar_t* bw_out) {
  using acc_t = double;
  const int64_t half = n / 2 + 1;
  const double two_pi = 2.0 * kPi;
  // Twiddles e^{-2 pi i k m / n} = cos - i sin, as tables over (x, kx) and (y, ky).
  std::vector<acc_t> cos_x(kw * half), sin_x(kw * half), cos_y(kh * n), sin_y(kh * n);
  for (int64_t x = 0; x < kw; ++x) {
    for (int64_t kx = 0; kx < half; ++kx) {
      const double a = two_pi * static_cast<double>((kx * x) % n) / static_cast<double>(n);
      cos_x[x * half + kx] = std::cos(a);
      sin_x[x * half + kx] = std::sin(a);
    }
  }
  for (int64_t y = 0; y < kh; ++y) {
    for (int64_t ky = 0; ky < n; ++ky) {
      const double a = two_pi * static_cast<double>((ky * y) % n) / static_cast<double>(n);
      cos_y[y * n + ky] = std::cos(a);
      sin_y[y * n + ky] = std::sin(a);
    }
  }
  // Per half-plane point h: its full-plane index, its mirror's (-1 when it is its own), and
  // |f| in cycles per pixel as the reference's fftfreq gives it (the same for both).
  std::vector<int64_t> index_a(n * half), index_b(n * half);
  std::vector<acc_t> radius(n * half);
  for (int64_t ky = 0; ky < n; ++ky) {
    for (int64_t kx = 0; kx < half; ++kx) {
      const int64_t h = ky * half + kx;
      index_a[h] = ky * n + kx;
      index_b[h] = (kx > 0 && 2 * kx != n) ? ((n - ky) % n) * n + (n - kx) : -1;
      const acc_t fy = static_cast<acc_t>(signed_index(ky, n)) / static_cast<acc_t>(n);
      const acc_t fx = static_cast<acc_t>(signed_index(kx, n)) / static_cast<acc_t>(n);
      radius[h] = std::sqrt(fx * fx + fy * fy);
    }
  }

  at::parallel_for(0, filters, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row_re(kh * half), row_im(kh * half), power(n * half);
    std::vector<acc_t> col_re(half), col_im(half), binned(n_bins);
    for (int64_t o = begin; o < end; ++o) {
      std::fill(power.begin(), power.end(), acc_t(0));
      for (int64_t i = 0; i < in_channels; ++i) {
        const scalar_t* f = w + (o * in_channels + i) * kh * kw;
        std::fill(row_re.begin(), row_re.end(), acc_t(0));
        std::fill(row_im.begin(), row_im.end(), acc_t(0));
        for (int64_t y = 0; y < kh; ++y) {  // along rows
          acc_t* re = row_re.data() + y * half;
          acc_t* im = row_im.data() + y * half;
          for (int64_t x = 0; x < kw; ++x) {
            const acc_t v = static_cast<acc_t>(f[y * kw + x]);
            const acc_t* c = cos_x.data() + x * half;
            const acc_t* sn = sin_x.data() + x * half;
            for (int64_t kx = 0; kx < half; ++kx) {
              re[kx] += v * c[kx];
              im[kx] -= v * sn[kx];
            }
          }
        }
        for (int64_t ky = 0; ky < n; ++ky) {  // along columns
          std::fill(col_re.begin(), col_re.end(), acc_t(0));
          std::fill(col_im.begin(), col_im.end(), acc_t(0));
          for (int64_t y = 0; y < kh; ++y) {
            const acc_t c = cos_y[y * n + ky], sn = sin_y[y * n + ky];
            const acc_t* a = row_re.data() + y * half;
            const acc_t* b = row_im.data() + y * half;
            for (int64_t kx = 0; kx < half; ++kx) {
              col_re[kx] += a[kx] * c + b[kx] * sn;
              col_im[kx] += b[kx] * c - a[kx] * sn;
            }
          }
          acc_t* p = power.data() + ky * half;
          for (int64_t kx = 0; kx < half; ++kx) {
            p[kx] += col_re[kx] * col_re[kx] + col_im[kx] * col_im[kx];
          }
        }
      }
      // On the self-mirrored columns kx = 0 and n/2 the pair (ky, -ky) is averaged, so that
      // mirrored points tie exactly and the peak is the first in row-major order, as in the
      // reference.
      for (int64_t ky = 0; ky <= n / 2; ++ky) {
        const int64_t my = (n - ky) % n;
        for (int64_t kx : {int64_t(0), n / 2}) {
          if (kx == n / 2 && n % 2 == 1) continue;
          const acc_t m = acc_t(0.5) * (power[ky * half + kx] + power[my * half + kx]);
          power[ky * half + kx] = m;
          power[my * half + kx] = m;
        }
      }

      std::fill(binned.begin(), binned.end(), acc_t(0));
      acc_t total = 0, first = 0, best = -1;
      int64_t best_index = 0;
      for (int64_t h = 0; h < n * half; ++h) {
        const acc_t p = power[h];
        for (const int64_t index : {index_a[h], index_b[h]}) {
          if (index < 0 || bins[index] < 0) continue;
          binned[bins[index]] += p;
          total += p;
          first += p * radius[h];
          // The first maximum in row-major order, as argmax gives it.
          if (p > best || (p == best && index < best_index)) {
            best = p;
            best_index = index;
          }
        }
      }
      const acc_t mean = total > 0 ? first / total : acc_t(0);
      acc_t second = 0;
      for (int64_t h = 0; h < n * half; ++h) {
        const acc_t d = radius[h] - mean;
        for (const int64_t index : {index_a[h], index_b[h]}) {
          if (index >= 0 && bins[index] >= 0) second += power[h] * d * d;
        }
      }
      for (int64_t b = 0; b < n_bins; ++b) {
        power_out[o * n_bins + b] = static_cast<scalar_t>(binned[b]);
      }
      const acc_t fy = static_cast<acc_t>(signed_index(best_index / n, n)) / n;
      const acc_t fx = static_cast<acc_t>(signed_index(best_index % n, n)) / n;
      acc_t angle = std::atan2(fy, fx);
      if (angle < 0) angle += kPi;
      if (angle >= kPi) angle -= kPi;
      orient_out[o] = static_cast<scalar_t>(angle);
      freq_out[o] = static_cast<scalar_t>(std::sqrt(fx * fx + fy * fy));
      bw_out[o] = static_cast<scalar_t>(total > 0 ? std::sqrt(std::max(second / total, 0.0)) : 0.0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_signature_cpu(
    const at::Tensor& weight, const at::Tensor& bin_index, int64_t n_orient, int64_t n_freq,
    int64_t fft_size) {
  TORCH_CHECK(weight.device().is_cpu(),
              "torch_dlt::spectral_signature (CPU kernel): weight is on ", weight.device());
  check_spectral_signature(weight, bin_index, n_orient, n_freq, fft_size);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bins = bin_index.to(weight.device()).contiguous();
  const int64_t o = weight.size(0);
  at::Tensor power = at::empty({o, n_orient, n_freq}, weight.options());
  at::Tensor orient = at::empty({o}, weight.options());
  at::Tensor freq = at::empty({o}, weight.options());
  at::Tensor bw = at::empty({o}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(wc.scalar_type(), "torch_dlt::spectral_signature", [&] {
    spectral_signature_kernel<scalar_t>(
        wc.const_data_ptr<scalar_t>(), bins.const_data_ptr<int64_t>(), o, weight.size(1),
        weight.size(2), weight.size(3), fft_size, n_orient * n_freq,
        power.mutable_data_ptr<scalar_t>(), orient.mutable_data_ptr<scalar_t>(),
        freq.mutable_data_ptr<scalar_t>(), bw.mutable_data_ptr<scalar_t>());
  });
  return {power, orient, freq, bw};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CPU, m) {
  m.impl("filter_grid", &filter_grid_cpu);
  m.impl("spectral_signature", &spectral_signature_cpu);
}

}  // namespace torch_dlt
