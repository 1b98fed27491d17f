// Fused Linear+ReLU on CUDA.
//
// Forward: the GEMM goes to ATen (cuBLAS); bias add and ReLU are one epilogue kernel over its
// output. Backward: one kernel masks the incoming grad by the saved ReLU output and reduces the
// bias grad, then the two GEMMs run on the masked grad; a GEMM whose result is not needed is skipped.
//
// The per-element formulas are row_math::bias_relu / relu_grad, the ones the CPU kernels use; the
// orchestration (checks, GEMMs, order of passes) is linear_relu_impl.h, shared with the CPU. The two
// passes are also the training step's (declared in kernels.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../linear_relu_impl.h"
#include "kernels.cuh"

namespace mnist_fast {
namespace {

using cuda::ceil_div;
using row_math::bias_relu;
using row_math::relu_grad;

// Both kernels walk (rows, cols) matrices in tiles of 32 columns x 8 rows: a warp covers 32
// consecutive columns of one row, so every load and store is coalesced.
constexpr int kTileCols = 32;
constexpr int kTileRows = 8;
constexpr int kTileThreads = kTileCols * kTileRows;
constexpr int64_t kMaxGridY = 65535;  // hardware limit of gridDim.y

// ---- forward epilogue ----

// Rows each thread of the epilogue handles: amortises the bias load and the index arithmetic.
constexpr int64_t kEpilogueRowsPerThread = 4;

// out[r, c] = relu(out[r, c] + bias[c]) on a contiguous (rows, cols) GEMM result; bias may be null.
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads)
    bias_relu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ bias, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t col = int64_t(blockIdx.x) * kTileCols + threadIdx.x;
  if (col >= cols) return;  // no block-wide synchronisation below
  const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[col]) : acc_t(0);
  const int64_t row_step = int64_t(gridDim.y) * kTileRows;
  for (int64_t r = int64_t(blockIdx.y) * kTileRows + threadIdx.y; r < rows; r += row_step) {
    scalar_t* p = out + r * cols + col;
    *p = static_cast<scalar_t>(bias_relu(static_cast<acc_t>(*p), b));
  }
}

// ---- backward: ReLU mask and bias grad ----

// Rows of one block of the masking kernel. The bias grad of a column is summed in a fixed order:
// each thread sums its rows of the block's chunk sequentially, the 8 threads of a column are added
// in threadIdx.y order, and the per-chunk partials in chunk order by a second kernel. The order
// depends on the shape only, so the result is the same from run to run.
constexpr int64_t kMaskRowsPerChunk = 64;

// grad_pre = relu_grad(grad_output, output); with column sums requested, either writes them as
// grad_bias (a single chunk) or as partials[chunk, col] in the accumulation type.
// grad_output may have any strides (a stride-0 grad from .sum().backward() included), and may be
// grad_pre (the training step masks in place: no __restrict__ on these two).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads)
    relu_mask_kernel(const scalar_t* grad_output, int64_t grad_stride_row, int64_t grad_stride_col,
                     const scalar_t* __restrict__ output, scalar_t* grad_pre, int64_t rows, int64_t cols,
                     int64_t rows_per_chunk, acc_t* __restrict__ partials, scalar_t* __restrict__ grad_bias) {
  const int64_t col = int64_t(blockIdx.x) * kTileCols + threadIdx.x;
  const int64_t first = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  acc_t sum = 0;
  if (col < cols) {
    for (int64_t r = first + threadIdx.y; r < last; r += kTileRows) {
      const acc_t g = static_cast<acc_t>(grad_output[r * grad_stride_row + col * grad_stride_col]);
      const acc_t v = relu_grad(g, static_cast<acc_t>(output[r * cols + col]));
      grad_pre[r * cols + col] = static_cast<scalar_t>(v);
      sum += v;
    }
  }
  if (partials == nullptr && grad_bias == nullptr) return;  // the same for every thread of the grid

  __shared__ acc_t column_sums[kTileRows][kTileCols];
  column_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  acc_t total = 0;
  for (int y = 0; y < kTileRows; ++y) total += column_sums[y][threadIdx.x];
  if (grad_bias != nullptr) {
    grad_bias[col] = static_cast<scalar_t>(total);
  } else {
    partials[int64_t(blockIdx.y) * cols + col] = total;
  }
}

// grad_bias[col] = sum over chunks of partials[chunk, col], in chunk order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads)
    sum_partials_kernel(const acc_t* __restrict__ partials, int64_t chunks, int64_t cols,
                        scalar_t* __restrict__ grad_bias) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  acc_t total = 0;
  for (int64_t k = 0; k < chunks; ++k) total += partials[k * cols + col];
  grad_bias[col] = static_cast<scalar_t>(total);
}

}  // namespace

namespace cuda {

void bias_relu_inplace(at::Tensor& out, const std::optional<at::Tensor>& bias) {
  const int64_t rows = out.size(0), cols = out.size(1);
  if (rows == 0 || cols == 0) return;  // a grid of 0 blocks is a launch error
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kTileCols)),
                  static_cast<unsigned>(std::min(ceil_div(rows, kTileRows * kEpilogueRowsPerThread), kMaxGridY)));
  const dim3 block(kTileCols, kTileRows);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "linear_relu_cuda", [&] {
    bias_relu_kernel<scalar_t><<<grid, block, 0, stream>>>(
        out.data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre, at::Tensor& grad_bias) {
  const int64_t rows = output.size(0), cols = output.size(1);
  if (cols == 0) return;
  if (rows == 0) {
    if (grad_bias.defined()) grad_bias.zero_();
    return;
  }
  // More chunks than gridDim.y allows: make each chunk longer instead.
  const int64_t rows_per_chunk = std::max(kMaskRowsPerChunk, ceil_div(rows, kMaxGridY));
  const int64_t chunks = ceil_div(rows, rows_per_chunk);
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kTileCols)), static_cast<unsigned>(chunks));
  const dim3 block(kTileCols, kTileRows);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "linear_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* bias_out = grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr;
    at::Tensor partials;
    if (bias_out != nullptr && chunks > 1) {
      partials = at::empty({chunks, cols}, output.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    relu_mask_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        grad_output.const_data_ptr<scalar_t>(), grad_output.stride(0), grad_output.stride(1),
        output.const_data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(), rows, cols, rows_per_chunk,
        partials.defined() ? partials.data_ptr<acc_t>() : nullptr, partials.defined() ? nullptr : bias_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (partials.defined()) {
      sum_partials_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(ceil_div(cols, kTileThreads)), kTileThreads, 0, stream>>>(
              partials.const_data_ptr<acc_t>(), chunks, cols, bias_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m) {
  m.impl("linear_relu", TORCH_FN(linear_relu_forward_impl<cuda::bias_relu_inplace>));
  m.impl("_linear_relu_backward", TORCH_FN(linear_relu_backward_impl<cuda::mask_grad>));
}

}  // namespace mnist_fast
