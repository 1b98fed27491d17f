// Fused log-softmax + NLL (cross-entropy) on the CPU.
//
// Forward: per row, the max, sum(exp(x - max)) and the loss terms; the row's max and log-sum are
// saved for backward. Backward: one pass per row writing softmax - (smoothed) one-hot, scaled by
// weight and reduction. The row loops are the dispatched kernels of kernels/ (one build per CPU
// capability); this file checks, allocates, validates targets and splits the rows into blocks.
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
#include <limits>
#include <vector>

#include "../checks.h"
#include "cross_entropy_rows.h"
#include "kernels/kernels.h"

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

// Class weights in the accumulation type (none when absent: the kernels then use ones) and their
// sum W (the class count when absent).
template <typename scalar_t>
struct ClassWeights {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> values;
  acc_t total;
  ClassWeights(const std::optional<at::Tensor>& weight, int64_t classes) : total(acc_t(classes)) {
    if (!weight.has_value() || !weight->defined()) return;
    const auto w = weight->contiguous();
    const scalar_t* p = w.data_ptr<scalar_t>();
    values.assign(p, p + classes);
    total = 0;
    for (acc_t v : values) total += v;
  }
  const acc_t* data() const { return values.empty() ? nullptr : values.data(); }
};

// The kernels' arguments common to forward and backward; holds the tensors it points into.
template <typename scalar_t>
struct Rows {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor target;
  ClassWeights<scalar_t> weights;
  cpu::CrossEntropyArgs<scalar_t> args;

  Rows(const at::Tensor& input, const at::Tensor& target_, TargetKind kind, const std::optional<at::Tensor>& weight,
       int64_t reduction, int64_t ignore_index, double label_smoothing)
      : weights(weight, input.size(1)) {
    const int64_t rows = input.size(0), classes = input.size(1);
    args.input = input.data_ptr<scalar_t>();
    args.classes = classes;
    args.rows = rows;
    args.reduction = reduction;
    args.ignore_index = ignore_index;
    args.opts = CrossEntropyOptions<acc_t>(classes, label_smoothing);
    args.weight = weights.data();
    args.weight_total = weights.total;
    if (kind == TargetKind::ClassIndex) {
      target = index_targets(target_);
      args.target = target.data_ptr<int64_t>();
      // Every target is validated here, before any kernel reads a weight or a logit through it.
      args.target_weight_sum =
          cpu::index_target_weight_sum(args.target, rows, classes, args.weight, ignore_index);
    } else {
      target = target_.contiguous();
      args.probs = target.data_ptr<scalar_t>();
    }
  }
};

template <typename scalar_t>
void forward(const at::Tensor& input, const at::Tensor& target, TargetKind kind,
             const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index, double label_smoothing,
             at::Tensor& loss, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<scalar_t> r(input, target, kind, weight, reduction, ignore_index, label_smoothing);
  auto& a = r.args;
  const int64_t rows = input.size(0);
  a.stats = stats.data_ptr<double>();
  a.loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;
  const auto& kernel = cpu::kernels<scalar_t>().cross_entropy_forward;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> partial(2 * blocks, acc_t(0));  // per block: sum of nll (or row loss), sum of smooth
  if (a.classes == 0) {  // no logits: every row's terms are 0 (class-index rows are all ignored)
    stats.fill_(-std::numeric_limits<double>::infinity());
    if (a.loss_rows) loss.zero_();
  } else {
    for_each_row_block(rows, a.classes, [&](int64_t b, int64_t first, int64_t last) {
      kernel(a, first, last, partial.data() + 2 * b);
    });
  }
  if (reduction == kNone) return;
  acc_t first_total = 0, smooth_total = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    first_total += partial[2 * b];
    smooth_total += partial[2 * b + 1];
  }
  // (written directly: a fill_ through the dispatcher costs more than the kernel at batch 64)
  scalar_t& result = *loss.data_ptr<scalar_t>();
  if (kind == TargetKind::ClassIndex) {
    result = static_cast<scalar_t>(index_reduced_loss(first_total, smooth_total, reduction, a.target_weight_sum, a.opts));
  } else {
    // Stock gives NaN for the mean of an empty input, whatever its shape.
    result = static_cast<scalar_t>(a.classes == 0 && reduction == kMean ? std::numeric_limits<acc_t>::quiet_NaN()
                                                                        : prob_reduced_loss(first_total, rows, reduction));
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_cpu(const at::Tensor& input_, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t reduction, int64_t ignore_index,
                                                             double label_smoothing) {
  const auto kind = check_cross_entropy_args(input_, target, weight, reduction, ignore_index, label_smoothing);
  const auto input = input_.contiguous();
  const int64_t rows = input.size(0);
  auto loss = reduction == kNone ? at::empty({rows}, input.options()) : at::empty({}, input.options());
  auto stats = at::empty({rows, kRowStats}, input.options().dtype(logsumexp_dtype(input.scalar_type())));
  // Stock's result for an empty batch, without per-class buffers (the class count may be huge).
  if (rows == 0) {
    loss.fill_(reduction == kMean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return {loss, stats};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "cross_entropy_forward_cpu", [&] {
    forward<scalar_t>(input, target, kind, weight, reduction, ignore_index, label_smoothing, loss, stats);
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input_,
                                                              const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& stats_, int64_t reduction,
                                                              int64_t ignore_index, double label_smoothing,
                                                              std::array<bool, 2> output_mask) {
  const auto kind = check_cross_entropy_backward_args(grad_loss, input_, target, weight, stats_, reduction,
                                                      ignore_index, label_smoothing);
  TORCH_CHECK(!output_mask[1] || kind == TargetKind::Probability,
              "mnist_fast.cross_entropy_backward: class-index targets have no gradient");
  const auto input = input_.contiguous();
  const auto stats = stats_.contiguous();
  at::Tensor grad_input = output_mask[0] ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_target = output_mask[1] ? at::empty_like(input) : at::Tensor();
  if ((!output_mask[0] && !output_mask[1]) || input.numel() == 0) return {grad_input, grad_target};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Rows<scalar_t> r(input, target, kind, weight, reduction, ignore_index, label_smoothing);
    auto& a = r.args;
    a.stats = const_cast<double*>(stats.data_ptr<double>());
    // The incoming grad: one value for a reduced loss, one per row for reduction 'none'.
    const auto g = grad_loss.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    if (reduction == kNone) {
      a.grad_rows = g.data_ptr<acc_t>();
    } else {
      a.grad_scalar = *g.data_ptr<acc_t>();
    }
    a.grad_input = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
    a.grad_target = grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr;
    const auto& kernel = cpu::kernels<scalar_t>().cross_entropy_backward;
    for_each_row_block(input.size(0), a.classes, [&](int64_t, int64_t first, int64_t last) { kernel(a, first, last); });
  });
  return {grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_cpu));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_cpu));
}

}  // namespace mnist_fast
