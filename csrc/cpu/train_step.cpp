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
}

}  // namespace mnist_fast
