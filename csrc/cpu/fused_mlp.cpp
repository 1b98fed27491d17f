// A whole MLP as one op on the CPU: the kernels of fused_mlp_impl.h (ATen GEMMs) with the
// bias+ReLU epilogue and the ReLU-mask pass of linear_relu (linear_relu_kernels.h) and the CPU
// log-softmax (log_softmax_kernels.h).
#include <torch/library.h>

#include "../fused_mlp_impl.h"
#include "linear_relu_kernels.h"
#include "log_softmax_kernels.h"

namespace mnist_fast {

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  constexpr auto forward = &fused_mlp_forward_impl<cpu::bias_relu_inplace, cpu::log_softmax_inplace>;
  constexpr auto backward = &fused_mlp_backward_impl<cpu::mask_grad, cpu::log_softmax_backward>;
  m.impl("fused_mlp_forward", TORCH_FN(forward));
  m.impl("_fused_mlp_backward", TORCH_FN(backward));
}

}  // namespace mnist_fast
