// Fused Linear+ReLU on the CPU.
//
// Forward: the GEMM goes to ATen (MKL/oneDNN); bias add and ReLU are one pass over its output.
// Backward: one pass masks the incoming grad by the saved ReLU output and reduces the bias grad,
// then the two GEMMs run on the masked grad; a GEMM whose result is not needed is skipped.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../checks.h"

namespace mnist_fast {
namespace {

using row_math::bias_relu;
using row_math::relu_grad;

// Elements per parallel task below which the pass stays on the calling thread.
constexpr int64_t kGrain = 32768;

// A (*, features) tensor as a (rows, features) matrix; reshape({-1, 0}) would be ambiguous.
at::Tensor as_matrix(const at::Tensor& t) {
  const auto sizes = t.sizes();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows *= sizes[d];
  return t.reshape({rows, sizes.back()});
}

// out[i, j] = relu(out[i, j] + bias[j]) on a contiguous (rows, cols) GEMM result.
void bias_relu_inplace(at::Tensor& out, const std::optional<at::Tensor>& bias) {
  const int64_t rows = out.size(0), cols = out.size(1);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "linear_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        scalar_t* row = o + i * cols;
        for (int64_t j = 0; j < cols; ++j) {
          row[j] = static_cast<scalar_t>(
              bias_relu(static_cast<acc_t>(row[j]), bp ? static_cast<acc_t>(bp[j]) : acc_t(0)));
        }
      }
    });
  });
}

at::Tensor linear_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_relu_args(input, weight, bias);
  auto out = at::mm(as_matrix(input), weight.t());
  bias_relu_inplace(out, bias);
  auto shape = input.sizes().vec();
  shape.back() = weight.size(0);
  return out.view(shape);
}

// Columns per task of the masking pass: each task owns a column range across all rows, so the
// bias grad of a column is summed by one thread in row order (deterministic for any thread count).
constexpr int64_t kColumnsPerTask = 64;

// grad_pre = grad_output * (output > 0), and bias_grad = grad_pre summed over rows if requested.
// grad_output may have any strides (a stride-0 grad from .sum().backward() included).
void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre, at::Tensor& grad_bias) {
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
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t* grow = g + i * gs0 + c0 * gs1;
          const scalar_t* yrow = y + i * cols + c0;
          scalar_t* prow = gp + i * cols + c0;
          for (int64_t j = 0; j < width; ++j) {
            const acc_t v = relu_grad(static_cast<acc_t>(grow[j * gs1]), static_cast<acc_t>(yrow[j]));
            prow[j] = static_cast<scalar_t>(v);
            acc[j] += v;
          }
        }
        if (gb) {
          for (int64_t j = 0; j < width; ++j) gb[c0 + j] = static_cast<scalar_t>(acc[j]);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(const at::Tensor& grad_output,
                                                                        const at::Tensor& input,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& output,
                                                                        std::array<bool, 3> output_mask) {
  check_linear_relu_backward_args(grad_output, input, weight, output);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_input, grad_weight, grad_bias};
  const int64_t out_features = weight.size(0);
  const auto output2d = as_matrix(output).contiguous();
  auto grad_pre = at::empty_like(output2d);
  if (output_mask[2]) grad_bias = at::empty({out_features}, output.options());
  mask_grad(as_matrix(grad_output), output2d, grad_pre, grad_bias);
  if (output_mask[0]) grad_input = at::mm(grad_pre, weight).view(input.sizes());
  if (output_mask[1]) grad_weight = at::mm(grad_pre.t(), as_matrix(input));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("linear_relu", TORCH_FN(linear_relu_cpu));
  m.impl("linear_relu_backward", TORCH_FN(linear_relu_backward_cpu));
}

}  // namespace mnist_fast
