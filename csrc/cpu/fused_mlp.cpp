// A whole MLP as one op on the CPU: the orchestration of fused_mlp_impl.h (ATen GEMMs) with the
// bias+ReLU epilogue and the ReLU-mask pass of linear_relu (linear_relu_kernels.h).
#include <torch/library.h>

#include "../fused_mlp_impl.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward_cpu(const at::Tensor& input, at::TensorList weights,
                                                                     const OptionalTensorList& biases,
                                                                     bool log_softmax) {
  return fused_mlp_forward_impl(input, weights, biases, log_softmax, cpu::bias_relu_inplace);
}

std::tuple<at::Tensor, OptionalTensorList, OptionalTensorList> fused_mlp_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, at::TensorList hidden,
    const std::optional<at::Tensor>& output, const c10::List<bool>& output_mask) {
  return fused_mlp_backward_impl(grad_output, input, weights, hidden, output, output_mask, cpu::mask_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("fused_mlp_forward", TORCH_FN(fused_mlp_forward_cpu));
  m.impl("_fused_mlp_backward", TORCH_FN(fused_mlp_backward_cpu));
}

}  // namespace mnist_fast
