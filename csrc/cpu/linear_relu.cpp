// Fused Linear+ReLU on the CPU.
//
// Forward: the GEMM goes to ATen (MKL/oneDNN); bias add and ReLU are one pass over its output.
// Backward: one pass masks the incoming grad by the saved ReLU output and reduces the bias grad,
// then the two GEMMs run on the masked grad; a GEMM whose result is not needed is skipped.
// The orchestration is shared with CUDA (linear_relu_impl.h); the passes are in linear_relu_kernels.h.
#include <torch/library.h>

#include "../linear_relu_impl.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {
namespace {

at::Tensor linear_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return linear_relu_forward_impl(input, weight, bias, cpu::bias_relu_inplace);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(const at::Tensor& grad_output,
                                                                        const at::Tensor& input,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& output,
                                                                        std::array<bool, 3> output_mask) {
  return linear_relu_backward_impl(grad_output, input, weight, output, output_mask, cpu::mask_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("linear_relu", TORCH_FN(linear_relu_cpu));
  m.impl("_linear_relu_backward", TORCH_FN(linear_relu_backward_cpu));
}

}  // namespace mnist_fast
