// Fused log-softmax + NLL (cross-entropy) on the CPU.
//
// Forward: per row, the max, sum(exp(x - max)) and the loss terms; the row's max and log-sum are
// saved for backward. Backward: one pass per row writing softmax - (smoothed) one-hot, scaled by
// weight and reduction. The row loops are the dispatched kernels of kernels/ (one build per CPU
// capability); the checks and allocations are cross_entropy_impl.h's, shared with CUDA; this file
// validates targets and splits the rows into blocks.
//
// Rows are processed in fixed-size blocks, in parallel over blocks; a reduced loss adds the
// per-block partial sums in block order, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../cross_entropy_impl.h"
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

  explicit Rows(const CrossEntropyCall& c) : weights(c.weight, c.input.size(1)) {
    const int64_t rows = c.input.size(0), classes = c.input.size(1);
    args.input = c.input.data_ptr<scalar_t>();
    args.classes = classes;
    args.rows = rows;
    args.reduction = c.reduction;
    args.ignore_index = c.ignore_index;
    args.opts = CrossEntropyOptions<acc_t>(classes, c.label_smoothing);
    args.weight = weights.data();
    args.weight_total = weights.total;
    if (c.kind == TargetKind::ClassIndex) {
      target = index_targets(c.target);
      args.target = target.data_ptr<int64_t>();
      // Every target is validated here, before any kernel reads a weight or a logit through it.
      args.target_weight_sum =
          cpu::index_target_weight_sum(args.target, rows, classes, args.weight, c.ignore_index);
    } else {
      target = c.target.contiguous();
      args.probs = target.data_ptr<scalar_t>();
    }
  }
};

// The forward; with grad_input defined, also the input's gradient for an incoming grad of 1 (per
// row for reduction 'none').
template <typename scalar_t>
void run_forward(const CrossEntropyCall& c, at::Tensor& loss, at::Tensor& stats, at::Tensor* grad_input = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<scalar_t> r(c);
  auto& a = r.args;
  const int64_t rows = c.input.size(0), reduction = c.reduction;
  a.stats = stats.data_ptr<double>();
  a.loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;
  if (grad_input) {
    a.grad_input = grad_input->data_ptr<scalar_t>();
    a.grad_scalar = acc_t(1);
  }
  const auto& kernel =
      grad_input ? cpu::kernels<scalar_t>().cross_entropy_forward_backward : cpu::kernels<scalar_t>().cross_entropy_forward;
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
  if (c.kind == TargetKind::ClassIndex) {
    result = static_cast<scalar_t>(index_reduced_loss(first_total, smooth_total, reduction, a.target_weight_sum, a.opts));
  } else {
    // Stock gives NaN for the mean of an empty input, whatever its shape.
    result = static_cast<scalar_t>(a.classes == 0 && reduction == kMean ? std::numeric_limits<acc_t>::quiet_NaN()
                                                                        : prob_reduced_loss(first_total, rows, reduction));
  }
}

// The backend of cross_entropy_impl.h.
struct CpuCrossEntropy {
  static void forward(const CrossEntropyCall& c, at::Tensor& loss, at::Tensor& stats) {
    forward_backward(c, loss, stats, nullptr);
  }

  // grad_input: null for the forward alone.
  static void forward_backward(const CrossEntropyCall& c, at::Tensor& loss, at::Tensor& stats,
                               at::Tensor* grad_input) {
    // Stock's result for an empty batch, without per-class buffers (the class count may be huge).
    if (c.input.size(0) == 0) {
      loss.fill_(c.reduction == kMean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.input.scalar_type(), "cross_entropy_forward_cpu",
                                    [&] { run_forward<scalar_t>(c, loss, stats, grad_input); });
  }

  static void backward(const CrossEntropyCall& c, const at::Tensor& grad_loss, const at::Tensor& stats,
                       at::Tensor& grad_input, at::Tensor& grad_target) {
    if (c.input.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.input.scalar_type(), "cross_entropy_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      Rows<scalar_t> r(c);
      auto& a = r.args;
      a.stats = const_cast<double*>(stats.data_ptr<double>());
      // The incoming grad: one value for a reduced loss, one per row for reduction 'none'.
      const auto g = grad_loss.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      if (c.reduction == kNone) {
        a.grad_rows = g.data_ptr<acc_t>();
      } else {
        a.grad_scalar = *g.data_ptr<acc_t>();
      }
      a.grad_input = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
      a.grad_target = grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr;
      const auto& kernel = cpu::kernels<scalar_t>().cross_entropy_backward;
      for_each_row_block(a.rows, a.classes, [&](int64_t, int64_t first, int64_t last) { kernel(a, first, last); });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_impl<CpuCrossEntropy>));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_impl<CpuCrossEntropy>));
  m.impl("_cross_entropy_forward_backward", TORCH_FN(cross_entropy_forward_backward_impl<CpuCrossEntropy>));
}

}  // namespace mnist_fast
