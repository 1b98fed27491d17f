// The steps of an SGD epoch in one op (DESIGN.md, "Layers of fusion", layer 4).
//
// The caller draws the sample order (torch.randperm with its generator, as data.Batches does), so
// the batches, and with them the parameters, are bit for bit those of the step-by-step loop; what
// goes away is a Python round trip, a fresh batch and the bookkeeping per step. Each batch is
// gathered into one reused buffer and trained by the train_step_sgd op, called through the
// dispatcher (ops.h): apart from a CPU copy loop for the gather (gather_rows), this file has no
// kernel of its own, so it runs on every backend the step has (CPU, CUDA) and follows whatever the
// step's kernels become. Its autograd kernel is the step's, in autograd.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels/kernels.h"
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
  const int64_t classes = params.back().size(0);
  auto bad_target = [&](int64_t at_, int64_t target, int64_t sample) {
    TORCH_CHECK_INDEX(false, kOp, ": Target ", target, " is out of bounds for ", classes, " classes (sample ", sample,
                      ", step ", at_ / batch_size, ").");
  };
  if (order.is_cpu()) {  // one pass, no tensor op per check: a one-step call is ~20 us faster than with the path below
    const at::Tensor index = order.contiguous(), all_labels = labels.contiguous();
    at::Tensor targets = at::empty({index.size(0)}, labels.options());
    const int64_t* idx = index.const_data_ptr<int64_t>();
    const int64_t* y = all_labels.const_data_ptr<int64_t>();
    int64_t* out = targets.data_ptr<int64_t>();
    const int64_t n = images.size(0);
    for (int64_t i = 0; i < index.size(0); ++i) {
      TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < n, kOp, ": order holds index ", idx[i], ", out of range for ", n,
                        " samples");
    }
    for (int64_t i = 0; i < index.size(0); ++i) {
      out[i] = y[idx[i]];
      if (out[i] != ignore_index && (out[i] < 0 || out[i] >= classes)) bad_target(i, out[i], idx[i]);
    }
    return targets;
  }
  // Out-of-range indices must raise here: CUDA's index_select would only trip a device assert.
  const auto [low, high] = at::aminmax(order);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < images.size(0), kOp, ": order holds index ", lo < 0 ? lo : hi,
                    ", out of range for ", images.size(0), " samples");
  const at::Tensor targets = labels.index_select(0, order);
  const at::Tensor bad = targets.ne(ignore_index).logical_and_(targets.lt(0).logical_or_(targets.ge(classes)));
  if (bad.any().item<bool>()) {
    const int64_t at_ = bad.nonzero()[0][0].item<int64_t>();
    bad_target(at_, targets[at_].item<int64_t>(), order[at_].item<int64_t>());
  }
  return targets;
}

// uint8 images come with their pixel map: a 1-D table of 256 values of the parameters' dtype, the
// input value of each byte value.
void check_pixel_values(const at::Tensor& images, const std::optional<at::Tensor>& pixel_values,
                        at::TensorList params) {
  if (images.scalar_type() != at::kByte) {
    TORCH_CHECK_TYPE(!pixel_values, kOp, ": pixel_values maps uint8 images to the input; got images of dtype ",
                     images.scalar_type());
    return;
  }
  TORCH_CHECK_TYPE(pixel_values, kOp, ": uint8 images need pixel_values (the input value of each of the 256 "
                   "byte values, e.g. data.pixel_values())");
  const at::Tensor& table = *pixel_values;
  TORCH_CHECK_VALUE(table.dim() == 1 && table.size(0) == 256, kOp, ": expected pixel_values of shape (256,), got ",
                    table.sizes());
  TORCH_CHECK_TYPE(params.empty() || table.scalar_type() == params[0].scalar_type(), kOp,
                   ": expected pixel_values of the parameters' dtype (", params.empty() ? table.scalar_type()
                   : params[0].scalar_type(), "), got ", table.scalar_type());
  TORCH_CHECK(table.device() == images.device(), kOp, ": expected pixel_values on the images' device (",
              images.device(), "), got ", table.device());
}

// x = x_all[index] (rows), or pixel_values[x_all[index]] for uint8 images. On the CPU, a copy loop
// that prefetches the next rows while it copies one, on every intra-op thread: a shuffled epoch's
// rows are scattered over the whole data set (188 MB for MNIST in float32, 47 MB in uint8), so the
// gather waits on memory for each line of a row unless it has them in flight (index_select, one row
// after the other: 4.5 GB/s against ~6 GB/s for a plain memcpy of one core on this project's VM;
// 1.3x faster with rows in flight, and a second thread brings its own share of bandwidth). uint8
// rows bring a quarter of the lines, and their lookup runs while the next rows arrive. The indices
// are in range (epoch_targets checked the whole order).
void gather_rows(at::Tensor& x, const at::Tensor& x_all, const at::Tensor& index,
                 const std::optional<at::Tensor>& pixel_values) {
  if (!x_all.is_cpu() || !x_all.is_contiguous() || !index.is_contiguous() ||
      (pixel_values && !pixel_values->is_contiguous())) {
    if (pixel_values) {
      x.copy_(pixel_values->index_select(0, x_all.index_select(0, index).flatten().to(at::kInt)).view_as(x));
    } else {
      at::index_select_out(x, x_all, 0, index);
    }
    return;
  }
  constexpr int64_t kLine = 64, kRowsPerTask = 16, kAheadBytes = 6272;
  const int64_t cols = x_all.size(1), row_bytes = cols * x_all.element_size();
  // rows in flight: 3 of MNIST's float32 rows, 8 of its uint8 ones (measured: 3 float rows as good as 6;
  // 8 uint8 rows ~1% faster epochs than 3, no slower than 16)
  const int64_t ahead = std::max<int64_t>(3, kAheadBytes / std::max<int64_t>(row_bytes, 1));
  const auto* src = static_cast<const char*>(x_all.const_data_ptr());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  // copy_row(i, row): row i of x from the row of x_all at idx[i]
  auto gather = [&](const auto& copy_row) {
    at::parallel_for(0, index.size(0), kRowsPerTask, [&](int64_t first, int64_t last) {
      auto prefetch = [&](int64_t i) {
        const char* row = src + idx[i] * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += kLine) __builtin_prefetch(row + b, /*read*/ 0, /*into L2*/ 1);
      };
      for (int64_t i = first; i < std::min(last, first + ahead); ++i) prefetch(i);
      for (int64_t i = first; i < last; ++i) {
        if (i + ahead < last) prefetch(i + ahead);
        copy_row(i, src + idx[i] * row_bytes);
      }
    });
  };
  if (!pixel_values) {
    auto* dst = static_cast<char*>(x.data_ptr());
    gather([&](int64_t i, const char* row) { std::memcpy(dst + i * row_bytes, row, row_bytes); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "train_epoch_gather", [&] {
    scalar_t* dst = x.data_ptr<scalar_t>();
    const scalar_t* table = pixel_values->const_data_ptr<scalar_t>();
    const auto& map_bytes = cpu::kernels<scalar_t>().map_bytes;
    gather([&](int64_t i, const char* row) {
      map_bytes(dst + i * cols, reinterpret_cast<const uint8_t*>(row), cols, table);
    });
  });
}

// The epoch loop of every optimizer: checks, then per step the gather into one reused buffer and
// step(x, targets, workspace, lr, s) -> (loss, correct), the optimizer's step on batch s.
template <typename Step>
std::tuple<at::Tensor, at::Tensor> run_epoch(const at::Tensor& images, const at::Tensor& labels,
                                             const at::Tensor& order, int64_t batch_size, const at::Tensor& lr,
                                             at::TensorList params, int64_t ignore_index,
                                             const std::optional<at::Tensor>& pixel_values, const Step& step) {
  check_pixel_values(images, pixel_values, params);
  const at::Tensor targets = epoch_targets(images, labels, order, batch_size, lr, params, ignore_index);
  const int64_t samples = order.size(0);
  const int64_t steps = lr.size(0);
  const at::TensorOptions input_options = pixel_values ? pixel_values->options() : images.options();
  if (steps == 0) {
    return {at::empty({0}, input_options), at::empty({0}, labels.options())};
  }
  const at::Tensor x_all = images.flatten(1);  // a view when images are contiguous
  const at::Tensor lr_values = lr.contiguous();
  const double* lrs = lr_values.data_ptr<double>();
  // The batch buffer and the step's workspace are allocated once; only a last, smaller batch gets
  // a workspace of its own (the buffer's first rows serve as its input).
  const at::Tensor batch = at::empty({std::min(batch_size, samples), x_all.size(1)}, input_options);
  std::vector<at::Tensor> workspace;
  int64_t workspace_rows = -1;
  std::vector<at::Tensor> losses, correct;
  losses.reserve(steps);
  correct.reserve(steps);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t start = s * batch_size, rows = std::min(batch_size, samples - start);
    at::Tensor x = batch.narrow(0, 0, rows);
    gather_rows(x, x_all, order.narrow(0, start, rows), pixel_values);
    if (rows != workspace_rows) {
      workspace = train_step_workspace(x, params);
      workspace_rows = rows;
    }
    auto [loss, hits] = step(x, targets.narrow(0, start, rows), workspace, lrs[s], s);
    losses.push_back(std::move(loss));
    correct.push_back(std::move(hits));
  }
  // One op for all the results: on a GPU, no copy (or sync) per step.
  return {at::stack(losses), at::stack(correct)};
}

std::tuple<at::Tensor, at::Tensor> train_epoch_sgd_kernel(
    const at::Tensor& images, const at::Tensor& labels, const at::Tensor& order, int64_t batch_size,
    const at::Tensor& lr, at::TensorList params, at::TensorList momentum_buffers, double momentum, double dampening,
    double weight_decay, bool nesterov, bool first_step, int64_t ignore_index, double label_smoothing,
    const std::optional<at::Tensor>& pixel_values) {
  return run_epoch(images, labels, order, batch_size, lr, params, ignore_index, pixel_values,
                   [&](const at::Tensor& x, const at::Tensor& y, at::TensorList workspace, double step_lr, int64_t s) {
                     return train_step_sgd(x, y, params, momentum_buffers, workspace, step_lr, momentum, dampening,
                                           weight_decay, nesterov, first_step && s == 0, ignore_index,
                                           label_smoothing);
                   });
}

// Adam's steps: the gradients (train_step_grads, into the workspace's last tensors), then one
// adam_update of every parameter at step count step + s + 1.
std::tuple<at::Tensor, at::Tensor> train_epoch_adam_kernel(
    const at::Tensor& images, const at::Tensor& labels, const at::Tensor& order, int64_t batch_size,
    const at::Tensor& lr, at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, int64_t step,
    double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay, int64_t ignore_index,
    double label_smoothing, const std::optional<at::Tensor>& pixel_values) {
  TORCH_CHECK_VALUE(step >= 0, "mnist_fast.train_epoch_adam: step (the steps already taken) must be >= 0, got ",
                    step);
  return run_epoch(images, labels, order, batch_size, lr, params, ignore_index, pixel_values,
                   [&](const at::Tensor& x, const at::Tensor& y, at::TensorList workspace, double step_lr, int64_t s) {
                     auto result = train_step_grads(x, y, params, workspace, ignore_index, label_smoothing);
                     const at::TensorList grads = workspace.slice(workspace.size() - params.size());
                     adam_update(params, grads, exp_avgs, exp_avg_sqs, step + s + 1, step_lr, beta1, beta2, eps,
                                 weight_decay, decoupled_weight_decay);
                     return result;
                   });
}

}  // namespace

// Every backend: the ops only gather and call the step, which dispatches to its own kernels.
TORCH_LIBRARY_IMPL(mnist_fast, CompositeExplicitAutograd, m) {
  m.impl("train_epoch_sgd", TORCH_FN(train_epoch_sgd_kernel));
  m.impl("train_epoch_adam", TORCH_FN(train_epoch_adam_kernel));
}

}  // namespace mnist_fast
