// A whole MLP as one op, the same on every backend: argument checks, the device guard, the GEMMs
// through ATen (MKL/oneDNN, cuBLAS) and the order of the passes. Each backend registers these
// kernels with the passes it writes by hand: the two linear_relu uses, the bias+ReLU epilogue of a
// GEMM and the ReLU-mask pass that also reduces the bias grad, and the final log-softmax forward
// and backward (ATen's, aten_log_softmax_*, where a backend has none of its own), e.g.
// fused_mlp_forward_impl<cpu::bias_relu_inplace, cpu::log_softmax_inplace>.
//
// Layers l = 0..L-1, A_{-1} = input (as a (rows, in_features) matrix):
//   hidden  A_l = relu(A_{l-1} W_l^T + b_l)          for l < L-1 (saved for backward)
//   last    Z = A_{L-2} W^T + b, Y = Z or log_softmax(Z) over the features (saved when log-softmax)
// Backward, from dY: dZ = dY or the log-softmax backward from Y; then per layer, top down,
//   grad W_l = dZ_l^T A_{l-1}, dA_{l-1} = dZ_l W_l, dZ_{l-1} = dA_{l-1} * (A_{l-1} > 0) with the bias
//   grad of layer l-1 reduced in the same pass. Layers below the lowest one whose gradient is asked
//   for are not visited.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_log_softmax.h>
#include <ATen/ops/_log_softmax_backward_data.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "linear_relu_impl.h"
#include "ops.h"

namespace mnist_fast {

// n absent tensors.
inline OptionalTensorList none_list(size_t n) {
  return OptionalTensorList(std::vector<std::optional<at::Tensor>>(n));
}

inline at::Tensor bias_of(const OptionalTensorList& biases, size_t l) {
  const std::optional<at::Tensor> b = biases.get(l);
  return b.has_value() ? *b : at::Tensor();
}

// ---- checks ----

// weights[l] (out_l, in_l) must chain from input's last dimension; biases has one entry per layer,
// each absent or of shape (out_l,); everything has input's dtype and device.
inline void check_fused_mlp_args(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
                                 const char* op = "mnist_fast.fused_mlp") {
  check_float(input, op, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": expected input of shape (*, in_features), got a 0-d tensor");
  TORCH_CHECK_VALUE(!weights.empty(), op, ": expected at least one layer, got no weights");
  TORCH_CHECK_VALUE(biases.size() == weights.size(), op, ": expected one bias entry (a tensor or None) per layer: ",
                    weights.size(), " weights but ", biases.size(), " biases");
  int64_t features = input.size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const auto& w = weights[l];
    check_same_kind(input, "input", w, "every weight", op);
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": expected weight ", l, " of shape (out_features, in_features), got shape ",
                      w.sizes());
    TORCH_CHECK_VALUE(w.size(1) == features, op, ": layer ", l, " expects ", w.size(1), " input features but ",
                      l == 0 ? "the input has " : "the previous layer gives ", features, " (",
                      l == 0 ? "input shape " : "previous weight shape ", l == 0 ? input.sizes() : weights[l - 1].sizes(),
                      ", weight ", l, " shape ", w.sizes(), ")");
    const at::Tensor b = bias_of(biases, l);
    if (b.defined()) {
      check_same_kind(input, "input", b, "every bias", op);
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, ": expected bias ", l, " of shape (", w.size(0),
                        ",), got shape ", b.sizes());
    }
    features = w.size(0);
  }
}

// The backward op gets what the forward saved: hidden[l] (rows, out_l) for l < L-1, and the
// log-softmax output when the forward ended in one. output_mask: [input, W_0, b_0, ..., W_{L-1}, b_{L-1}].
inline void check_fused_mlp_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                          at::TensorList weights, at::TensorList hidden,
                                          const std::optional<at::Tensor>& output,
                                          const c10::List<bool>& output_mask) {
  constexpr const char* op = "mnist_fast._fused_mlp_backward";
  check_fused_mlp_args(input, weights, none_list(weights.size()), op);
  const size_t layers = weights.size();
  TORCH_CHECK_VALUE(output_mask.size() == 1 + 2 * layers, op, ": expected an output_mask of ", 1 + 2 * layers,
                    " entries [input, weight_0, bias_0, ...], got ", output_mask.size());
  TORCH_CHECK_VALUE(hidden.size() + 1 == layers, op, ": expected ", layers - 1, " hidden activations, got ",
                    hidden.size());
  const auto sizes = input.sizes();
  const int64_t rows = c10::multiply_integers(sizes.begin(), sizes.end() - 1);
  for (size_t l = 0; l + 1 < layers; ++l) {
    check_same_kind(input, "input", hidden[l], "every hidden activation", op);
    TORCH_CHECK_VALUE(hidden[l].dim() == 2 && hidden[l].size(0) == rows && hidden[l].size(1) == weights[l].size(0),
                      op, ": expected hidden activation ", l, " of shape (", rows, ", ", weights[l].size(0),
                      "), got ", hidden[l].sizes());
  }
  auto expected = input.sizes().vec();
  expected.back() = weights.back().size(0);
  check_same_kind(input, "input", grad_output, "grad_output", op);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), op, ": expected grad_output of shape ",
                    at::IntArrayRef(expected), ", got ", grad_output.sizes());
  if (output.has_value() && output->defined()) {
    check_same_kind(input, "input", *output, "output", op);
    TORCH_CHECK_VALUE(output->sizes() == at::IntArrayRef(expected), op, ": expected output of shape ",
                      at::IntArrayRef(expected), ", got ", output->sizes());
  }
}

// ---- ATen's log-softmax, for backends without their own ----

inline void aten_log_softmax_inplace(at::Tensor& z) {
  z = at::_log_softmax(z, 1, /*half_to_float=*/false);
}

inline at::Tensor aten_log_softmax_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  return at::_log_softmax_backward_data(grad_output.contiguous(), output, 1, output.scalar_type());
}

// ---- forward ----

// Returns (output, hidden activations).
template <auto bias_relu_inplace, auto log_softmax_inplace>
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward_impl(const at::Tensor& input,
                                                                      at::TensorList weights,
                                                                      const OptionalTensorList& biases,
                                                                      bool log_softmax) {
  check_fused_mlp_args(input, weights, biases);
  // After the checks, so that an input on the wrong device gets their message.
  const c10::OptionalDeviceGuard guard(input.device());
  const size_t layers = weights.size();
  std::vector<at::Tensor> hidden;
  hidden.reserve(layers - 1);
  at::Tensor a = as_matrix(input);
  for (size_t l = 0; l + 1 < layers; ++l) {
    auto z = at::mm(a, weights[l].t());
    bias_relu_inplace(z, biases.get(l));
    hidden.push_back(z);
    a = z;
  }
  const at::Tensor b = bias_of(biases, layers - 1);
  at::Tensor out = b.defined() ? at::addmm(b, a, weights.back().t()) : at::mm(a, weights.back().t());
  if (log_softmax) log_softmax_inplace(out);
  auto shape = input.sizes().vec();
  shape.back() = weights.back().size(0);
  return {out.view(shape), std::move(hidden)};
}

// ---- backward ----

// mask_grad(grad, activation, grad_pre, grad_bias): grad_pre = grad * (activation > 0), and its
// column sums into grad_bias when that is defined (linear_relu's backward pass).
template <auto mask_grad, auto log_softmax_backward>
std::tuple<at::Tensor, OptionalTensorList, OptionalTensorList> fused_mlp_backward_impl(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, at::TensorList hidden,
    const std::optional<at::Tensor>& output, const c10::List<bool>& output_mask) {
  check_fused_mlp_backward_args(grad_output, input, weights, hidden, output, output_mask);
  const c10::OptionalDeviceGuard guard(input.device());
  const size_t layers = weights.size();
  auto wants_weight = [&](size_t l) { return output_mask.get(1 + 2 * l); };
  auto wants_bias = [&](size_t l) { return output_mask.get(2 + 2 * l); };
  at::Tensor grad_input;
  OptionalTensorList grad_weights = none_list(layers);
  OptionalTensorList grad_biases = none_list(layers);
  // The lowest layer backward has to reach; `layers` when nothing is asked for.
  size_t first = layers;
  if (output_mask.get(0)) {
    first = 0;
  } else {
    for (size_t l = 0; l < layers && first == layers; ++l) {
      if (wants_weight(l) || wants_bias(l)) first = l;
    }
  }
  if (first == layers) return {grad_input, grad_weights, grad_biases};

  const at::Tensor x = as_matrix(input);
  // dZ of the last layer: dY (any strides, mm and sum take them), or through the log-softmax.
  at::Tensor dz = as_matrix(grad_output);
  if (output.has_value() && output->defined()) {
    dz = log_softmax_backward(dz, as_matrix(*output).contiguous());
  }
  if (wants_bias(layers - 1)) grad_biases.set(layers - 1, at::sum(dz, 0));
  for (size_t l = layers; l-- > first;) {
    const at::Tensor& below = l == 0 ? x : hidden[l - 1];
    if (wants_weight(l)) grad_weights.set(l, at::mm(dz.t(), below));
    if (l == first && !(l == 0 && output_mask.get(0))) break;
    at::Tensor grad_below = at::mm(dz, weights[l]);
    if (l == 0) {
      grad_input = grad_below.view(input.sizes());
      break;
    }
    const at::Tensor activation = hidden[l - 1].contiguous();
    at::Tensor grad_bias = wants_bias(l - 1) ? at::empty({activation.size(1)}, activation.options()) : at::Tensor();
    // In place: grad_below is this op's own, and a second (rows, features) buffer alive next to it
    // and the saved activations made the step's peak memory 1.35x stock's at batch 1024.
    mask_grad(grad_below, activation, grad_below, grad_bias);
    if (grad_bias.defined()) grad_biases.set(l - 1, grad_bias);
    dz = grad_below;
  }
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace mnist_fast
