// One SGD training step of an MLP on the CPU, in one op: forward, cross-entropy, backward and the
// torch.optim.SGD update, on workspaces the caller allocates once per batch size.
//
// For layers l = 0..L-1 (ReLU after every layer but the last), A_{-1} = input:
//   forward    Z_l = A_{l-1} W_l^T (ATen GEMM), then bias+ReLU in place (linear_relu_kernels.h)
//   loss       last bias, argmax, then the cross_entropy kernels (mean) with the logit grad written
//              over the logits, and the last bias grad as its column sums
//   backward   G_{l-1} = dZ_l W_l (GEMM, with the not yet updated W_l), grad W_l = dZ_l^T A_{l-1}
//              (GEMM), then the ReLU mask of G_{l-1} in place with the bias grad in the same pass
//   update     SGD of W_l and b_l as soon as their grads exist (every grad depends on the old
//              parameters only, so this is the math of a stock step), one elementwise pass each
// The per-element and per-row formulas are those of row_math.h, as in the single-op kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
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

std::tuple<at::Tensor, at::Tensor> train_step_sgd_cpu(const at::Tensor& input_, const at::Tensor& target_,
                                                      at::TensorList params, at::TensorList momentum_buffers,
                                                      at::TensorList workspace, double lr, double momentum,
                                                      double dampening, double weight_decay, bool nesterov,
                                                      bool first_step, int64_t ignore_index, double label_smoothing) {
  check_train_step_args(input_, target_, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                        nesterov, label_smoothing);
  const auto input = input_.contiguous();
  const auto target = target_.contiguous();
  const int64_t rows = input.size(0);
  const int64_t layers = static_cast<int64_t>(params.size() / 2);
  const int64_t classes = params[2 * layers - 2].size(0);
  auto W = [&](int64_t l) -> const at::Tensor& { return params[2 * l]; };
  auto B = [&](int64_t l) -> const at::Tensor& { return params[2 * l + 1]; };
  auto Z = [&](int64_t l) -> at::Tensor { return workspace[l]; };                  // layer outputs
  auto G = [&](int64_t l) -> at::Tensor { return workspace[layers + l]; };         // hidden output grads
  auto GW = [&](int64_t l) -> at::Tensor { return workspace[2 * layers - 1 + 2 * l]; };
  auto GB = [&](int64_t l) -> at::Tensor { return workspace[2 * layers + 2 * l]; };
  auto A = [&](int64_t l) -> const at::Tensor& { return l < 0 ? input : workspace[l]; };

  at::Tensor loss = at::empty({}, input.options());
  at::Tensor correct = at::empty({}, input.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "train_step_sgd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Every target is validated before anything is written.
    const int64_t* y = target.data_ptr<int64_t>();
    const acc_t weight_sum = cpu::index_target_weight_sum<acc_t>(y, rows, classes, nullptr, ignore_index, kOp);

    // The phases are named for torch.profiler (free when it is off).
    {
      RECORD_FUNCTION("mnist_fast::train_step_sgd::forward", std::vector<c10::IValue>());
      for (int64_t l = 0; l < layers; ++l) {
        auto z = Z(l);
        at::mm_out(z, A(l - 1), W(l).t());
        if (l + 1 < layers) cpu::bias_relu_inplace(z, B(l));
      }
    }
    {
      RECORD_FUNCTION("mnist_fast::train_step_sgd::loss", std::vector<c10::IValue>());
      auto logits = Z(layers - 1);
      auto last_bias_grad = GB(layers - 1);
      const auto [loss_value, hits] = loss_and_logit_grad<scalar_t>(logits, B(layers - 1), y, weight_sum,
                                                                    ignore_index, label_smoothing, last_bias_grad);
      *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(loss_value);
      *correct.data_ptr<int64_t>() = hits;
    }

    const SgdOptions<acc_t> opts(lr, momentum, dampening, weight_decay, nesterov, first_step);
    const bool with_momentum = momentum != 0.0;
    for (int64_t l = layers - 1; l >= 0; --l) {
      const at::Tensor dz = l == layers - 1 ? Z(l) : G(l);  // d loss / d pre-activation of layer l
      {
        RECORD_FUNCTION("mnist_fast::train_step_sgd::backward", std::vector<c10::IValue>());
        if (l > 0) {
          auto g = G(l - 1);
          at::mm_out(g, dz, W(l));
          auto gb = GB(l - 1);
          cpu::mask_grad(g, Z(l - 1), g, gb);
        }
        auto gw = GW(l);
        at::mm_out(gw, dz.t(), A(l - 1));
      }
      RECORD_FUNCTION("mnist_fast::train_step_sgd::sgd_update", std::vector<c10::IValue>());
      for (int64_t k = 2 * l; k <= 2 * l + 1; ++k) {
        sgd_update<scalar_t>(params[k], workspace[2 * layers - 1 + k],
                             with_momentum ? &momentum_buffers[k] : nullptr, opts);
      }
    }
  });
  return {loss, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_cpu));
}

}  // namespace mnist_fast
