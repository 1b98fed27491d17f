// Fused Linear+ReLU on the CPU.
//
// Forward: the GEMM goes to ATen (MKL/oneDNN); bias add and ReLU are one pass over its output.
// Backward: one pass masks the incoming grad by the saved ReLU output and reduces the bias grad,
// then the two GEMMs run on the masked grad; a GEMM whose result is not needed is skipped.
// The kernels are shared with CUDA (linear_relu_impl.h); the passes are in linear_relu_kernels.h.
#include <torch/library.h>

#include "../linear_relu_impl.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("linear_relu", TORCH_FN(linear_relu_forward_impl<cpu::bias_relu_inplace>));
  m.impl("_linear_relu_backward", TORCH_FN(linear_relu_backward_impl<cpu::mask_grad>));
}

}  // namespace mnist_fast
