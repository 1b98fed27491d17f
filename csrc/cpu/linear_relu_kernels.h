// CPU passes of the fused Linear+ReLU, shared by the linear_relu op (linear_relu.cpp) and the fused
// training step (train_step.cpp): the bias+ReLU epilogue of a GEMM result and the ReLU-mask pass
// of backward that also reduces the bias grad. The loops are the dispatched kernels of kernels/;
// this header splits the work across threads.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>

#include "kernels/kernels.h"

namespace mnist_fast {
namespace cpu {

// Elements per parallel task below which the pass stays on the calling thread.
constexpr int64_t kGrain = 32768;

// out[i, j] = relu(out[i, j] + bias[j]) on a contiguous (rows, cols) GEMM result.
inline void bias_relu_inplace(at::Tensor& out, const std::optional<at::Tensor>& bias) {
  constexpr bool relu = true;
  const int64_t rows = out.size(0), cols = out.size(1);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "linear_relu_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const auto& kernel = kernels<scalar_t>().bias_relu;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
      kernel(o + r0 * cols, bp, r1 - r0, cols, relu);
    });
  });
}

// grad_pre = grad_output * (output > 0), and bias_grad = grad_pre summed over rows if requested.
// grad_output may have any strides (a stride-0 grad from .sum().backward() included), and may be
// grad_pre itself (the pass is elementwise, so it can run in place). Each task owns kMaskColumns
// columns across all rows, so a column's bias grad is summed by one thread in row order
// (deterministic for any thread count).
inline void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre,
                      at::Tensor& grad_bias) {
  const int64_t rows = output.size(0), cols = output.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "linear_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MaskGradArgs<scalar_t> args{grad_output.data_ptr<scalar_t>(), grad_output.stride(0), grad_output.stride(1),
                                      output.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(), rows, cols};
    scalar_t* gb = grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr;
    const auto& kernel = kernels<scalar_t>().mask_grad;
    const int64_t tasks = (cols + kMaskColumns - 1) / kMaskColumns;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, rows * kMaskColumns));
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      acc_t sums[kMaskColumns];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kMaskColumns, width = std::min(cols, c0 + kMaskColumns) - c0;
        kernel(args, c0, width, gb ? sums : nullptr);
        if (gb) {
          for (int64_t j = 0; j < width; ++j) gb[c0 + j] = static_cast<scalar_t>(sums[j]);
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace mnist_fast
