// CPU passes of the fused Linear+ReLU, shared by the linear_relu op (linear_relu.cpp) and the fused
// training step (train_step.cpp): the bias+ReLU epilogue of a GEMM result and the ReLU-mask pass
// of backward that also reduces the bias grad. The formulas are those of row_math.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <type_traits>
#include <optional>

#include "../row_math.h"

namespace mnist_fast {
namespace cpu {

// Elements per parallel task below which the pass stays on the calling thread.
constexpr int64_t kGrain = 32768;

// out[i, j] = relu(out[i, j] + bias[j]) on a contiguous (rows, cols) GEMM result.
inline void bias_relu_inplace(at::Tensor& out, const std::optional<at::Tensor>& bias) {
  using row_math::bias_relu;
  const int64_t rows = out.size(0), cols = out.size(1);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "linear_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    // Two loops, so that neither tests for the bias per element (and both vectorize).
    auto epilogue = [&](auto bias_of) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          scalar_t* row = o + i * cols;
          for (int64_t j = 0; j < cols; ++j) {
            row[j] = static_cast<scalar_t>(bias_relu(static_cast<acc_t>(row[j]), bias_of(j)));
          }
        }
      });
    };
    if (bp) {
      epilogue([bp](int64_t j) { return static_cast<acc_t>(bp[j]); });
    } else {
      epilogue([](int64_t) { return acc_t(0); });
    }
  });
}

// Columns per task of the masking pass: each task owns a column range across all rows, so the
// bias grad of a column is summed by one thread in row order (deterministic for any thread count).
constexpr int64_t kColumnsPerTask = 64;

// grad_pre = grad_output * (output > 0), and bias_grad = grad_pre summed over rows if requested.
// grad_output may have any strides (a stride-0 grad from .sum().backward() included), and may be
// grad_pre itself (the pass is elementwise, so it can run in place).
inline void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre,
                      at::Tensor& grad_bias) {
  using row_math::relu_grad;
  const int64_t rows = output.size(0), cols = output.size(1);
  const int64_t gs0 = grad_output.stride(0), gs1 = grad_output.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "linear_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_output.data_ptr<scalar_t>();
    const scalar_t* y = output.data_ptr<scalar_t>();
    scalar_t* gp = grad_pre.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr;
    const int64_t tasks = (cols + kColumnsPerTask - 1) / kColumnsPerTask;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, rows * kColumnsPerTask));
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      acc_t acc[kColumnsPerTask];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * kColumnsPerTask, width = std::min(cols, c0 + kColumnsPerTask) - c0;
        std::fill(acc, acc + width, acc_t(0));
        // The same pass for a grad with unit column stride (the usual case, which vectorizes)
        // and for any other stride.
        auto rows_pass = [&](auto column_stride) {
          for (int64_t i = 0; i < rows; ++i) {
            const scalar_t* grow = g + i * gs0 + c0 * column_stride;
            const scalar_t* yrow = y + i * cols + c0;
            scalar_t* prow = gp + i * cols + c0;
            for (int64_t j = 0; j < width; ++j) {
              const acc_t v = relu_grad(static_cast<acc_t>(grow[j * column_stride]), static_cast<acc_t>(yrow[j]));
              prow[j] = static_cast<scalar_t>(v);
              acc[j] += v;
            }
          }
        };
        if (gs1 == 1) {
          rows_pass(std::integral_constant<int64_t, 1>());
        } else {
          rows_pass(gs1);
        }
        if (gb) {
          for (int64_t j = 0; j < width; ++j) gb[c0 + j] = static_cast<scalar_t>(acc[j]);
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace mnist_fast
