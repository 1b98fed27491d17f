// linear_relu's kernels, the same on every backend: the argument checks, the device guard, the
// GEMMs through ATen (MKL/oneDNN, cuBLAS) and the order of the passes. Each backend registers them
// with its own bias+ReLU epilogue and ReLU-mask pass, the only kernels it writes by hand, e.g.
// linear_relu_forward_impl<cpu::bias_relu_inplace>.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/accumulate.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"

namespace mnist_fast {

// A (*, features) tensor as a (rows, features) matrix; reshape({-1, 0}) would be ambiguous.
inline at::Tensor as_matrix(const at::Tensor& t) {
  const auto sizes = t.sizes();
  return t.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), sizes.back()});
}

// relu(input @ weight.T + bias): the GEMM, then bias_relu_inplace(out, bias) over its output.
template <auto bias_relu_inplace>
at::Tensor linear_relu_forward_impl(const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
  check_linear_relu_args(input, weight, bias);
  // After the checks, so that an input on the wrong device gets their message.
  const c10::OptionalDeviceGuard guard(input.device());
  auto out = at::mm(as_matrix(input), weight.t());
  bias_relu_inplace(out, bias);
  auto shape = input.sizes().vec();
  shape.back() = weight.size(0);
  return out.view(shape);
}

// mask_grad(grad_output, output, grad_pre, grad_bias) writes grad_pre = grad_output * (output > 0)
// and, when grad_bias is defined, its column sums; then the GEMMs that output_mask asks for.
template <auto mask_grad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_impl(const at::Tensor& grad_output,
                                                                         const at::Tensor& input,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& output,
                                                                         std::array<bool, 3> output_mask) {
  check_linear_relu_backward_args(grad_output, input, weight, output);
  const c10::OptionalDeviceGuard guard(input.device());
  at::Tensor grad_input, grad_weight, grad_bias;
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {grad_input, grad_weight, grad_bias};
  const auto output2d = as_matrix(output).contiguous();
  auto grad_pre = at::empty_like(output2d);
  if (output_mask[2]) grad_bias = at::empty({weight.size(0)}, output.options());
  mask_grad(as_matrix(grad_output), output2d, grad_pre, grad_bias);
  if (output_mask[0]) grad_input = at::mm(grad_pre, weight).view(input.sizes());
  if (output_mask[1]) grad_weight = at::mm(grad_pre.t(), as_matrix(input));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace mnist_fast
