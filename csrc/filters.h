// Shapes, argument checks and per-pixel arithmetic shared by the CPU and CUDA kernels of the
// filter-visualisation ops torch_dlt::filter_grid and torch_dlt::spectral_signature.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <string>

namespace torch_dlt {

constexpr double kPi = 3.141592653589793238462643383279502884;

// How the I input channels of a filter become tiles of C image channels.
enum class GridChannels : int { kRgb = 0, kTiles = 1, kMean = 2 };
// Over which pixels the min-max (or max-abs) normalisation is taken.
enum class GridNormalize : int { kFilter = 0, kGlobal = 1, kNone = 2 };

struct GridSpec {
  int64_t filters, in_channels, kh, kw;
  int64_t tiles_per_filter, image_channels, tiles;
  int64_t nrow, cols, rows, padding, height, width;
  GridChannels channels;
  GridNormalize normalize;
  bool symmetric;
};

inline GridSpec check_filter_grid(const at::Tensor& weight, int64_t nrow, int64_t padding,
                                  c10::string_view normalize, c10::string_view channels,
                                  bool symmetric) {
  TORCH_CHECK(weight.dim() == 4, "torch_dlt::filter_grid: weight must be [O, I, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "torch_dlt::filter_grid: weight must be float32 or float64, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.numel() > 0, "torch_dlt::filter_grid: weight is empty: ", weight.sizes());
  TORCH_CHECK(nrow >= 1, "torch_dlt::filter_grid: nrow must be >= 1, got ", nrow);
  TORCH_CHECK(padding >= 0, "torch_dlt::filter_grid: padding must be >= 0, got ", padding);
  GridSpec s;
  s.filters = weight.size(0);
  s.in_channels = weight.size(1);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  const std::string ch(channels);
  if (ch == "rgb") {
    TORCH_CHECK(s.in_channels == 3, "torch_dlt::filter_grid: channels='rgb' needs I == 3, got ",
                weight.sizes());
    s.channels = GridChannels::kRgb;
    s.tiles_per_filter = 1;
    s.image_channels = 3;
  } else if (ch == "tiles") {
    s.channels = GridChannels::kTiles;
    s.tiles_per_filter = s.in_channels;
    s.image_channels = 1;
  } else if (ch == "mean") {
    s.channels = GridChannels::kMean;
    s.tiles_per_filter = 1;
    s.image_channels = 1;
  } else {
    TORCH_CHECK(false, "torch_dlt::filter_grid: channels must be 'rgb', 'tiles' or 'mean', got '",
                ch, "'");
  }
  const std::string norm(normalize);
  if (norm == "filter") {
    s.normalize = GridNormalize::kFilter;
  } else if (norm == "global") {
    s.normalize = GridNormalize::kGlobal;
  } else if (norm == "none") {
    s.normalize = GridNormalize::kNone;
  } else {
    TORCH_CHECK(false, "torch_dlt::filter_grid: normalize must be 'filter', 'global' or 'none', ",
                "got '", norm, "'");
  }
  s.symmetric = symmetric;
  s.tiles = s.filters * s.tiles_per_filter;
  s.nrow = nrow;
  s.cols = std::min(nrow, s.tiles);
  s.rows = (s.tiles + s.cols - 1) / s.cols;
  s.padding = padding;
  s.height = s.rows * (s.kh + padding) + padding;
  s.width = s.cols * (s.kw + padding) + padding;
  return s;
}

// The map value -> (value - origin) * scale + shift that a filter's statistics give; a constant
// filter (or an all-zero one, for the symmetric map) is drawn mid-grey.
template <typename acc_t>
C10_HOST_DEVICE inline void normalisation(acc_t lo, acc_t hi, bool symmetric, acc_t* origin,
                                          acc_t* scale, acc_t* shift) {
  if (symmetric) {
    const acc_t m = hi;  // hi holds max |value| in the symmetric case
    *origin = acc_t(0);
    *scale = m > acc_t(0) ? acc_t(0.5) / m : acc_t(0);
    *shift = acc_t(0.5);
  } else {
    const acc_t span = hi - lo;
    *origin = lo;
    *scale = span > acc_t(0) ? acc_t(1) / span : acc_t(0);
    *shift = span > acc_t(0) ? acc_t(0) : acc_t(0.5);
  }
}

inline void check_spectral_signature(const at::Tensor& weight, const at::Tensor& bin_index,
                                     int64_t n_orient, int64_t n_freq, int64_t fft_size) {
  TORCH_CHECK(weight.dim() == 4,
              "torch_dlt::spectral_signature: weight must be [O, I, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "torch_dlt::spectral_signature: weight must be float32 or float64, got ",
              weight.scalar_type());
  TORCH_CHECK(n_orient >= 1 && n_freq >= 1,
              "torch_dlt::spectral_signature: n_orient and n_freq must be >= 1, got ", n_orient,
              " and ", n_freq);
  TORCH_CHECK(fft_size >= weight.size(2) && fft_size >= weight.size(3) && fft_size >= 2,
              "torch_dlt::spectral_signature: fft_size=", fft_size,
              " must be >= 2 and cover the kernel ", weight.sizes());
  TORCH_CHECK(bin_index.scalar_type() == at::kLong && bin_index.dim() == 2 &&
                  bin_index.size(0) == fft_size && bin_index.size(1) == fft_size,
              "torch_dlt::spectral_signature: bin_index must be int64 [fft_size, fft_size] = [",
              fft_size, ", ", fft_size, "], got ", bin_index.scalar_type(), " ",
              bin_index.sizes());
  const int64_t top = bin_index.max().item<int64_t>();
  TORCH_CHECK(top < n_orient * n_freq, "torch_dlt::spectral_signature: bin_index holds bin ", top,
              " but there are only n_orient * n_freq = ", n_orient * n_freq, " bins");
}

// numpy/torch fftfreq numerator of DFT index k (k, or k - n from n/2 on).
C10_HOST_DEVICE inline int64_t signed_index(int64_t k, int64_t n) {
  return k < (n + 1) / 2 ? k : k - n;
}

}  // namespace torch_dlt
