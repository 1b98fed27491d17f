// The one place where mnist_fast's operator schemas are declared, and the C++ entry points that
// call them through the dispatcher. Backend kernels live in cpu/ and cuda/, autograd in autograd.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

namespace mnist_fast {

// Looks an op up once and keeps its typed handle.
#define MNIST_FAST_OP(name, signature)                                                        \
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mnist_fast::" name, \
                                                                        "").typed<signature>()

at::Tensor linear_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  MNIST_FAST_OP("linear_relu", decltype(linear_relu));
  return op.call(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& output,
                                                                    std::array<bool, 3> output_mask) {
  MNIST_FAST_OP("_linear_relu_backward", decltype(linear_relu_backward));
  return op.call(grad_output, input, weight, output, output_mask);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t reduction, int64_t ignore_index,
                                                         double label_smoothing) {
  MNIST_FAST_OP("cross_entropy_forward", decltype(cross_entropy_forward));
  return op.call(input, target, weight, reduction, ignore_index, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                                          const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& logsumexp, int64_t reduction,
                                                          int64_t ignore_index, double label_smoothing,
                                                          std::array<bool, 2> output_mask) {
  MNIST_FAST_OP("_cross_entropy_backward", decltype(cross_entropy_backward));
  return op.call(grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing,
                 output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  MNIST_FAST_OP("_cross_entropy_forward_backward", decltype(cross_entropy_forward_backward));
  return op.call(input, target, weight, reduction, ignore_index, label_smoothing);
}

at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing) {
  return std::get<0>(cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing));
}

std::tuple<at::Tensor, at::Tensor> train_step_sgd(const at::Tensor& input, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers,
                                                  at::TensorList workspace, double lr, double momentum,
                                                  double dampening, double weight_decay, bool nesterov,
                                                  bool first_step, int64_t ignore_index, double label_smoothing) {
  MNIST_FAST_OP("train_step_sgd", decltype(train_step_sgd));
  return op.call(input, target, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                 nesterov, first_step, ignore_index, label_smoothing);
}

std::vector<at::Tensor> train_step_workspace(const at::Tensor& input, at::TensorList params) {
  check_train_step_params(input, params, "mnist_fast.train_step_workspace");
  std::vector<at::Tensor> workspace;
  for (const auto& shape : train_step_workspace_shapes(input.size(0), params)) {
    workspace.push_back(at::empty(shape, input.options()));
  }
  return workspace;
}

TORCH_LIBRARY(mnist_fast, m) {
  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "_linear_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index,"
      " float label_smoothing) -> (Tensor, Tensor)");
  m.def(
      "_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor logsumexp,"
      " int reduction, int ignore_index, float label_smoothing, bool[2] output_mask) -> (Tensor, Tensor)");
  // cross_entropy_forward and the input's gradient for an incoming grad of 1, in one pass (CPU; the
  // autograd kernel of cross_entropy_forward uses it when only the input needs a gradient).
  m.def(
      "_cross_entropy_forward_backward(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index,"
      " float label_smoothing) -> (Tensor, Tensor, Tensor)");
  // The loss alone, for users of torch.ops; decomposes into cross_entropy_forward.
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index,"
      " float label_smoothing) -> Tensor",
      TORCH_FN(cross_entropy));
  // One SGD training step of an MLP (Linear+ReLU layers, a last Linear, mean cross-entropy):
  // params [W_0, b_0, ...] and momentum_buffers (empty when momentum is 0) are updated in place as
  // torch.optim.SGD would; workspace comes from train_step_workspace. Returns (loss, correct).
  m.def(
      "train_step_sgd(Tensor input, Tensor target, Tensor(a!)[] params, Tensor(b!)[] momentum_buffers,"
      " Tensor(c!)[] workspace, float lr, float momentum, float dampening, float weight_decay, bool nesterov,"
      " bool first_step, int ignore_index, float label_smoothing) -> (Tensor loss, Tensor correct)");
  // The workspace train_step_sgd needs for input's batch size (layout in checks.h).
  m.def("train_step_workspace(Tensor input, Tensor[] params) -> Tensor[]", TORCH_FN(train_step_workspace));
}

// ---- fused_mlp: a whole MLP as one op (fused_mlp_impl.h) ----

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward(const at::Tensor& input, at::TensorList weights,
                                                                 const OptionalTensorList& biases, bool log_softmax) {
  MNIST_FAST_OP("fused_mlp_forward", decltype(fused_mlp_forward));
  return op.call(input, weights, biases, log_softmax);
}

at::Tensor fused_mlp(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
                     bool log_softmax) {
  return std::get<0>(fused_mlp_forward(input, weights, biases, log_softmax));
}

std::tuple<at::Tensor, OptionalTensorList, OptionalTensorList> fused_mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, at::TensorList hidden,
    const std::optional<at::Tensor>& output, const c10::List<bool>& output_mask) {
  MNIST_FAST_OP("_fused_mlp_backward", decltype(fused_mlp_backward));
  return op.call(grad_output, input, weights, hidden, output, output_mask);
}

TORCH_LIBRARY_FRAGMENT(mnist_fast, m) {
  // Returns the output and the hidden ReLU outputs that backward needs (non-differentiable).
  m.def(
      "fused_mlp_forward(Tensor input, Tensor[] weights, Tensor?[] biases, bool log_softmax=False)"
      " -> (Tensor output, Tensor[] hidden)");
  m.def(
      "_fused_mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor[] hidden, Tensor? output,"
      " bool[] output_mask) -> (Tensor grad_input, Tensor?[] grad_weights, Tensor?[] grad_biases)");
  // The output alone, for users of torch.ops; decomposes into fused_mlp_forward.
  m.def("fused_mlp(Tensor input, Tensor[] weights, Tensor?[] biases, bool log_softmax=False) -> Tensor",
        TORCH_FN(fused_mlp));
}

// ---- whole-epoch training (kernel: train_epoch.cpp) ----

std::tuple<at::Tensor, at::Tensor> train_epoch_sgd(const at::Tensor& images, const at::Tensor& labels,
                                                   const at::Tensor& order, int64_t batch_size, const at::Tensor& lr,
                                                   at::TensorList params, at::TensorList momentum_buffers,
                                                   double momentum, double dampening, double weight_decay,
                                                   bool nesterov, bool first_step, int64_t ignore_index,
                                                   double label_smoothing,
                                                   const std::optional<at::Tensor>& pixel_values) {
  MNIST_FAST_OP("train_epoch_sgd", decltype(train_epoch_sgd));
  return op.call(images, labels, order, batch_size, lr, params, momentum_buffers, momentum, dampening, weight_decay,
                 nesterov, first_step, ignore_index, label_smoothing, pixel_values);
}

std::tuple<at::Tensor, at::Tensor> train_epoch_adam(const at::Tensor& images, const at::Tensor& labels,
                                                    const at::Tensor& order, int64_t batch_size, const at::Tensor& lr,
                                                    at::TensorList params, at::TensorList exp_avgs,
                                                    at::TensorList exp_avg_sqs, int64_t step, double beta1,
                                                    double beta2, double eps, double weight_decay,
                                                    bool decoupled_weight_decay, int64_t ignore_index,
                                                    double label_smoothing,
                                                    const std::optional<at::Tensor>& pixel_values) {
  MNIST_FAST_OP("train_epoch_adam", decltype(train_epoch_adam));
  return op.call(images, labels, order, batch_size, lr, params, exp_avgs, exp_avg_sqs, step, beta1, beta2, eps,
                 weight_decay, decoupled_weight_decay, ignore_index, label_smoothing, pixel_values);
}

TORCH_LIBRARY_FRAGMENT(mnist_fast, m) {
  // The steps of an SGD epoch: batch s = images[order[s*batch_size:(s+1)*batch_size]] trained by
  // train_step_sgd with lr[s] (uint8 images: pixel_values[images[...]]); params and momentum_buffers
  // updated in place. Returns per-step (losses, correct).
  m.def(
      "train_epoch_sgd(Tensor images, Tensor labels, Tensor order, int batch_size, Tensor lr,"
      " Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, float momentum, float dampening, float weight_decay,"
      " bool nesterov, bool first_step, int ignore_index, float label_smoothing, Tensor? pixel_values=None)"
      " -> (Tensor losses, Tensor correct)");
  // The same epoch with Adam's (AdamW's) steps: train_step_grads, then adam_update at step count
  // step + s + 1 (step: the steps the state already took).
  m.def(
      "train_epoch_adam(Tensor images, Tensor labels, Tensor order, int batch_size, Tensor lr,"
      " Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, int step, float beta1, float beta2,"
      " float eps, float weight_decay, bool decoupled_weight_decay, int ignore_index, float label_smoothing,"
      " Tensor? pixel_values=None) -> (Tensor losses, Tensor correct)");
}

// ---- Adam / AdamW update (kernel: cpu/adam.cpp) ----

void adam_update(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled_weight_decay) {
  MNIST_FAST_OP("adam_update", decltype(adam_update));
  op.call(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay);
}

TORCH_LIBRARY_FRAGMENT(mnist_fast, m) {
  // torch.optim.Adam's update (AdamW's with decoupled_weight_decay), in place, given the gradients.
  m.def(
      "adam_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, int step,"
      " float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay) -> ()");
}

#undef MNIST_FAST_OP

}  // namespace mnist_fast

// ---- the gradients of a training step, without the update (kernels: cpu/ and cuda/train_step) ----
namespace mnist_fast {

std::tuple<at::Tensor, at::Tensor> train_step_grads(const at::Tensor& input, const at::Tensor& target,
                                                    at::TensorList params, at::TensorList workspace,
                                                    int64_t ignore_index, double label_smoothing) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mnist_fast::train_step_grads", "")
                             .typed<decltype(train_step_grads)>();
  return op.call(input, target, params, workspace, ignore_index, label_smoothing);
}

TORCH_LIBRARY_FRAGMENT(mnist_fast, m) {
  // train_step_sgd's forward, loss and backward: params are left as they are, the workspace holds
  // their gradients (FusedTrainer's Adam update and gradient all-reduce). Returns (loss, correct).
  m.def(
      "train_step_grads(Tensor input, Tensor target, Tensor[] params, Tensor(a!)[] workspace, int ignore_index,"
      " float label_smoothing) -> (Tensor loss, Tensor correct)");
}

}  // namespace mnist_fast
