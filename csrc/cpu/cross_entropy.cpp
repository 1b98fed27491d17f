// Fused log-softmax + NLL (cross-entropy) on the CPU.
//
// Forward: per row, one pass for the max and one for sum(exp(x - max)) together with the smoothing
// term; only the row's logsumexp is saved for backward. Backward: one pass per row writing
// softmax - (smoothed) one-hot, scaled by weight and reduction. The formulas are in row_math.h.
//
// Rows are processed in fixed-size blocks, in parallel over blocks; a reduced loss adds the
// per-block partial sums in block order, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "cross_entropy_rows.h"
#include "fast_exp.h"

namespace mnist_fast {
namespace {

using namespace row_math;

// Rows per block: a block is the unit of parallel work and of the partial sums.
constexpr int64_t kRowsPerBlock = 64;

template <typename F>
void for_each_row_block(int64_t rows, int64_t classes, const F& body) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  // Stay on the calling thread until there is enough work to pay for waking others.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kRowsPerBlock * classes));
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      body(b, b * kRowsPerBlock, std::min(rows, (b + 1) * kRowsPerBlock));
    }
  });
}

using cpu::index_target_weight_sum;
using cpu::row_stats;

// Class weights as the accumulation type (all ones when absent, so loops need no branch) and
// their sum W.
template <typename scalar_t, typename acc_t>
struct ClassWeights {
  std::vector<acc_t> values;
  acc_t total = 0;
  bool given;
  ClassWeights(const std::optional<at::Tensor>& weight, int64_t classes)
      : values(classes, acc_t(1)), given(weight.has_value() && weight->defined()) {
    if (given) {
      const auto w = weight->contiguous();
      const scalar_t* p = w.data_ptr<scalar_t>();
      values.assign(p, p + classes);
    }
    for (acc_t v : values) total += v;
  }
  const acc_t* given_or_null() const { return given ? values.data() : nullptr; }
  acc_t operator[](int64_t c) const { return values[c]; }
};

template <typename scalar_t>
void forward_index(const at::Tensor& input, const at::Tensor& target_, const std::optional<at::Tensor>& weight,
                   int64_t reduction, int64_t ignore_index, double label_smoothing, at::Tensor& loss,
                   at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const auto target = index_targets(target_);
  const int64_t* y = target.data_ptr<int64_t>();
  const scalar_t* x = input.data_ptr<scalar_t>();
  double* lse_out = lse.data_ptr<double>();
  const ClassWeights<scalar_t, acc_t> w(weight, classes);
  const CrossEntropyOptions<acc_t> opts(classes, label_smoothing);
  const acc_t weight_sum = index_target_weight_sum(y, rows, classes, w.given_or_null(), ignore_index);

  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> partial(2 * blocks, acc_t(0));  // per block: sum of nll, sum of smooth
  scalar_t* loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;

  for_each_row_block(rows, classes, [&](int64_t b, int64_t first, int64_t last) {
    acc_t nll_sum = 0, smooth_sum = 0;
    for (int64_t i = first; i < last; ++i) {
      const scalar_t* row = x + i * classes;
      const auto st = row_stats<scalar_t, acc_t>(row, classes);
      const acc_t log_sum = st.log_sum_exp();
      lse_out[i] = st.lse();
      acc_t nll = 0, smooth = 0;
      if (y[i] != ignore_index) {
        nll = w[y[i]] * neg_log_prob(static_cast<acc_t>(row[y[i]]), st.max, log_sum);
        if (opts.smoothing) {
          for (int64_t c = 0; c < classes; ++c) smooth += w[c] * (st.max - static_cast<acc_t>(row[c]));
          smooth += w.total * log_sum;
        }
      }
      if (loss_rows) loss_rows[i] = static_cast<scalar_t>(index_row_loss(nll, smooth, opts));
      nll_sum += nll;
      smooth_sum += smooth;
    }
    partial[2 * b] = nll_sum;
    partial[2 * b + 1] = smooth_sum;
  });
  if (reduction == kNone) return;
  acc_t nll_total = 0, smooth_total = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    nll_total += partial[2 * b];
    smooth_total += partial[2 * b + 1];
  }
  loss.fill_(index_reduced_loss(nll_total, smooth_total, reduction, weight_sum, opts));
}

template <typename scalar_t>
void forward_prob(const at::Tensor& input, const at::Tensor& target_, const std::optional<at::Tensor>& weight,
                  int64_t reduction, double label_smoothing, at::Tensor& loss, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const auto target = target_.contiguous();
  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* t = target.data_ptr<scalar_t>();
  double* lse_out = lse.data_ptr<double>();
  const ClassWeights<scalar_t, acc_t> w(weight, classes);
  const CrossEntropyOptions<acc_t> opts(classes, label_smoothing);

  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> partial(blocks, acc_t(0));
  scalar_t* loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;

  for_each_row_block(rows, classes, [&](int64_t b, int64_t first, int64_t last) {
    acc_t block_sum = 0;
    for (int64_t i = first; i < last; ++i) {
      const scalar_t* row = x + i * classes;
      const scalar_t* trow = t + i * classes;
      const auto st = row_stats<scalar_t, acc_t>(row, classes);
      const acc_t log_sum = st.log_sum_exp();
      lse_out[i] = st.lse();
      acc_t row_loss = 0;
      for (int64_t c = 0; c < classes; ++c) {
        const acc_t wt = w[c] * opts.smoothed_target(static_cast<acc_t>(trow[c]));
        row_loss += prob_loss_term(neg_log_prob(static_cast<acc_t>(row[c]), st.max, log_sum), wt);
      }
      if (loss_rows) loss_rows[i] = static_cast<scalar_t>(row_loss);
      block_sum += row_loss;
    }
    partial[b] = block_sum;
  });
  if (reduction == kNone) return;
  acc_t total = 0;
  for (acc_t v : partial) total += v;
  // Stock gives NaN for the mean of an empty input, whatever its shape.
  loss.fill_(rows * classes == 0 && reduction == kMean ? std::numeric_limits<acc_t>::quiet_NaN()
                                                         : prob_reduced_loss(total, rows, reduction));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& input_, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t reduction, int64_t ignore_index,
                                                             double label_smoothing) {
  const auto kind = check_cross_entropy_args(input_, target, weight, reduction, ignore_index, label_smoothing);
  const auto input = input_.contiguous();
  const int64_t rows = input.size(0);
  auto loss = reduction == kNone ? at::empty({rows}, input.options()) : at::empty({}, input.options());
  auto lse = at::empty({rows}, input.options().dtype(logsumexp_dtype(input.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "cross_entropy_forward_cpu", [&] {
    if (kind == TargetKind::ClassIndex) {
      forward_index<scalar_t>(input, target, weight, reduction, ignore_index, label_smoothing, loss, lse);
    } else {
      forward_prob<scalar_t>(input, target, weight, reduction, label_smoothing, loss, lse);
    }
  });
  return {loss, lse};
}

// The incoming grad of row i: one value for a reduced loss, one per row for reduction 'none'.
template <typename acc_t>
struct LossGrad {
  at::Tensor holder;
  const acc_t* rows = nullptr;
  acc_t scalar = 0;
  LossGrad(const at::Tensor& grad_loss, int64_t reduction) {
    holder = grad_loss.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    if (reduction == kNone) {
      rows = holder.data_ptr<acc_t>();
    } else {
      scalar = *holder.data_ptr<acc_t>();
    }
  }
  acc_t operator[](int64_t i) const { return rows ? rows[i] : scalar; }
};

template <typename scalar_t>
void backward_index(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target_,
                    const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t reduction,
                    int64_t ignore_index, double label_smoothing, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const auto target = index_targets(target_);
  const int64_t* y = target.data_ptr<int64_t>();
  const scalar_t* x = input.data_ptr<scalar_t>();
  const double* row_lse = lse.data_ptr<double>();
  scalar_t* gx = grad_input.data_ptr<scalar_t>();
  const ClassWeights<scalar_t, acc_t> w(weight, classes);
  const CrossEntropyOptions<acc_t> opts(classes, label_smoothing);
  const acc_t weight_sum = index_target_weight_sum(y, rows, classes, w.given_or_null(), ignore_index);
  const LossGrad<acc_t> g(grad_loss, reduction);

  for_each_row_block(rows, classes, [&](int64_t, int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      scalar_t* grow = gx + i * classes;
      if (y[i] == ignore_index) {
        std::fill(grow, grow + classes, scalar_t(0));
        continue;
      }
      const scalar_t* row = x + i * classes;
      const auto scales = index_grad_scales(g[i], w[y[i]], reduction, weight_sum, opts);
      const SplitLogSumExp<acc_t> lse(row_lse[i]);
      const acc_t* wc = w.values.data();
      auto grad_of = [&](int64_t c, bool is_target) {
        const acc_t p = cpu::exp_acc(-lse.neg_log_prob(static_cast<acc_t>(row[c])));
        return static_cast<scalar_t>(index_grad(p, is_target, wc[c], w.total, scales));
      };
      // Every class as a non-target (a loop that vectorizes), then the target class redone.
      for (int64_t c = 0; c < classes; ++c) grow[c] = grad_of(c, false);
      grow[y[i]] = grad_of(y[i], true);
    }
  });
}

template <typename scalar_t>
void backward_prob(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target_,
                   const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t reduction,
                   double label_smoothing, at::Tensor& grad_input, at::Tensor& grad_target) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = input.size(0), classes = input.size(1);
  const auto target = target_.contiguous();
  const scalar_t* x = input.data_ptr<scalar_t>();
  const scalar_t* t = target.data_ptr<scalar_t>();
  const double* row_lse = lse.data_ptr<double>();
  scalar_t* gx = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr;
  const ClassWeights<scalar_t, acc_t> w(weight, classes);
  const CrossEntropyOptions<acc_t> opts(classes, label_smoothing);
  const LossGrad<acc_t> g(grad_loss, reduction);

  for_each_row_block(rows, classes, [&](int64_t, int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const scalar_t* row = x + i * classes;
      const scalar_t* trow = t + i * classes;
      const acc_t gi = prob_grad_scale(g[i], rows, reduction);
      const SplitLogSumExp<acc_t> lse(row_lse[i]);
      if (gx) {
        acc_t wt_sum = 0;
        for (int64_t c = 0; c < classes; ++c) wt_sum += w[c] * opts.smoothed_target(static_cast<acc_t>(trow[c]));
        for (int64_t c = 0; c < classes; ++c) {
          const acc_t p = cpu::exp_acc(-lse.neg_log_prob(static_cast<acc_t>(row[c])));
          const acc_t wt = w[c] * opts.smoothed_target(static_cast<acc_t>(trow[c]));
          gx[i * classes + c] = static_cast<scalar_t>(prob_input_grad(p, wt_sum, wt, gi));
        }
      }
      if (gt) {
        for (int64_t c = 0; c < classes; ++c) {
          gt[i * classes + c] =
              static_cast<scalar_t>(prob_target_grad(lse.neg_log_prob(static_cast<acc_t>(row[c])), w[c], gi, opts));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input_,
                                                              const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& lse_, int64_t reduction,
                                                              int64_t ignore_index, double label_smoothing,
                                                              std::array<bool, 2> output_mask) {
  const auto kind = check_cross_entropy_backward_args(grad_loss, input_, target, weight, lse_, reduction,
                                                      ignore_index, label_smoothing);
  TORCH_CHECK(!output_mask[1] || kind == TargetKind::Probability,
              "mnist_fast.cross_entropy_backward: class-index targets have no gradient");
  const auto input = input_.contiguous();
  const auto lse = lse_.contiguous();
  at::Tensor grad_input = output_mask[0] ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_target = output_mask[1] ? at::empty_like(input) : at::Tensor();
  if (!output_mask[0] && !output_mask[1]) return {grad_input, grad_target};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "cross_entropy_backward_cpu", [&] {
    if (kind == TargetKind::ClassIndex) {
      backward_index<scalar_t>(grad_loss, input, target, weight, lse, reduction, ignore_index, label_smoothing,
                               grad_input);
    } else {
      backward_prob<scalar_t>(grad_loss, input, target, weight, lse, reduction, label_smoothing, grad_input,
                              grad_target);
    }
  });
  return {grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_cpu));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_cpu));
}

}  // namespace mnist_fast
