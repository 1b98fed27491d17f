// One SGD training step of an MLP on the CPU, in one op: forward, cross-entropy, backward and the
// torch.optim.SGD update, on workspaces the caller allocates once per batch size. The order of the
// passes and the GEMMs are train_step_impl.h's, shared with CUDA; here are the CPU passes: the
// Linear+ReLU ones of linear_relu_kernels.h, the loss pass and the SGD update. The per-element and
// per-row formulas are those of row_math.h, as in the single-op kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../train_step_impl.h"
#include "cross_entropy_rows.h"
#include "linear_relu_kernels.h"

namespace mnist_fast {
namespace {

using namespace row_math;
constexpr const char* kOp = "mnist_fast.train_step_sgd";

// Mean cross-entropy of the logits (N, C) after adding the last bias, in place: the logits are
// replaced by d loss / d logits, grad_bias gets their column sums. Rows run in order on one thread
// (N * C is small: 640 values at batch 64), so the sums do not depend on the thread count.
// Returns the loss and the number of rows whose argmax is the target.
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, int64_t> loss_and_logit_grad(at::Tensor& logits, const at::Tensor& bias,
                                                                   const int64_t* y, at::opmath_type<scalar_t> weight_sum,
                                                                   int64_t ignore_index, double label_smoothing,
                                                                   at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), classes = logits.size(1);
  scalar_t* x = logits.data_ptr<scalar_t>();
  const auto& kernels = cpu::kernels<scalar_t>();
  kernels.bias_relu(x, bias.data_ptr<scalar_t>(), rows, classes, /*relu=*/false);
  int64_t correct = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = x + i * classes;
    int64_t best = 0;
    for (int64_t c = 1; c < classes; ++c) {
      // argmax as torch.argmax: the first maximum, a NaN beats any number.
      const scalar_t v = row[c], m = row[best];
      if ((v > m) || (v != v && m == m)) best = c;
    }
    correct += y[i] != ignore_index && best == y[i];  // ignored rows count neither way
  }
  // The cross_entropy op's kernels, mean reduction, the logit grad written over the logits.
  cpu::CrossEntropyArgs<scalar_t> a;
  a.input = x;
  a.target = y;
  a.classes = classes;
  a.rows = rows;
  a.ignore_index = ignore_index;
  a.reduction = kMean;
  a.opts = CrossEntropyOptions<acc_t>(classes, label_smoothing);
  a.weight_total = acc_t(classes);
  a.target_weight_sum = weight_sum;
  a.grad_scalar = acc_t(1);
  a.grad_input = x;
  std::vector<double> stats(rows * kRowStats);
  a.stats = stats.data();
  acc_t sums[2];
  kernels.cross_entropy_forward(a, 0, rows, sums);
  kernels.cross_entropy_backward(a, 0, rows);
  std::vector<acc_t> bias_grad(classes, acc_t(0));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < classes; ++c) bias_grad[c] += static_cast<acc_t>(x[i * classes + c]);
  }
  scalar_t* gb = grad_bias.data_ptr<scalar_t>();
  for (int64_t c = 0; c < classes; ++c) gb[c] = static_cast<scalar_t>(bias_grad[c]);
  return {index_reduced_loss(sums[0], sums[1], kMean, weight_sum, a.opts), correct};
}

// param -= lr * direction(grad), updating the momentum buffer (buffer is null when momentum is 0):
// the dispatched SGD kernel, in parallel over elements.
template <typename scalar_t>
void sgd_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* buffer,
                const SgdOptions<at::opmath_type<scalar_t>>& o) {
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* buf = buffer ? buffer->data_ptr<scalar_t>() : nullptr;
  const auto& kernel = cpu::kernels<scalar_t>().sgd;
  at::parallel_for(0, param.numel(), cpu::kGrain, [&](int64_t first, int64_t last) {
    kernel(p + first, g + first, buf ? buf + first : nullptr, last - first, o);
  });
}

// The CPU kernels of train_step_impl.h.
struct CpuStepKernels {
  static int64_t valid_rows(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
    return static_cast<int64_t>(cpu::index_target_weight_sum<double>(target.data_ptr<int64_t>(), target.numel(),
                                                                      classes, nullptr, ignore_index, kOp));
  }

  static void bias_relu_inplace(at::Tensor& z, const at::Tensor& bias) {
    cpu::bias_relu_inplace(z, bias);
  }

  static void loss_and_logit_grad(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                                  int64_t valid_rows, int64_t ignore_index, double label_smoothing,
                                  at::Tensor& grad_bias, at::Tensor& loss, at::Tensor& correct) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "train_step_sgd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto [loss_value, hits] =
          mnist_fast::loss_and_logit_grad<scalar_t>(logits, bias, target.data_ptr<int64_t>(), acc_t(valid_rows),
                                                    ignore_index, label_smoothing, grad_bias);
      *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(loss_value);
      *correct.data_ptr<int64_t>() = hits;
    });
  }

  static void mask_grad(const at::Tensor& grad_output, const at::Tensor& output, at::Tensor& grad_pre,
                        at::Tensor& grad_bias) {
    cpu::mask_grad(grad_output, output, grad_pre, grad_bias);
  }

  static void sgd_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& buffer, const SgdArgs& a) {
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "train_step_sgd_cpu", [&] {
      const SgdOptions<at::opmath_type<scalar_t>> o(a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov,
                                                    a.first_step);
      mnist_fast::sgd_update<scalar_t>(param, grad, buffer.defined() ? &buffer : nullptr, o);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_impl<CpuStepKernels>));
  m.impl("train_step_grads", TORCH_FN(train_step_grads_impl<CpuStepKernels>));
}

}  // namespace mnist_fast
