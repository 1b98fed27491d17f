// One SGD training step of an MLP on CUDA: train_step_impl.h's sequential passes with
// the GEMMs in ATen (cuBLAS), linear_relu's epilogue and mask kernels, the loss pass built on the
// cross-entropy row kernels (kernels.cuh), and an SGD kernel applying row_math.h's update, all on
// the current stream.
//
// Status: compiled here (no GPU on these machines) and run under the CUDA emulator of
// tests/test_cuda_emulated.py against the CPU kernel.
//
// Class indices are validated on the host before anything is written: this costs one
// device-to-host copy of two counters per step (the price of an IndexError instead of a device
// assert), and gives the host the denominator of the mean.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <algorithm>

#include "../train_step_impl.h"
#include "kernels.cuh"

namespace mnist_fast {
namespace {

using namespace row_math;
constexpr const char* kOp = "mnist_fast.train_step_sgd";
constexpr int kSgdThreads = 256;

template <typename scalar_t>
__global__ void sgd_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
                           int64_t n, SgdOptions<at::opmath_type<scalar_t>> o) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const acc_t pk = static_cast<acc_t>(p[k]);
    const acc_t gk = sgd_decayed_grad(static_cast<acc_t>(g[k]), pk, o);
    acc_t d = gk;
    if (buf != nullptr) {
      const acc_t b = sgd_momentum_buffer(o.first_step ? acc_t(0) : static_cast<acc_t>(buf[k]), gk, o);
      buf[k] = static_cast<scalar_t>(b);
      d = sgd_direction(gk, b, o);
    }
    p[k] = static_cast<scalar_t>(sgd_param(pk, d, o));
  }
}

// The CUDA kernels of train_step_impl.h.
struct CudaStepKernels {
  static int64_t valid_rows(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
    const auto used = target.ne(ignore_index);
    const auto bad = used.logical_and(target.lt(0).logical_or(target.ge(classes)));
    const auto counts = at::stack({bad.sum(), used.sum()}).cpu();
    const int64_t* c = counts.const_data_ptr<int64_t>();
    if (c[0] > 0) {
      const int64_t row = at::nonzero(bad).select(1, 0)[0].item<int64_t>();
      const int64_t value = target[row].item<int64_t>();
      TORCH_CHECK_INDEX(false, kOp, ": Target ", value, " is out of bounds for ", classes, " classes (row ", row,
                        ").");
    }
    return c[1];
  }

  static void bias_relu_inplace(at::Tensor& z, const at::Tensor& bias) {
    cuda::bias_relu_inplace(z, bias);
  }

  static void loss_and_logit_grad(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                                  int64_t valid_rows, int64_t ignore_index, double label_smoothing,
                                  at::Tensor& grad_bias, at::Tensor& loss, at::Tensor& correct) {
    cuda::train_step_loss(logits, bias, target, valid_rows, ignore_index, label_smoothing, grad_bias, loss, correct);
  }

  static void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre,
                        at::Tensor& grad_bias) {
    cuda::mask_grad(grad_output, output, grad_pre, grad_bias);
  }

  static void sgd_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& buffer, const SgdArgs& a) {
    const int64_t n = param.numel();
    if (n == 0) return;  // a grid of 0 blocks is a launch error
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(n, kSgdThreads), 65535));
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "train_step_sgd_cuda", [&] {
      const SgdOptions<at::opmath_type<scalar_t>> o(a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov,
                                                    a.first_step);
      sgd_kernel<scalar_t><<<blocks, kSgdThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          param.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
          buffer.defined() ? buffer.data_ptr<scalar_t>() : nullptr, n, o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_impl<train_step<CudaStepKernels>>));
  m.impl("train_step_grads", TORCH_FN(train_step_grads_impl<train_step<CudaStepKernels>>));
}

}  // namespace mnist_fast
