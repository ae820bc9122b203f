// CUDA kernel of torch_dlt::moments.
//
// x is viewed as [outer, reduce, inner]. Each thread runs a Welford/Terriberry update over its
// share of a column; the per-thread states are merged exactly (csrc/moments.h) inside the block,
// and, when a column is split over several blocks, by a last small kernel.
//  * inner == 1 (each column contiguous): one block per (column, chunk), threads stride the rows.
//  * inner > 1: a 32-wide tile of adjacent columns per block, so reads coalesce across a warp;
//    the 8 thread rows of the block interleave over the rows of the chunk.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "moments.h"

namespace torch_dlt {
namespace {

constexpr int kContiguousThreads = 256;
constexpr int kTileX = 32;
constexpr int kTileY = 8;

template <typename acc_t>
__device__ inline void store_state(acc_t* dst, const MomentState<acc_t>& s) {
  dst[0] = s.n;
  dst[1] = s.mean;
  dst[2] = s.m2;
  dst[3] = s.m3;
  dst[4] = s.m4;
}

template <typename acc_t>
__device__ inline MomentState<acc_t> load_state(const acc_t* src) {
  return {src[0], src[1], src[2], src[3], src[4]};
}

template <typename acc_t>
__device__ inline MomentState<acc_t> shfl_down(const MomentState<acc_t>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.n, offset), __shfl_down_sync(0xffffffffu, s.mean, offset),
          __shfl_down_sync(0xffffffffu, s.m2, offset), __shfl_down_sync(0xffffffffu, s.m3, offset),
          __shfl_down_sync(0xffffffffu, s.m4, offset)};
}

// partial: [columns, chunks, 5]
template <typename scalar_t, typename acc_t>
__global__ void contiguous_kernel(const scalar_t* __restrict__ x, int64_t columns, int64_t reduce,
                                  int64_t chunks, int64_t rows_per_chunk,
                                  acc_t* __restrict__ partial) {
  const int64_t column = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = min(reduce, r0 + rows_per_chunk);
  const scalar_t* col = x + column * reduce;
  MomentState<acc_t> s = empty_state<acc_t>();
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    push(s, static_cast<acc_t>(col[r]));
  }
  for (int offset = 16; offset > 0; offset /= 2) s = merge(s, shfl_down(s, offset));
  __shared__ MomentState<acc_t> warp_states[kContiguousThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    MomentState<acc_t> total = empty_state<acc_t>();
    for (int w = 0; w < kContiguousThreads / 32; ++w) total = merge(total, warp_states[w]);
    store_state(partial + (column * chunks + chunk) * 5, total);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void interleaved_kernel(const scalar_t* __restrict__ x, int64_t outer, int64_t reduce,
                                   int64_t inner, int64_t tiles, int64_t chunks,
                                   int64_t rows_per_chunk, acc_t* __restrict__ partial) {
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t tile = (blockIdx.x / chunks) % tiles;
  const int64_t o = blockIdx.x / (chunks * tiles);
  const int64_t j = tile * kTileX + threadIdx.x;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = min(reduce, r0 + rows_per_chunk);
  MomentState<acc_t> s = empty_state<acc_t>();
  if (j < inner) {
    const scalar_t* base = x + o * reduce * inner + j;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileY) {
      push(s, static_cast<acc_t>(base[r * inner]));
    }
  }
  __shared__ MomentState<acc_t> states[kTileY][kTileX];
  states[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < inner) {
    for (int y = 1; y < kTileY; ++y) s = merge(s, states[y][threadIdx.x]);
    store_state(partial + ((o * inner + j) * chunks + chunk) * 5, s);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void finalize_kernel(const acc_t* __restrict__ partial, int64_t columns, int64_t chunks,
                                scalar_t* __restrict__ mean, scalar_t* __restrict__ var,
                                scalar_t* __restrict__ kurt) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= columns) return;
  MomentState<acc_t> s = empty_state<acc_t>();
  for (int64_t k = 0; k < chunks; ++k) s = merge(s, load_state(partial + (c * chunks + k) * 5));
  acc_t m, v, q;
  finalize(s, &m, &v, &q);
  mean[c] = static_cast<scalar_t>(m);
  var[c] = static_cast<scalar_t>(v);
  kurt[c] = static_cast<scalar_t>(q);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> moments_cuda(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.is_cuda(), "torch_dlt::moments (CUDA kernel): x is on ", x.device());
  const ReductionShape shape = check_moments_input(x, dim);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  auto [mean, var, kurt] = make_moments_outputs(x, dim);
  const int64_t columns = shape.outer * shape.inner;
  if (columns == 0) return {mean, var, kurt};
  const int64_t target_blocks =
      4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_dlt::moments_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    int64_t chunks;
    int64_t rows_per_chunk;
    at::Tensor partial;
    if (shape.inner == 1) {
      // Each thread should see at least 16 rows; beyond that, split to fill the GPU.
      chunks = std::clamp<int64_t>(ceil_div(target_blocks, columns), 1,
                                   std::max<int64_t>(1, shape.reduce / (16 * kContiguousThreads)));
      rows_per_chunk = ceil_div(shape.reduce, chunks);
      chunks = ceil_div(shape.reduce, rows_per_chunk);
      partial = at::empty({columns, chunks, 5}, xc.options().dtype(acc_dtype));
      contiguous_kernel<scalar_t, acc_t><<<columns * chunks, kContiguousThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), columns, shape.reduce, chunks, rows_per_chunk,
          partial.mutable_data_ptr<acc_t>());
    } else {
      const int64_t tiles = ceil_div(shape.inner, kTileX);
      chunks = std::clamp<int64_t>(ceil_div(target_blocks, shape.outer * tiles), 1,
                                   std::max<int64_t>(1, shape.reduce / (16 * kTileY)));
      rows_per_chunk = ceil_div(shape.reduce, chunks);
      chunks = ceil_div(shape.reduce, rows_per_chunk);
      partial = at::empty({columns, chunks, 5}, xc.options().dtype(acc_dtype));
      const dim3 block(kTileX, kTileY);
      interleaved_kernel<scalar_t, acc_t><<<shape.outer * tiles * chunks, block, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), shape.outer, shape.reduce, shape.inner, tiles, chunks,
          rows_per_chunk, partial.mutable_data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<scalar_t, acc_t><<<ceil_div(columns, 256), 256, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), columns, chunks, mean.mutable_data_ptr<scalar_t>(),
        var.mutable_data_ptr<scalar_t>(), kurt.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var, kurt};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_dlt, CUDA, m) { m.impl("moments", &moments_cuda); }

}  // namespace torch_dlt
