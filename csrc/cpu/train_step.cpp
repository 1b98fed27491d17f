// One SGD training step of an MLP on the CPU, in one op: forward, cross-entropy, backward and the
// torch.optim.SGD update, on workspaces the caller allocates once per batch size.
//
// For layers l = 0..L-1 (ReLU after every layer but the last), A_{-1} = input:
//   forward    Z_l = A_{l-1} W_l^T (ATen GEMM), then bias+ReLU in place (linear_relu_kernels.h)
//   loss       one pass per row of the logits: last bias, argmax, log-softmax+NLL (mean), and the
//              logit grad written over the logits, with the last bias grad summed on the way
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
  const scalar_t* b = bias.data_ptr<scalar_t>();
  const CrossEntropyOptions<acc_t> opts(classes, label_smoothing);
  const auto scales = index_grad_scales(acc_t(1), acc_t(1), kMean, weight_sum, opts);
  std::vector<acc_t> bias_grad(classes, acc_t(0));
  acc_t nll_sum = 0, smooth_sum = 0;
  int64_t correct = 0;
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = x + i * classes;
    int64_t best = 0;
    for (int64_t c = 0; c < classes; ++c) {
      row[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) + static_cast<acc_t>(b[c]));
      // argmax as torch.argmax: the first maximum, a NaN beats any number.
      const scalar_t v = row[c], m = row[best];
      if ((v > m) || (v != v && m == m)) best = c;
    }
    if (y[i] == ignore_index) {  // neither in the loss nor in the correct count
      std::fill(row, row + classes, scalar_t(0));
      continue;
    }
    correct += best == y[i];
    const auto st = cpu::row_stats<scalar_t, acc_t>(row, classes);
    const acc_t log_sum = st.log_sum_exp();
    nll_sum += neg_log_prob(static_cast<acc_t>(row[y[i]]), st.max, log_sum);
    if (opts.smoothing) {
      acc_t smooth = 0;
      for (int64_t c = 0; c < classes; ++c) smooth += st.max - static_cast<acc_t>(row[c]);
      smooth_sum += smooth + acc_t(classes) * log_sum;
    }
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t p = cpu::exp_acc(-neg_log_prob(static_cast<acc_t>(row[c]), st.max, log_sum));
      const acc_t g = index_grad(p, c == y[i], acc_t(1), acc_t(classes), scales);
      row[c] = static_cast<scalar_t>(g);
      bias_grad[c] += g;
    }
  }
  scalar_t* gb = grad_bias.data_ptr<scalar_t>();
  for (int64_t c = 0; c < classes; ++c) gb[c] = static_cast<scalar_t>(bias_grad[c]);
  return {index_reduced_loss(nll_sum, smooth_sum, kMean, weight_sum, opts), correct};
}

// param -= lr * direction(grad), updating the momentum buffer (buf is nullptr when momentum is 0).
// The options that are fixed for the whole pass are template arguments, so that each variant is a
// branch-free loop the compiler vectorizes; the arithmetic is row_math's.
template <typename scalar_t, bool kDecay, bool kMomentum, bool kFirst, bool kNesterov>
void sgd_pass(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf, int64_t n,
              const SgdOptions<at::opmath_type<scalar_t>>& options) {
  using acc_t = at::opmath_type<scalar_t>;
  SgdOptions<acc_t> o = options;
  o.first_step = kFirst;
  o.nesterov = kNesterov;
  if (!kDecay) o.weight_decay = acc_t(0);
  for (int64_t k = 0; k < n; ++k) {
    const acc_t pk = static_cast<acc_t>(p[k]);
    const acc_t gk = kDecay ? sgd_decayed_grad(static_cast<acc_t>(g[k]), pk, o) : static_cast<acc_t>(g[k]);
    acc_t d = gk;
    if constexpr (kMomentum) {
      const acc_t b = sgd_momentum_buffer(kFirst ? acc_t(0) : static_cast<acc_t>(buf[k]), gk, o);
      buf[k] = static_cast<scalar_t>(b);
      d = sgd_direction(gk, b, o);
    }
    p[k] = static_cast<scalar_t>(sgd_param(pk, d, o));
  }
}

template <typename scalar_t>
void sgd_update(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* buffer,
                const SgdOptions<at::opmath_type<scalar_t>>& o) {
  scalar_t* p = param.data_ptr<scalar_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* buf = buffer ? buffer->data_ptr<scalar_t>() : nullptr;
  const bool decay = o.weight_decay != 0;
  at::parallel_for(0, param.numel(), cpu::kGrain, [&](int64_t first, int64_t last) {
    scalar_t* pk = p + first;
    const scalar_t* gk = g + first;
    scalar_t* bk = buf ? buf + first : nullptr;
    const int64_t n = last - first;
#define MNIST_FAST_SGD(DECAY)                                                                        \
  if (!buf) {                                                                                        \
    sgd_pass<scalar_t, DECAY, false, false, false>(pk, gk, bk, n, o);                                \
  } else if (o.first_step) {                                                                         \
    if (o.nesterov) sgd_pass<scalar_t, DECAY, true, true, true>(pk, gk, bk, n, o);                   \
    else sgd_pass<scalar_t, DECAY, true, true, false>(pk, gk, bk, n, o);                             \
  } else {                                                                                           \
    if (o.nesterov) sgd_pass<scalar_t, DECAY, true, false, true>(pk, gk, bk, n, o);                  \
    else sgd_pass<scalar_t, DECAY, true, false, false>(pk, gk, bk, n, o);                            \
  }
    if (decay) {
      MNIST_FAST_SGD(true)
    } else {
      MNIST_FAST_SGD(false)
    }
#undef MNIST_FAST_SGD
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
