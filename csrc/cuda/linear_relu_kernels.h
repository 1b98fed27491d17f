// The CUDA passes of the fused Linear+ReLU (defined in linear_relu.cu), for the other CUDA ops built
// from them (fused_mlp.cu), as cpu/linear_relu_kernels.h is for the CPU ones.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mnist_fast {
namespace cuda {

// out[i, j] = relu(out[i, j] + bias[j]) on a contiguous (rows, cols) GEMM result; bias may be absent.
void bias_relu_inplace(at::Tensor& out, const std::optional<at::Tensor>& bias);

// grad_pre = grad_output * (output > 0) (grad_output of any strides), and grad_bias = grad_pre
// summed over rows if grad_bias is defined.
void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre, at::Tensor& grad_bias);

}  // namespace cuda
}  // namespace mnist_fast
