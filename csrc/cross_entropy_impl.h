// The host side of cross_entropy_forward and _cross_entropy_backward that is the same on every
// backend: the argument checks, the device guard, a contiguous input and the outputs. Each backend
// registers cross_entropy_forward_impl<Backend> and cross_entropy_backward_impl<Backend>, where
// Backend has
//   static void forward(const CrossEntropyCall&, at::Tensor& loss, at::Tensor& stats);
//   static void backward(const CrossEntropyCall&, const at::Tensor& grad_loss, const at::Tensor& stats,
//                        at::Tensor& grad_input, at::Tensor& grad_target);
// filling the outputs allocated here (backward is called only when a gradient is asked for; an
// undefined grad_input or grad_target is not asked for). A backend that registers
// cross_entropy_forward_backward_impl<Backend> (the CPU) also has
//   static void forward_backward(const CrossEntropyCall&, at::Tensor& loss, at::Tensor& stats,
//                                at::Tensor* grad_input);
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"

namespace mnist_fast {

// One call's arguments after the checks; input is contiguous, (N, C).
struct CrossEntropyCall {
  at::Tensor input;
  const at::Tensor& target;
  TargetKind kind;
  const std::optional<at::Tensor>& weight;
  int64_t reduction;
  int64_t ignore_index;
  double label_smoothing;
};

// The forward ops' common part: checks, guard, a contiguous input, the loss and stats outputs, and,
// kWithGrad, the input's gradient for an incoming grad of 1 (per row for reduction 'none').
template <typename Backend, bool kWithGrad>
auto cross_entropy_forward_outputs(const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                                   double label_smoothing) {
  const auto kind = check_cross_entropy_args(input, target, weight, reduction, ignore_index, label_smoothing);
  // After the checks, so that an input on the wrong device gets their message.
  const c10::OptionalDeviceGuard guard(input.device());
  const CrossEntropyCall call{input.contiguous(), target, kind, weight, reduction, ignore_index, label_smoothing};
  const int64_t rows = input.size(0);
  auto loss = reduction == row_math::kNone ? at::empty({rows}, input.options()) : at::empty({}, input.options());
  auto stats = at::empty({rows, row_math::kRowStats}, input.options().dtype(logsumexp_dtype(input.scalar_type())));
  if constexpr (kWithGrad) {
    auto grad_input = at::empty_like(call.input);
    Backend::forward_backward(call, loss, stats, &grad_input);
    return std::tuple<at::Tensor, at::Tensor, at::Tensor>{loss, stats, grad_input};
  } else {
    Backend::forward(call, loss, stats);
    return std::tuple<at::Tensor, at::Tensor>{loss, stats};
  }
}

// Returns (loss, the per-row stats that backward reads).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_impl(const at::Tensor& input, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              int64_t reduction, int64_t ignore_index,
                                                              double label_smoothing) {
  return cross_entropy_forward_outputs<Backend, false>(input, target, weight, reduction, ignore_index, label_smoothing);
}

// Returns (loss, stats, the gradient of the loss with respect to input for an incoming grad of 1,
// per row for reduction 'none'). Backend has forward_backward(call, loss, stats, &grad_input).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  return cross_entropy_forward_outputs<Backend, true>(input, target, weight, reduction, ignore_index, label_smoothing);
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> cross_entropy_backward_impl(const at::Tensor& grad_loss, const at::Tensor& input,
                                                               const at::Tensor& target,
                                                               const std::optional<at::Tensor>& weight,
                                                               const at::Tensor& stats, int64_t reduction,
                                                               int64_t ignore_index, double label_smoothing,
                                                               std::array<bool, 2> output_mask) {
  const auto kind = check_cross_entropy_backward_args(grad_loss, input, target, weight, stats, reduction,
                                                      ignore_index, label_smoothing);
  TORCH_CHECK(!output_mask[1] || kind == TargetKind::Probability,
              "mnist_fast.cross_entropy_backward: class-index targets have no gradient");
  const c10::OptionalDeviceGuard guard(input.device());
  const CrossEntropyCall call{input.contiguous(), target, kind, weight, reduction, ignore_index, label_smoothing};
  at::Tensor grad_input = output_mask[0] ? at::empty_like(call.input) : at::Tensor();
  at::Tensor grad_target = output_mask[1] ? at::empty_like(call.input) : at::Tensor();
  if (output_mask[0] || output_mask[1]) Backend::backward(call, grad_loss, stats.contiguous(), grad_input, grad_target);
  return {grad_input, grad_target};
}

}  // namespace mnist_fast
