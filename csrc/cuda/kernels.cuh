// The CUDA passes that more than one op launches, each defined once in its op's file: the
// Linear+ReLU epilogue and mask passes (linear_relu.cu), used by linear_relu and the training
// step, and the training step's loss pass (cross_entropy.cu), built on the cross-entropy row
// kernels. Host functions; they launch on the current stream and check every launch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace mnist_fast {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// out[r, c] = relu(out[r, c] + bias[c]) on a contiguous (rows, cols) GEMM result, in place.
void bias_relu_inplace(at::Tensor& out, const std::optional<at::Tensor>& bias);

// grad_pre = grad_output * (output > 0), and grad_bias = grad_pre summed over rows if defined.
// grad_output may have any strides, and may be grad_pre itself (in place).
void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre, at::Tensor& grad_bias);

// The loss pass of train_step_sgd on contiguous (rows, classes) logits: adds the last bias in
// place, writes the mean cross-entropy over the valid_rows rows not ignored as loss (0-d), the
// number of those rows whose argmax is the target as correct (0-d int64), and replaces the logits
// by d loss / d logits, whose column sums go to grad_bias. Targets are in range (checked before).
void train_step_loss(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target, int64_t valid_rows,
                     int64_t ignore_index, double label_smoothing, at::Tensor& grad_bias, at::Tensor& loss,
                     at::Tensor& correct);

}  // namespace cuda
}  // namespace mnist_fast
