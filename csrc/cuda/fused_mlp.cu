// A whole MLP as one op on CUDA: the kernels of fused_mlp_impl.h (cuBLAS GEMMs through ATen) with
// the bias+ReLU epilogue and ReLU-mask kernels of linear_relu.cu.
#include <torch/library.h>

#include "../fused_mlp_impl.h"
#include "kernels.cuh"

namespace mnist_fast {

TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m) {
  constexpr auto forward = &fused_mlp_forward_impl<cuda::bias_relu_inplace, aten_log_softmax_inplace>;
  constexpr auto backward = &fused_mlp_backward_impl<cuda::mask_grad, aten_log_softmax_backward>;
  m.impl("fused_mlp_forward", TORCH_FN(forward));
  m.impl("_fused_mlp_backward", TORCH_FN(backward));
}

}  // namespace mnist_fast
