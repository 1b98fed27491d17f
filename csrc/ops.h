// The C++ entry points of mnist_fast's operators. Each one calls the registered op through the
// dispatcher, so it reaches the right backend kernel (CPU, CUDA) and the autograd wrapper.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace mnist_fast {

// relu(input @ weight.T + bias); input (*, in_features), weight (out_features, in_features).
at::Tensor linear_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Gradients (input, weight, bias) of linear_relu given the saved output; an entry whose
// output_mask is false is returned undefined and costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& output,
                                                                    std::array<bool, 3> output_mask);

// Fused log-softmax + NLL of an (N, C) input: returns (loss, logsumexp of every row).
// reduction: 0 none, 1 mean, 2 sum. target: (N,) class indices or (N, C) probabilities.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t reduction, int64_t ignore_index,
                                                         double label_smoothing);

// Gradients (input, target) of cross_entropy_forward's loss; target's only for probability targets.
std::tuple<at::Tensor, at::Tensor> cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                                          const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& logsumexp, int64_t reduction,
                                                          int64_t ignore_index, double label_smoothing,
                                                          std::array<bool, 2> output_mask);

// The loss alone: cross_entropy_forward(...)[0].
at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing);

}  // namespace mnist_fast
