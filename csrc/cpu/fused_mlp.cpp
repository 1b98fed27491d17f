// A whole MLP as one op on the CPU: the kernels of fused_mlp_impl.h (ATen GEMMs) with the
// bias+ReLU epilogue and the ReLU-mask pass of linear_relu (linear_relu_kernels.h).
#include <torch/library.h>

#include "../fused_mlp_impl.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("fused_mlp_forward", TORCH_FN(fused_mlp_forward_impl<cpu::bias_relu_inplace>));
  m.impl("_fused_mlp_backward", TORCH_FN(fused_mlp_backward_impl<cpu::mask_grad>));
}

}  // namespace mnist_fast
