// The steps of an SGD epoch in one op (DESIGN.md, "Layers of fusion", layer 4).
//
// The caller draws the sample order (torch.randperm with its generator, as data.Batches does), so
// the batches, and with them the parameters, are bit for bit those of the step-by-step loop; what
// goes away is a Python round trip, a fresh batch and the bookkeeping per step. Each batch is
// gathered into one reused buffer and trained by the train_step_sgd op, called through the
// dispatcher (ops.h): this file has no kernel of its own, so it runs on every backend the step
// has (CPU, CUDA) and follows whatever the step's kernels become. Its autograd kernel is the
// step's, in autograd.cpp.
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops.h"

namespace mnist_fast {
namespace {

constexpr const char* kOp = "mnist_fast.train_epoch_sgd";

// Checks the epoch's own arguments (the step checks the rest on its first call) and the whole
// order and every target of the epoch up front, so that a bad one fails before the first update
// rather than halfway through the epoch. Returns the targets in the epoch's order.
at::Tensor epoch_targets(const at::Tensor& images, const at::Tensor& labels, const at::Tensor& order,
                         int64_t batch_size, const at::Tensor& lr, at::TensorList params, int64_t ignore_index) {
  TORCH_CHECK_VALUE(batch_size >= 1, kOp, ": batch_size must be positive, got ", batch_size);
  TORCH_CHECK_VALUE(images.dim() >= 2, kOp, ": expected images of shape (N, ...), got shape ", images.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, kOp, ": expected labels of dtype int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == images.size(0), kOp, ": expected labels of shape (",
                    images.size(0), ",) (one per image), got shape ", labels.sizes());
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong, kOp, ": expected an int64 order, got ", order.scalar_type());
  TORCH_CHECK_VALUE(order.dim() == 1, kOp, ": expected a 1-D order (sample indices), got shape ", order.sizes());
  TORCH_CHECK(labels.device() == images.device() && order.device() == images.device(), kOp,
              ": expected images, labels and order on one device, got ", images.device(), ", ", labels.device(),
              " and ", order.device());
  const int64_t steps = (order.size(0) + batch_size - 1) / batch_size;
  TORCH_CHECK_TYPE(lr.scalar_type() == at::kDouble, kOp, ": expected a float64 lr schedule, got ", lr.scalar_type());
  TORCH_CHECK_VALUE(lr.device().is_cpu() && lr.dim() == 1 && lr.size(0) == steps, kOp,
                    ": expected lr on the CPU of shape (", steps, ",) (one per step: ", order.size(0),
                    " samples in batches of ", batch_size, "), got shape ", lr.sizes(), " on ", lr.device());
  TORCH_CHECK_VALUE(params.size() >= 2 && params.size() % 2 == 0, kOp,
                    ": expected params [W_0, b_0, ..., W_{L-1}, b_{L-1}], got ", params.size(), " tensors");
  if (steps == 0) return labels.narrow(0, 0, 0);
  // Out-of-range indices must raise here: CUDA's index_select would only trip a device assert.
  const auto [low, high] = at::aminmax(order);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < images.size(0), kOp, ": order holds index ", lo < 0 ? lo : hi,
                    ", out of range for ", images.size(0), " samples");
  const at::Tensor targets = labels.index_select(0, order);
  const int64_t classes = params.back().size(0);
  const at::Tensor bad = targets.ne(ignore_index).logical_and_(targets.lt(0).logical_or_(targets.ge(classes)));
  if (bad.any().item<bool>()) {
    const int64_t at_ = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_INDEX(false, kOp, ": Target ", targets[at_].item<int64_t>(), " is out of bounds for ", classes,
                      " classes (sample ", order[at_].item<int64_t>(), ", step ", at_ / batch_size, ").");
  }
  return targets;
}

std::tuple<at::Tensor, at::Tensor> train_epoch_sgd_kernel(
    const at::Tensor& images, const at::Tensor& labels, const at::Tensor& order, int64_t batch_size,
    const at::Tensor& lr, at::TensorList params, at::TensorList momentum_buffers, double momentum, double dampening,
    double weight_decay, bool nesterov, bool first_step, int64_t ignore_index, double label_smoothing) {
  const at::Tensor targets = epoch_targets(images, labels, order, batch_size, lr, params, ignore_index);
  const int64_t samples = order.size(0);
  const int64_t steps = lr.size(0);
  if (steps == 0) {
    return {at::empty({0}, images.options()), at::empty({0}, labels.options())};
  }
  const at::Tensor x_all = images.flatten(1);  // a view when images are contiguous
  const at::Tensor lr_values = lr.contiguous();
  const double* lrs = lr_values.data_ptr<double>();
  // The batch buffer and the step's workspace are allocated once; only a last, smaller batch gets
  // a workspace of its own (the buffer's first rows serve as its input).
  const at::Tensor batch = at::empty({std::min(batch_size, samples), x_all.size(1)}, x_all.options());
  std::vector<at::Tensor> workspace;
  int64_t workspace_rows = -1;
  std::vector<at::Tensor> losses, correct;
  losses.reserve(steps);
  correct.reserve(steps);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t start = s * batch_size, rows = std::min(batch_size, samples - start);
    at::Tensor x = batch.narrow(0, 0, rows);
    at::index_select_out(x, x_all, 0, order.narrow(0, start, rows));
    if (rows != workspace_rows) {
      workspace = train_step_workspace(x, params);
      workspace_rows = rows;
    }
    auto [loss, hits] = train_step_sgd(x, targets.narrow(0, start, rows), params, momentum_buffers, workspace,
                                       lrs[s], momentum, dampening, weight_decay, nesterov, first_step && s == 0,
                                       ignore_index, label_smoothing);
    losses.push_back(std::move(loss));
    correct.push_back(std::move(hits));
  }
  // One op for all the results: on a GPU, no copy (or sync) per step.
  return {at::stack(losses), at::stack(correct)};
}

}  // namespace

// Every backend: the op only gathers and calls the step, which dispatches to its own kernels.
TORCH_LIBRARY_IMPL(mnist_fast, CompositeExplicitAutograd, m) {
  m.impl("train_epoch_sgd", TORCH_FN(train_epoch_sgd_kernel));
}

}  // namespace mnist_fast
