// A whole MLP as one op on CUDA: the orchestration of fused_mlp_impl.h (cuBLAS GEMMs through ATen)
// with the bias+ReLU epilogue and ReLU-mask kernels of linear_relu.cu.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fused_mlp_impl.h"
#include "kernels.cuh"

namespace mnist_fast {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward_cuda(const at::Tensor& input, at::TensorList weights,
                                                                      const OptionalTensorList& biases,
                                                                      bool log_softmax) {
  const c10::cuda::CUDAGuard guard(input.device());
  return fused_mlp_forward_impl(input, weights, biases, log_softmax, cuda::bias_relu_inplace);
}

std::tuple<at::Tensor, OptionalTensorList, OptionalTensorList> fused_mlp_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, at::TensorList hidden,
    const std::optional<at::Tensor>& output, const c10::List<bool>& output_mask) {
  const c10::cuda::CUDAGuard guard(input.device());
  return fused_mlp_backward_impl(grad_output, input, weights, hidden, output, output_mask, cuda::mask_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m) {
  m.impl("fused_mlp_forward", TORCH_FN(fused_mlp_forward_cuda));
  m.impl("_fused_mlp_backward", TORCH_FN(fused_mlp_backward_cuda));
}

}  // namespace mnist_fast
