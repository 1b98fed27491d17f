// Autograd for the forward ops, in C++ under the Autograd dispatch key (torchvision's pattern):
// a Python autograd wrapper costs more per call than a whole stock cross-entropy at batch 64.
//
// Each forward saves only what its backward op needs: the ReLU output (not the pre-activation) and
// the per-row logsumexp (not the log-softmax). The backward ops are registered ops of their own, so
// torch.compile sees only registered ops.
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "ops.h"

namespace mnist_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An absent optional tensor has no autograd edge: needs_input_grad(i) counts given tensors only.
// bias and weight are the last tensor arguments, so the edges before them never shift.
bool present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}


class LinearReLUFunction : public torch::autograd::Function<LinearReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto output = linear_relu(input, weight, bias);
    ctx->save_for_backward({input, weight, output});
    ctx->saved_data["has_bias"] = present(bias);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_input, grad_weight, grad_bias] = linear_relu_backward(
        grads[0], saved[0], saved[1], saved[2],
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
         ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)});
    return {grad_input, grad_weight, grad_bias};
  }
};

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                               double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse] = cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing);
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), lse});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(!(saved[2].defined() && ctx->needs_input_grad(2)),
                "mnist_fast.cross_entropy: the gradient with respect to weight is not implemented");
    const std::optional<at::Tensor> weight =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    auto [grad_input, grad_target] = cross_entropy_backward(
        grads[0], saved[0], saved[1], weight, saved[3], ctx->saved_data["reduction"].toInt(),
        ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
    return {grad_input, grad_target, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether autograd records a graph for an op on these tensors.
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (... || (tensors.defined() && tensors.requires_grad()));
}

// The backward ops have no derivative of their own. Called with inputs that require grad while
// grad mode is on (backward(create_graph=True), gradgradcheck) they raise instead of returning a
// result whose gradient would silently be wrong.
template <typename... Tensors>
void forbid_double_backward(const char* op, const Tensors&... tensors) {
  TORCH_CHECK(!records_graph(tensors...), "mnist_fast: double backward of ", op,
              " is not supported (backward was called with create_graph=True); use stock "
              "torch.nn.functional for higher-order gradients");
}

at::Tensor linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  if (!records_graph(input, weight, bias.value_or(at::Tensor()))) {  // evaluation: no node to build
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_relu(input, weight, bias);
  }
  return LinearReLUFunction::apply(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_autograd(const at::Tensor& input, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t reduction, int64_t ignore_index,
                                                                  double label_smoothing) {
  if (!records_graph(input, target, weight.value_or(at::Tensor()))) {  // evaluation: no node to build
    at::AutoDispatchBelowADInplaceOrView guard;
    return cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing);
  }
  auto out = CrossEntropyFunction::apply(input, target, weight, reduction, ignore_index, label_smoothing);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_autograd(const at::Tensor& grad_output,
                                                                             const at::Tensor& input,
                                                                             const at::Tensor& weight,
                                                                             const at::Tensor& output,
                                                                             std::array<bool, 3> output_mask) {
  forbid_double_backward("linear_relu", grad_output, input, weight, output);
  at::AutoDispatchBelowADInplaceOrView guard;
  return linear_relu_backward(grad_output, input, weight, output, output_mask);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_backward_autograd(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& logsumexp, int64_t reduction, int64_t ignore_index,
    double label_smoothing, std::array<bool, 2> output_mask) {
  forbid_double_backward("cross_entropy", grad_loss, input, target, logsumexp, weight.value_or(at::Tensor()));
  at::AutoDispatchBelowADInplaceOrView guard;
  return cross_entropy_backward(grad_loss, input, target, weight, logsumexp, reduction, ignore_index,
                                label_smoothing, output_mask);
}

// The training step is an optimizer step: it updates parameters (leaves that require grad) in place
// and its outputs have no gradient, like torch.optim.SGD.step() under no_grad. It runs below
// autograd and bumps the version counters of what it wrote, so a graph that saved one of those
// tensors notices at backward time.
std::tuple<at::Tensor, at::Tensor> train_step_sgd_autograd(const at::Tensor& input, const at::Tensor& target,
                                                           at::TensorList params, at::TensorList momentum_buffers,
                                                           at::TensorList workspace, double lr, double momentum,
                                                           double dampening, double weight_decay, bool nesterov,
                                                           bool first_step, int64_t ignore_index,
                                                           double label_smoothing) {
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = train_step_sgd(input, target, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                         nesterov, first_step, ignore_index, label_smoothing);
  }
  for (auto list : {params, momentum_buffers, workspace}) {
    for (const auto& t : list) torch::autograd::increment_version(t);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, Autograd, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_autograd));
  m.impl("linear_relu", TORCH_FN(linear_relu_autograd));
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_autograd));
  m.impl("_linear_relu_backward", TORCH_FN(linear_relu_backward_autograd));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_autograd));
}

}  // namespace mnist_fast
