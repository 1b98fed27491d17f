// Fused Linear+ReLU on the CPU.
//
// Forward: the GEMM goes to ATen (MKL/oneDNN); bias add and ReLU are one pass over its output.
// Backward: one pass masks the incoming grad by the saved ReLU output and reduces the bias grad,
// then the two GEMMs run on the masked grad; a GEMM whose result is not needed is skipped.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../checks.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {
namespace {

using cpu::bias_relu_inplace;
using cpu::mask_grad;

// A (*, features) tensor as a (rows, features) matrix; reshape({-1, 0}) would be ambiguous.
at::Tensor as_matrix(const at::Tensor& t) {
  const auto sizes = t.sizes();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows *= sizes[d];
  return t.reshape({rows, sizes.back()});
}

at::Tensor linear_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_relu_args(input, weight, bias);
  auto out = at::mm(as_matrix(input), weight.t());
  bias_relu_inplace(out, bias);
  auto shape = input.sizes().vec();
  shape.back() = weight.size(0);
  return out.view(shape);
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
