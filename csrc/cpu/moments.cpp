// CPU kernel of torch_dlt::moments.
//
// x is viewed as [outer, reduce, inner]. Rows are consumed in small cache-resident blocks: a
// block's exact central sums are computed in two passes over the cached block, then merged into
// the running state (csrc/moments.h), so memory is read once and the result is as stable as a
// two-pass algorithm. Work is split over columns and, when there are few columns, over chunks of
// the reduced dimension whose states are merged at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "moments.h"

namespace torch_dlt {
namespace {

constexpr int64_t kBlockRows = 256;  // rows per block when a column is contiguous
constexpr int64_t kTileRows = 64;    // rows per block when columns are interleaved
constexpr int64_t kTileCols = 64;    // columns per tile when columns are interleaved

// Central sums of a block about its mean, from sums s1..s4 taken about a provisional mean mu.
template <typename acc_t>
inline MomentState<acc_t> shifted_block(acc_t n, acc_t mu, acc_t s1, acc_t s2, acc_t s3,
                                        acc_t s4) {
  const acc_t d = s1 / n;  // true mean = mu + d
  const acc_t d2 = d * d;
  MomentState<acc_t> b;
  b.n = n;
  b.mean = mu + d;
  b.m2 = s2 - n * d2;
  b.m3 = s3 - acc_t(3) * d * s2 + acc_t(2) * n * d2 * d;
  b.m4 = s4 - acc_t(4) * d * s3 + acc_t(6) * d2 * s2 - acc_t(3) * n * d2 * d2;
  return b;
}

// One contiguous column x[0..rows), rows in [r0, r1).
template <typename scalar_t, typename acc_t>
MomentState<acc_t> contiguous_column(const scalar_t* x, int64_t r0, int64_t r1) {
  MomentState<acc_t> state = empty_state<acc_t>();
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    const int64_t nb = std::min(kBlockRows, r1 - b0);
    const scalar_t* p = x + b0;
    acc_t sum = 0;
    for (int64_t i = 0; i < nb; ++i) sum += static_cast<acc_t>(p[i]);
    const acc_t mu = sum / static_cast<acc_t>(nb);
    acc_t s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    for (int64_t i = 0; i < nb; ++i) {
      const acc_t d = static_cast<acc_t>(p[i]) - mu;
      const acc_t dd = d * d;
      s1 += d;
      s2 += dd;
      s3 += dd * d;
      s4 += dd * dd;
    }
    state = merge(state, shifted_block<acc_t>(static_cast<acc_t>(nb), mu, s1, s2, s3, s4));
  }
  return state;
}

// Columns [c0, c0 + nc) of a row-major [rows, inner] slab, rows in [r0, r1).
template <typename scalar_t, typename acc_t>
void interleaved_tile(const scalar_t* x, int64_t inner, int64_t c0, int64_t nc, int64_t r0,
                      int64_t r1, MomentState<acc_t>* out) {
  acc_t mu[kTileCols], s1[kTileCols], s2[kTileCols], s3[kTileCols], s4[kTileCols];
  for (int64_t j = 0; j < nc; ++j) out[j] = empty_state<acc_t>();
  for (int64_t b0 = r0; b0 < r1; b0 += kTileRows) {
    const int64_t nb = std::min(kTileRows, r1 - b0);
    for (int64_t j = 0; j < nc; ++j) mu[j] = s1[j] = s2[j] = s3[j] = s4[j] = acc_t(0);
    for (int64_t i = 0; i < nb; ++i) {
      const scalar_t* row = x + (b0 + i) * inner + c0;
      for (int64_t j = 0; j < nc; ++j) mu[j] += static_cast<acc_t>(row[j]);
    }
    const acc_t inv = acc_t(1) / static_cast<acc_t>(nb);
    for (int64_t j = 0; j < nc; ++j) mu[j] *= inv;
    for (int64_t i = 0; i < nb; ++i) {
      const scalar_t* row = x + (b0 + i) * inner + c0;
      for (int64_t j = 0; j < nc; ++j) {
        const acc_t d = static_cast<acc_t>(row[j]) - mu[j];
        const acc_t dd = d * d;
        s1[j] += d;
        s2[j] += dd;
        s3[j] += dd * d;
        s4[j] += dd * dd;
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      out[j] = merge(out[j], shifted_block<acc_t>(static_cast<acc_t>(nb), mu[j], s1[j], s2[j],
                                                  s3[j], s4[j]));
    }
  }
}

template <typename scalar_t>
void moments_kernel(const scalar_t* x, const ReductionShape& s, scalar_t* mean, scalar_t* var,
                    scalar_t* kurt) {
  using acc_t = double;  // the block sums are cheap next to the memory traffic
  const int64_t columns = s.outer * s.inner;
  const int64_t tiles_per_outer = s.inner == 1 ? 1 : (s.inner + kTileCols - 1) / kTileCols;
  const int64_t column_tasks = s.outer * tiles_per_outer;
  // Few columns and a long reduction: split rows too, so every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t max_chunks = std::max<int64_t>(1, s.reduce / 4096);
  const int64_t chunks = std::min(max_chunks, std::max<int64_t>(1, (4 * threads) / column_tasks));
  const int64_t rows_per_chunk = (s.reduce + chunks - 1) / chunks;

  std::vector<MomentState<acc_t>> partial(static_cast<size_t>(chunks * columns));
  at::parallel_for(0, chunks * column_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / column_tasks;
      const int64_t ct = task % column_tasks;
      const int64_t o = ct / tiles_per_outer;
      const int64_t r0 = chunk * rows_per_chunk;
      const int64_t r1 = std::min(s.reduce, r0 + rows_per_chunk);
      MomentState<acc_t>* out = partial.data() + chunk * columns;
      if (r0 >= r1) {
        continue;
      }
      if (s.inner == 1) {
        out[o] = contiguous_column<scalar_t, acc_t>(x + o * s.reduce, r0, r1);
      } else {
        const int64_t c0 = (ct % tiles_per_outer) * kTileCols;
        const int64_t nc = std::min(kTileCols, s.inner - c0);
        interleaved_tile<scalar_t, acc_t>(x + o * s.reduce * s.inner, s.inner, c0, nc, r0, r1,
                                          out + o * s.inner + c0);
      }
    }
  });
  at::parallel_for(0, columns, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      MomentState<acc_t> st = empty_state<acc_t>();
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        if (chunk * rows_per_chunk < s.reduce) st = merge(st, partial[chunk * columns + c]);
      }
      acc_t m, v, k;
      finalize(st, &m, &v, &k);
      mean[c] = static_cast<scalar_t>(m);
      var[c] = static_cast<scalar_t>(v);
      kurt[c] = static_cast<scalar_t>(k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moments_cpu(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "torch_dlt::moments (CPU kernel): x is on ", x.device());
  const ReductionShape shape = check_moments_input(x, dim);
  const at::Tensor xc = x.contiguous();
  auto [mean, var, kurt] = make_moments_outputs(x, dim);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_dlt::moments", [&] {
    moments_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), shape, mean.data_ptr<scalar_t>(),
                             var.data_ptr<scalar_t>(), kurt.data_ptr<scalar_t>());
  });
  return {mean, var, kurt};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CPU, m) { m.impl("moments", &moments_cpu); }

}  // namespace torch_dlt
