// CPU log_softmax over the features of a (rows, features) matrix and its backward from the output,
// for fused_mlp's final layer: the dispatched kernels of kernels/ (the cross-entropy's row stats),
// split across threads by rows. ATen's own log_softmax over 10 classes is several times slower on
// AVX-512 than on AVX2 (9.5 against 1.9 us forward at batch 64 on this project's Xeon).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

#include "kernels/kernels.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {
namespace cpu {

// z = log_softmax(z, dim 1) on a contiguous (rows, cols) matrix.
inline void log_softmax_inplace(at::Tensor& z) {
  const int64_t rows = z.size(0), cols = z.size(1);
  if (z.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "log_softmax_cpu", [&] {
    scalar_t* p = z.data_ptr<scalar_t>();
    const auto& kernel = kernels<scalar_t>().log_softmax;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t r0, int64_t r1) {
      kernel(p + r0 * cols, p + r0 * cols, r1 - r0, cols);
    });
  });
}

// The grad of log_softmax's input from the grad of its output and the output itself (both
// (rows, cols); output contiguous).
inline at::Tensor log_softmax_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_input = at::empty_like(output);
  const int64_t rows = output.size(0), cols = output.size(1);
  if (output.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, output.scalar_type(), "log_softmax_backward_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* y = output.data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    const auto& kernel = kernels<scalar_t>().log_softmax_backward;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t r0, int64_t r1) {
      kernel(g + r0 * cols, y + r0 * cols, gi + r0 * cols, r1 - r0, cols);
    });
  });
  return grad_input;
}

}  // namespace cpu
}  // namespace mnist_fast
