// CPU kernels of torch_dlt::phase_conv: the "full" correlation of A [N, C, h, w] with a small
// kernel taps [P, C, th, tw] (padding th - 1, tw - 1), i.e. conv2d(A, taps, padding=(th-1, tw-1)),
// and its gradient. CROWN pushes A-matrices through a strided input convolution this way (the
// transposed convolution by its stride phases, torch_dlt/robust/bounds.py), with few outputs P
// (stride^2 x input channels, 4 for one grey channel) and many rows N, a shape for which the
// library convolutions run at a fraction of the machine's speed. Here A is read channels-last,
// each output pixel's P sums are formed from its th x tw window in registers (AVX2 + FMA where
// the CPU has them, checked at run time), and the output is written channels-last.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "bounds.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TORCH_DLT_X86 1
#endif

namespace torch_dlt {
namespace {

struct PhaseShape {
  int64_t n, c, h, w, p, th, tw, rows, cols;
};

PhaseShape check_phase(const char* op, const at::Tensor& A, const at::Tensor& taps) {
  TORCH_CHECK(A.dim() == 4 && taps.dim() == 4, "torch_dlt::", op,
              ": A must be [N, C, h, w] and taps [P, C, th, tw], got ", A.sizes(), " and ",
              taps.sizes());
  TORCH_CHECK(A.size(1) == taps.size(1), "torch_dlt::", op, ": A has ", A.size(1),
              " channels, taps ", taps.size(1));
  TORCH_CHECK(A.device().is_cpu() && taps.device().is_cpu(), "torch_dlt::", op,
              ": tensors must be on the CPU");
  TORCH_CHECK(A.scalar_type() == taps.scalar_type() &&
                  (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "torch_dlt::", op, ": A and taps must both be float32 or float64");
  PhaseShape s{A.size(0), A.size(1), A.size(2),  A.size(3), taps.size(0),
               taps.size(2), taps.size(3), 0, 0};
  s.rows = s.h + s.th - 1;
  s.cols = s.w + s.tw - 1;
  return s;
}

// [N, h, w, C] contiguous (a view when A is channels-last already).
at::Tensor channels_last_rows(const at::Tensor& A) { return A.permute({0, 2, 3, 1}).contiguous(); }

// ---------------------------------------------------------------- portable loops (any dtype)

template <typename T>
void forward_plain(const PhaseShape& s, const T* A, const T* W, T* out, int64_t n0, int64_t n1) {
  // W: [th, tw, P, C]
  std::vector<T> acc(s.p);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t y = 0; y < s.rows; ++y) {
      for (int64_t x = 0; x < s.cols; ++x) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t i = 0; i < s.th; ++i) {
          const int64_t yy = y + i - (s.th - 1);
          if (yy < 0 || yy >= s.h) continue;
          for (int64_t j = 0; j < s.tw; ++j) {
            const int64_t xx = x + j - (s.tw - 1);
            if (xx < 0 || xx >= s.w) continue;
            const T* a = A + ((n * s.h + yy) * s.w + xx) * s.c;
            const T* wk = W + (i * s.tw + j) * s.p * s.c;
            for (int64_t p = 0; p < s.p; ++p) {
              T sum = 0;
              for (int64_t c = 0; c < s.c; ++c) sum += a[c] * wk[p * s.c + c];
              acc[p] += sum;
            }
          }
        }
        T* o = out + ((n * s.rows + y) * s.cols + x) * s.p;
        for (int64_t p = 0; p < s.p; ++p) o[p] = acc[p];
      }
    }
  }
}

// grad_A for examples [n0, n1); grad_W (accumulated) [th, tw, P, C].
template <typename T>
void backward_plain(const PhaseShape& s, const T* G, const T* A, const T* W, T* gA, T* gW,
                    int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t yy = 0; yy < s.h; ++yy) {
      for (int64_t xx = 0; xx < s.w; ++xx) {
        const T* a = A + ((n * s.h + yy) * s.w + xx) * s.c;
        T* ga = gA + ((n * s.h + yy) * s.w + xx) * s.c;
        std::fill(ga, ga + s.c, T(0));
        for (int64_t i = 0; i < s.th; ++i) {
          const int64_t y = yy + (s.th - 1) - i;
          for (int64_t j = 0; j < s.tw; ++j) {
            const int64_t x = xx + (s.tw - 1) - j;
            const T* g = G + ((n * s.rows + y) * s.cols + x) * s.p;
            const T* wk = W + (i * s.tw + j) * s.p * s.c;
            T* gw = gW + (i * s.tw + j) * s.p * s.c;
            for (int64_t p = 0; p < s.p; ++p) {
              const T gp = g[p];
              for (int64_t c = 0; c < s.c; ++c) {
                ga[c] += gp * wk[p * s.c + c];
                gw[p * s.c + c] += gp * a[c];
              }
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- AVX2 + FMA (float, C % 8 == 0)

#ifdef TORCH_DLT_X86
constexpr int64_t kMaxP = 8;  // accumulators held in registers

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Output pixels' sums for NP consecutive outputs p0.., accumulators in registers.
template <int NP>
__attribute__((target("avx2,fma"))) inline void forward_pixel(const PhaseShape& s,
                                                              const float* A, const float* W,
                                                              float* o, int64_t n, int64_t y,
                                                              int64_t x, int64_t p0) {
  __m256 acc[NP];
  for (int q = 0; q < NP; ++q) acc[q] = _mm256_setzero_ps();
  for (int64_t i = 0; i < s.th; ++i) {
    const int64_t yy = y + i - (s.th - 1);
    if (yy < 0 || yy >= s.h) continue;
    for (int64_t j = 0; j < s.tw; ++j) {
      const int64_t xx = x + j - (s.tw - 1);
      if (xx < 0 || xx >= s.w) continue;
      const float* a = A + ((n * s.h + yy) * s.w + xx) * s.c;
      const float* wk = W + ((i * s.tw + j) * s.p + p0) * s.c;
      for (int64_t c = 0; c < s.c; c += 8) {
        const __m256 av = _mm256_loadu_ps(a + c);
        for (int q = 0; q < NP; ++q)
          acc[q] = _mm256_fmadd_ps(av, _mm256_loadu_ps(wk + q * s.c + c), acc[q]);
      }
    }
  }
  for (int q = 0; q < NP; ++q) o[p0 + q] = hsum(acc[q]);
}

using PixelFn = void (*)(const PhaseShape&, const float*, const float*, float*, int64_t, int64_t,
                         int64_t, int64_t);

__attribute__((target("avx2,fma"))) void forward_avx2(const PhaseShape& s, const float* A,
                                                      const float* W, float* out, int64_t n0,
                                                      int64_t n1) {
  static const PixelFn by_count[kMaxP + 1] = {
      nullptr,          forward_pixel<1>, forward_pixel<2>, forward_pixel<3>, forward_pixel<4>,
      forward_pixel<5>, forward_pixel<6>, forward_pixel<7>, forward_pixel<8>};
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t y = 0; y < s.rows; ++y) {
      for (int64_t x = 0; x < s.cols; ++x) {
        float* o = out + ((n * s.rows + y) * s.cols + x) * s.p;
        for (int64_t p0 = 0; p0 < s.p; p0 += kMaxP) {
          const int64_t np = std::min(kMaxP, s.p - p0);
          if (np == 4) {
            forward_pixel<4>(s, A, W, o, n, y, x, p0);
          } else {
            by_count[np](s, A, W, o, n, y, x, p0);
          }
        }
      }
    }
  }
}

// The th x tw x P output gradients that input pixel (yy, xx) of example n feeds, gathered once
// per example in (i, j, p) order, as rows of gv [h w, taps]: both gradients read them in order.
__attribute__((target("avx2,fma"))) void gather_windows(const PhaseShape& s, const float* G,
                                                        int64_t n, float* gv) {
  const int64_t taps = s.th * s.tw * s.p;
  for (int64_t yy = 0; yy < s.h; ++yy) {
    for (int64_t xx = 0; xx < s.w; ++xx) {
      float* o = gv + (yy * s.w + xx) * taps;
      for (int64_t i = 0; i < s.th; ++i) {
        for (int64_t j = 0; j < s.tw; ++j) {
          const float* g =
              G + ((n * s.rows + yy + (s.th - 1) - i) * s.cols + xx + (s.tw - 1) - j) * s.p;
          for (int64_t p = 0; p < s.p; ++p) *o++ = g[p];
        }
      }
    }
  }
}

// grad_A of example n: each pixel's CB blocks of 8 channels, two independent sums per block (one
// chain of dependent FMAs would wait on each one's latency).
template <int CB>
__attribute__((target("avx2,fma"))) void backward_input_avx2(const PhaseShape& s,
                                                             const float* gv, const float* W,
                                                             float* gA, int64_t n) {
  const int64_t taps = s.th * s.tw * s.p;
  for (int64_t pix = 0; pix < s.h * s.w; ++pix) {
    const float* g = gv + pix * taps;
    float* ga = gA + (n * s.h * s.w + pix) * s.c;
    __m256 even[CB], odd[CB];
    for (int b = 0; b < CB; ++b) even[b] = odd[b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 1 < taps; k += 2) {
      const __m256 g0 = _mm256_broadcast_ss(g + k), g1 = _mm256_broadcast_ss(g + k + 1);
      const float* w0 = W + k * s.c;
      for (int b = 0; b < CB; ++b) {
        even[b] = _mm256_fmadd_ps(g0, _mm256_loadu_ps(w0 + 8 * b), even[b]);
        odd[b] = _mm256_fmadd_ps(g1, _mm256_loadu_ps(w0 + s.c + 8 * b), odd[b]);
      }
    }
    if (k < taps) {
      const __m256 g0 = _mm256_broadcast_ss(g + k);
      for (int b = 0; b < CB; ++b)
        even[b] = _mm256_fmadd_ps(g0, _mm256_loadu_ps(W + k * s.c + 8 * b), even[b]);
    }
    for (int b = 0; b < CB; ++b) _mm256_storeu_ps(ga + 8 * b, _mm256_add_ps(even[b], odd[b]));
  }
}

// grad_W of example n for 8 channels [c, c + 8) and all TAPS taps, accumulated in registers.
template <int TAPS>
__attribute__((target("avx2,fma"))) void backward_weight_block(const PhaseShape& s,
                                                               const float* gv, const float* A,
                                                               float* gW, int64_t c, int64_t n) {
  __m256 acc[TAPS];
  for (int t = 0; t < TAPS; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t pix = 0; pix < s.h * s.w; ++pix) {
    const __m256 av = _mm256_loadu_ps(A + (n * s.h * s.w + pix) * s.c + c);
    const float* g = gv + pix * TAPS;
#pragma GCC unroll 16
    for (int k = 0; k < TAPS; ++k)
      acc[k] = _mm256_fmadd_ps(_mm256_broadcast_ss(g + k), av, acc[k]);
  }
  for (int t = 0; t < TAPS; ++t) {
    float* gw = gW + t * s.c + c;  // taps ordered (i, j, p), like W
    _mm256_storeu_ps(gw, _mm256_add_ps(_mm256_loadu_ps(gw), acc[t]));
  }
}

// Whether the AVX2 gradient applies: every tap's accumulator (nearly) fits in a register.
constexpr int64_t kMaxTaps = 16;

__attribute__((target("avx2,fma"))) void backward_avx2(const PhaseShape& s, const float* G,
                                                       const float* A, const float* W, float* gA,
                                                       float* gW, int64_t n0, int64_t n1) {
  const int64_t taps = s.th * s.tw * s.p;
  std::vector<float> gathered(s.h * s.w * taps);
  float* gv = gathered.data();
  for (int64_t n = n0; n < n1; ++n) {
    gather_windows(s, G, n, gv);
    switch (s.c / 8) {
      case 1: backward_input_avx2<1>(s, gv, W, gA, n); break;
      case 2: backward_input_avx2<2>(s, gv, W, gA, n); break;
      case 3: backward_input_avx2<3>(s, gv, W, gA, n); break;
      default: backward_input_avx2<4>(s, gv, W, gA, n); break;
    }
    for (int64_t c = 0; c < s.c; c += 8) {
      switch (taps) {
#define TORCH_DLT_TAPS(K) \
  case K:                 \
    backward_weight_block<K>(s, gv, A, gW, c, n); \
    break;
        TORCH_DLT_TAPS(1) TORCH_DLT_TAPS(2) TORCH_DLT_TAPS(3) TORCH_DLT_TAPS(4) TORCH_DLT_TAPS(5)
        TORCH_DLT_TAPS(6) TORCH_DLT_TAPS(7) TORCH_DLT_TAPS(8) TORCH_DLT_TAPS(9)
        TORCH_DLT_TAPS(10) TORCH_DLT_TAPS(11) TORCH_DLT_TAPS(12) TORCH_DLT_TAPS(13)
        TORCH_DLT_TAPS(14) TORCH_DLT_TAPS(15) TORCH_DLT_TAPS(16)
#undef TORCH_DLT_TAPS
        default:
          break;
      }
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename T>
bool use_avx2(const PhaseShape& s) {
#ifdef TORCH_DLT_X86
  return std::is_same<T, float>::value && s.c % 8 == 0 && has_avx2();
#else
  return false;
#endif
}

bool backward_fits(const PhaseShape& s) {
#ifdef TORCH_DLT_X86
  return s.th * s.tw * s.p <= kMaxTaps && s.c <= 32;
#else
  (void)s;
  return false;
#endif
}

// taps [P, C, th, tw] -> [th, tw, P, C]
at::Tensor taps_by_position(const at::Tensor& taps) {
  return taps.permute({2, 3, 0, 1}).contiguous();
}

int64_t grain_examples(const PhaseShape& s) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, s.rows * s.cols * s.p * s.c));
}

at::Tensor phase_conv_cpu(const at::Tensor& A_, const at::Tensor& taps) {
  const PhaseShape s = check_phase("phase_conv", A_, taps);
  const at::Tensor A = channels_last_rows(A_), W = taps_by_position(taps);
  at::Tensor out = at::empty({s.n, s.rows, s.cols, s.p}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "phase_conv_cpu", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* w = W.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool fast = use_avx2<scalar_t>(s);
    at::parallel_for(0, s.n, grain_examples(s), [&](int64_t n0, int64_t n1) {
#ifdef TORCH_DLT_X86
      if (fast) {
        forward_avx2(s, reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(w),
                     reinterpret_cast<float*>(o), n0, n1);
        return;
      }
#endif
      (void)fast;
      forward_plain<scalar_t>(s, a, w, o, n0, n1);
    });
  });
  return out.permute({0, 3, 1, 2});  // [N, P, rows, cols], channels-last memory
}

std::tuple<at::Tensor, at::Tensor> phase_conv_backward_cpu(const at::Tensor& grad_,
                                                            const at::Tensor& A_,
                                                            const at::Tensor& taps) {
  const PhaseShape s = check_phase("phase_conv_backward", A_, taps);
  TORCH_CHECK(grad_.sizes() == at::IntArrayRef({s.n, s.p, s.rows, s.cols}),
              "torch_dlt::phase_conv_backward: grad must be [N, P, rows, cols] = [", s.n, ", ",
              s.p, ", ", s.rows, ", ", s.cols, "], got ", grad_.sizes());
  TORCH_CHECK(grad_.scalar_type() == A_.scalar_type(),
              "torch_dlt::phase_conv_backward: grad must have A's dtype");
  const at::Tensor G = channels_last_rows(grad_), A = channels_last_rows(A_),
                   W = taps_by_position(taps);
  at::Tensor grad_A = at::empty({s.n, s.h, s.w, s.c}, A.options());
  const int64_t grain = grain_examples(s);
  const int64_t chunks = (s.n + grain - 1) / std::max<int64_t>(grain, 1);
  // one grad_W partial sum per chunk of examples, added in a fixed order: deterministic
  at::Tensor partial = at::zeros({std::max<int64_t>(chunks, 1), s.th, s.tw, s.p, s.c},
                                 A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "phase_conv_backward_cpu", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* w = W.data_ptr<scalar_t>();
    scalar_t* ga = grad_A.data_ptr<scalar_t>();
    scalar_t* gw = partial.data_ptr<scalar_t>();
    const int64_t per_chunk = s.th * s.tw * s.p * s.c;
    const bool fast = use_avx2<scalar_t>(s) && backward_fits(s);
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t n0 = k * grain, n1 = std::min(s.n, n0 + grain);
#ifdef TORCH_DLT_X86
        if (fast) {
          backward_avx2(s, reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(a),
                        reinterpret_cast<const float*>(w), reinterpret_cast<float*>(ga),
                        reinterpret_cast<float*>(gw + k * per_chunk), n0, n1);
          continue;
        }
#endif
        (void)fast;
        backward_plain<scalar_t>(s, g, a, w, ga, gw + k * per_chunk, n0, n1);
      }
    });
  });
  at::Tensor grad_taps = partial.sum(0).permute({2, 3, 0, 1}).contiguous();  // [P, C, th, tw]
  return {grad_A.permute({0, 3, 1, 2}), grad_taps};
}

// ---------------------------------------------------------------- the fused input-layer bound
//
// relu_phase_lower: the last two steps of CROWN's backward pass when a ReLU sits on a strided
// input convolution. Per row n = (b, i) of A [B, m, K = h w C] (channels-last units):
//   A_in  = relu_lines(A)                       (a row buffer, never written to memory)
//   ph    = phase_conv(A_in, taps)              [rows cols P]  (returned for the gradient)
//   lower = bias(A) + sum(c_frame ph - r_frame |ph|)
// One read of A where the unfused steps write and read A_in and the phases again; the gradient
// likewise recomputes A_in in the buffer and writes only grad_A.

struct Fused {
  PhaseShape s;  // n = 1: one row
  int64_t batch, rows_m, K, R;
};

Fused check_fused(const at::Tensor& A, const at::Tensor& taps, const at::Tensor& c_frame,
                  const at::Tensor& r_frame, int64_t h, int64_t w) {
  TORCH_CHECK(A.dim() == 3 && taps.dim() == 4, "torch_dlt::relu_phase_lower: A must be [B, m, K] "
              "and taps [P, C, th, tw], got ", A.sizes(), " and ", taps.sizes());
  Fused f;
  f.s = PhaseShape{1, taps.size(1), h, w, taps.size(0), taps.size(2), taps.size(3), 0, 0};
  f.s.rows = h + f.s.th - 1;
  f.s.cols = w + f.s.tw - 1;
  f.batch = A.size(0);
  f.rows_m = A.size(1);
  f.K = A.size(2);
  f.R = f.s.rows * f.s.cols * f.s.p;
  TORCH_CHECK(f.K == h * w * f.s.c, "torch_dlt::relu_phase_lower: A's rows have ", f.K,
              " units, not h w C = ", h * w * f.s.c);
  for (const at::Tensor* t : {&c_frame, &r_frame}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == f.batch && t->size(1) == f.R,
                "torch_dlt::relu_phase_lower: the box frames must be [B, rows cols P] = [", f.batch,
                ", ", f.R, "], got ", t->sizes());
  }
  return f;
}

template <typename T>
void phase_row_forward(const PhaseShape& s, const T* buf, const T* W, T* ph) {
#ifdef TORCH_DLT_X86
  if (use_avx2<T>(s)) {
    forward_avx2(s, reinterpret_cast<const float*>(buf), reinterpret_cast<const float*>(W),
                 reinterpret_cast<float*>(ph), 0, 1);
    return;
  }
#endif
  forward_plain<T>(s, buf, W, ph, 0, 1);
}

template <typename T>
void phase_row_backward(const PhaseShape& s, const T* gph, const T* buf, const T* W, T* gbuf,
                        T* gW) {
#ifdef TORCH_DLT_X86
  if (use_avx2<T>(s) && backward_fits(s)) {
    backward_avx2(s, reinterpret_cast<const float*>(gph), reinterpret_cast<const float*>(buf),
                  reinterpret_cast<const float*>(W), reinterpret_cast<float*>(gbuf),
                  reinterpret_cast<float*>(gW), 0, 1);
    return;
  }
#endif
  backward_plain<T>(s, gph, buf, W, gbuf, gW, 0, 1);
}

template <typename T, bool kAll>
void fused_forward(const Fused& f, const T* A, int64_t sa, const bounds_rows::LineRows<T>& v,
                   const T* W, const T* cf, const T* rf, T* lower, T* phases) {
  at::parallel_for(0, f.batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(f.K);
    for (int64_t b = b0; b < b1; ++b) {
      const T* c = cf + b * f.R;
      const T* r = rf + b * f.R;
      for (int64_t i = 0; i < f.rows_m; ++i) {
        const int64_t n = b * f.rows_m + i;
        const T bias = bounds_rows::forward_row<T, kAll>(f.K, A + b * sa + i * f.K, v.l(b),
                                                         v.u(b), v.n(b), v.v(b), buf.data());
        T* ph = phases + n * f.R;
        phase_row_forward<T>(f.s, buf.data(), W, ph);
        T acc[bounds_rows::kLanes] = {};
        int64_t k = 0;
        for (; k + bounds_rows::kLanes <= f.R; k += bounds_rows::kLanes)
          for (int64_t j = 0; j < bounds_rows::kLanes; ++j)
            acc[j] += c[k + j] * ph[k + j] - r[k + j] * std::abs(ph[k + j]);
        T total = bias;
        for (; k < f.R; ++k) total += c[k] * ph[k] - r[k] * std::abs(ph[k]);
        for (int64_t j = 0; j < bounds_rows::kLanes; ++j) total += acc[j];
        lower[n] = total;
      }
    }
  });
}

// Gradients of example b are accumulated in place: gl, gu, gn, gv [B, K], gcf, grf [B, R] and
// gW_partial [B, taps] start at zero.
template <typename T, bool kAll>
void fused_backward(const Fused& f, const T* G, const T* A, int64_t sa,
                    const bounds_rows::LineRows<T>& v, const T* W, const T* cf, const T* rf,
                    const T* phases, T* gA, T* gl, T* gu, T* gn, T* gv, T* gW_partial, T* gcf,
                    T* grf) {
  const int64_t taps = f.s.th * f.s.tw * f.s.p * f.s.c;
  at::parallel_for(0, f.batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(f.K), gbuf(f.K), gph(f.R);
    for (int64_t b = b0; b < b1; ++b) {
      const T* c = cf + b * f.R;
      const T* r = rf + b * f.R;
      T* out_c = gcf + b * f.R;
      T* out_r = grf + b * f.R;
      for (int64_t i = 0; i < f.rows_m; ++i) {
        const int64_t n = b * f.rows_m + i;
        const T g = G[n];
        const T* a = A + b * sa + i * f.K;
        bounds_rows::forward_row<T, kAll>(f.K, a, v.l(b), v.u(b), v.n(b), v.v(b), buf.data());
        const T* ph = phases + n * f.R;
        for (int64_t k = 0; k < f.R; ++k) {
          const T sign = T(ph[k] > T(0)) - T(ph[k] < T(0));
          gph[k] = g * (c[k] - r[k] * sign);
          out_c[k] += g * ph[k];
          out_r[k] -= g * std::abs(ph[k]);
        }
        phase_row_backward<T>(f.s, gph.data(), buf.data(), W, gbuf.data(), gW_partial + b * taps);
        bounds_rows::backward_row<T, kAll>(0, f.K, g, a, gbuf.data(), v.l(b), v.u(b), v.n(b),
                                           v.v(b), gA + n * f.K, gl + b * f.K, gu + b * f.K,
                                           gn + b * f.K, gv + b * f.K);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> relu_phase_lower_cpu(
    const at::Tensor& A_, const at::Tensor& slope_l, const at::Tensor& slope_u,
    const at::Tensor& v_neg, const c10::optional<at::Tensor>& v_all, const at::Tensor& taps,
    const at::Tensor& c_frame, const at::Tensor& r_frame, int64_t h, int64_t w) {
  bounds_rows::check_lines("relu_phase_lower", A_, slope_l, slope_u, v_neg, v_all);
  const Fused f = check_fused(A_, taps, c_frame, r_frame, h, w);
  const at::Tensor A = bounds_rows::rows_contiguous(A_), cf = c_frame.contiguous(),
                   rf = r_frame.contiguous(), W = taps_by_position(taps);
  const bounds_rows::LineVectors vectors(slope_l, slope_u, v_neg, v_all);
  at::Tensor lower = at::empty({f.batch, f.rows_m}, A.options());
  at::Tensor phases = at::empty({f.batch, f.rows_m, f.R}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "relu_phase_lower_cpu", [&] {
    auto kernel =
        vectors.has_all() ? fused_forward<scalar_t, true> : fused_forward<scalar_t, false>;
    kernel(f, A.data_ptr<scalar_t>(), bounds_rows::batch_stride(A), vectors.rows<scalar_t>(),
           W.data_ptr<scalar_t>(), cf.data_ptr<scalar_t>(), rf.data_ptr<scalar_t>(),
           lower.data_ptr<scalar_t>(), phases.data_ptr<scalar_t>());
  });
  return {lower, phases};
}

std::vector<at::Tensor> relu_phase_lower_backward_cpu(
    const at::Tensor& grad_, const at::Tensor& A_, const at::Tensor& slope_l,
    const at::Tensor& slope_u, const at::Tensor& v_neg, const c10::optional<at::Tensor>& v_all,
    const at::Tensor& taps, const at::Tensor& c_frame, const at::Tensor& r_frame,
    const at::Tensor& phases_, int64_t h, int64_t w) {
  bounds_rows::check_lines("relu_phase_lower_backward", A_, slope_l, slope_u, v_neg, v_all);
  const Fused f = check_fused(A_, taps, c_frame, r_frame, h, w);
  TORCH_CHECK(grad_.sizes() == at::IntArrayRef({f.batch, f.rows_m}),
              "torch_dlt::relu_phase_lower_backward: grad must be [B, m], got ", grad_.sizes());
  const at::Tensor G = grad_.contiguous(), A = bounds_rows::rows_contiguous(A_),
                   cf = c_frame.contiguous(), rf = r_frame.contiguous(),
                   ph = phases_.contiguous(), W = taps_by_position(taps);
  const bounds_rows::LineVectors vectors(slope_l, slope_u, v_neg, v_all);
  auto opts = A.options();
  at::Tensor gA = at::empty({f.batch, f.rows_m, f.K}, opts);
  at::Tensor gl = at::zeros({f.batch, f.K}, opts), gu = at::zeros({f.batch, f.K}, opts);
  at::Tensor gn = at::zeros({f.batch, f.K}, opts), gv = at::zeros({f.batch, f.K}, opts);
  at::Tensor gcf = at::zeros({f.batch, f.R}, opts), grf = at::zeros({f.batch, f.R}, opts);
  // one grad_taps partial sum per example, added in a fixed order: deterministic
  at::Tensor partial = at::zeros({f.batch, f.s.th, f.s.tw, f.s.p, f.s.c}, opts);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "relu_phase_lower_backward_cpu", [&] {
    auto kernel =
        vectors.has_all() ? fused_backward<scalar_t, true> : fused_backward<scalar_t, false>;
    kernel(f, G.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), bounds_rows::batch_stride(A),
           vectors.rows<scalar_t>(), W.data_ptr<scalar_t>(), cf.data_ptr<scalar_t>(),
           rf.data_ptr<scalar_t>(), ph.data_ptr<scalar_t>(), gA.data_ptr<scalar_t>(),
           gl.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), gn.data_ptr<scalar_t>(),
           gv.data_ptr<scalar_t>(), partial.data_ptr<scalar_t>(), gcf.data_ptr<scalar_t>(),
           grf.data_ptr<scalar_t>());
  });
  at::Tensor grad_taps = partial.sum(0).permute({2, 3, 0, 1}).contiguous();
  return {gA, gl, gu, gn, gv, grad_taps, gcf, grf};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CPU, m) {
  m.impl("phase_conv", &phase_conv_cpu);
  m.impl("phase_conv_backward", &phase_conv_backward_cpu);
  m.impl("relu_phase_lower", &relu_phase_lower_cpu);
  m.impl("relu_phase_lower_backward", &relu_phase_lower_backward_cpu);
}

}  // namespace torch_dlt
