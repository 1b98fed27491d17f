// Autograd for the forward ops, in C++ under the Autograd dispatch key (torchvision's pattern):
// a Python autograd wrapper costs more per call than a whole stock cross-entropy at batch 64.
//
// Each forward saves only what its backward op needs: the ReLU output (not the pre-activation) and
// the per-row logsumexp (not the log-softmax). The backward ops are registered ops of their own, so
// torch.compile sees only registered ops.
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is handled here too: a C++ autograd
// Function has no jvp, and the no-graph fast path would drop a tangent silently.
#include <ATen/TensorOperators.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>

#include "ops.h"
#include "row_math.h"

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

// ---- forward-mode AD ----
// A forward op given tangents computes its result from the primals (through the reverse-mode
// path, so both modes work at once), then the output's tangent with ATen ops, and attaches it, as
// PyTorch's generated autograd kernels do. C++ forward AD has one level, 0: functorch nests its
// transforms through wrappers, and each level reaches this kernel with its tangents at level 0.
constexpr int64_t kForwardLevel = 0;

at::Tensor tangent_of(const at::Tensor& t) {
  return t.defined() ? t._fw_grad(kForwardLevel) : at::Tensor();
}

template <typename... Tensors>
bool has_tangent(const Tensors&... tensors) {
  return (... || tangent_of(tensors).defined());
}

// t without its tangent: a view that keeps t's reverse-mode history.
at::Tensor primal_of(const at::Tensor& t) {
  return tangent_of(t).defined() ? t._fw_primal(kForwardLevel) : t;
}

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The backward ops have no derivative of their own. Called with inputs that require grad while
// grad mode is on (backward(create_graph=True), gradgradcheck) or that carry tangents
// (forward-over-reverse) they raise instead of returning a result whose derivative would
// silently be wrong.
template <typename... Tensors>
void forbid_double_backward(const char* op, const Tensors&... tensors) {
  TORCH_CHECK(!records_graph(tensors...), "mnist_fast: double backward of ", op,
              " is not supported (backward was called with create_graph=True); use stock "
              "torch.nn.functional for higher-order gradients");
  TORCH_CHECK(!has_tangent(tensors...), "mnist_fast: forward-mode AD through the backward of ", op,
              " (forward-over-reverse, as in torch.func.hessian or jacfwd(jacrev(f))) is not supported; use "
              "stock torch.nn.functional for higher-order derivatives");
}

at::Tensor linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);

// relu(x W^T + b) has the tangent dx W^T + x dW^T + db where the output is positive, 0 elsewhere
// (torch.relu's mask, threshold_backward).
at::Tensor linear_relu_forward_ad(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) {
  const auto x = primal_of(input), w = primal_of(weight), b = primal_of(bias);
  auto output = linear_relu_autograd(x, w, optional_of(b));
  at::Tensor pre;
  const auto add = [&pre](const at::Tensor& term) { pre = pre.defined() ? pre + term : term; };
  if (const auto dx = tangent_of(input); dx.defined()) add(at::matmul(dx, w.t()));
  if (const auto dw = tangent_of(weight); dw.defined()) add(at::matmul(x, dw.t()));
  if (const auto db = tangent_of(bias); db.defined()) add(db.expand(output.sizes()));
  output._set_fw_grad(at::threshold_backward(pre, output, 0), kForwardLevel, /*is_inplace_op=*/false);
  return output;
}

at::Tensor linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  if (has_tangent(input, weight, bias.value_or(at::Tensor()))) {
    return linear_relu_forward_ad(input, weight, bias.value_or(at::Tensor()));
  }
  if (!records_graph(input, weight, bias.value_or(at::Tensor()))) {  // evaluation: no node to build
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_relu(input, weight, bias);
  }
  return LinearReLUFunction::apply(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_autograd(const at::Tensor& input, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t reduction, int64_t ignore_index,
                                                                  double label_smoothing);

// The loss is a sum of per-row terms (or, for reduction 'none', one per row), so its tangent is
// the gradient contracted with the tangents: sum_c dloss/dx[i, c] dx[i, c] (and the same for
// probability targets), the gradient being the backward op's with an incoming grad of ones.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_ad(const at::Tensor& input, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t reduction, int64_t ignore_index,
                                                            double label_smoothing) {
  TORCH_CHECK(!has_tangent(weight.value_or(at::Tensor())),
              "mnist_fast.cross_entropy: forward-mode AD with respect to weight is not implemented");
  const auto x = primal_of(input), t = primal_of(target);
  const auto dx = tangent_of(input), dt = tangent_of(target);
  auto [loss, lse] = cross_entropy_forward_autograd(x, t, weight, reduction, ignore_index, label_smoothing);
  // From detached tensors: the backward op refuses to record a graph (and under torch.func a guard
  // below autograd would not reach past the transform's own levels).
  const auto detached = [](const at::Tensor& v) { return v.defined() ? v.detach() : v; };
  auto [grad_x, grad_t] = cross_entropy_backward(at::ones_like(loss), x.detach(), detached(t),
                                                 optional_of(detached(weight.value_or(at::Tensor()))), lse.detach(),
                                                 reduction, ignore_index, label_smoothing, {dx.defined(), dt.defined()});
  // That gradient has no derivative (double backward is not supported): differentiating the
  // tangent in reverse mode with respect to input or target (reverse-over-forward) must raise.
  if (records_graph(x, t)) {
    const auto node = c10::make_intrusive<torch::autograd::Error>(
        "mnist_fast: the reverse-mode derivative of cross_entropy's forward-mode tangent (reverse-over-forward) "
        "is not supported; use stock torch.nn.functional for higher-order derivatives",
        torch::autograd::collect_next_edges(x, t));
    for (auto* g : {&grad_x, &grad_t}) {
      if (g->defined()) torch::autograd::set_history(*g, node);
    }
  }
  at::Tensor tangent;
  for (const auto& [grad, dir] : {std::pair(grad_x, dx), std::pair(grad_t, dt)}) {
    if (!dir.defined()) continue;
    const auto product = grad * dir;
    const auto term = reduction == row_math::kNone ? product.sum(1) : product.sum();
    tangent = tangent.defined() ? tangent + term : term;
  }
  loss._set_fw_grad(tangent, kForwardLevel, /*is_inplace_op=*/false);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_autograd(const at::Tensor& input, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t reduction, int64_t ignore_index,
                                                                  double label_smoothing) {
  if (has_tangent(input, target, weight.value_or(at::Tensor()))) {
    return cross_entropy_forward_ad(input, target, weight, reduction, ignore_index, label_smoothing);
  }
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
  bool tangents = has_tangent(input, target);
  for (auto list : {params, momentum_buffers, workspace}) {
    for (const auto& t : list) tangents = tangents || has_tangent(t);
  }
  TORCH_CHECK(!tangents, "mnist_fast.train_step_sgd: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
              "is not supported: an optimizer step has no derivative");
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

// The gradients alone: no derivative either; only the workspace is written.
std::tuple<at::Tensor, at::Tensor> train_step_grads_autograd(const at::Tensor& input, const at::Tensor& target,
                                                             at::TensorList params, at::TensorList workspace,
                                                             int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(!has_tangent(input, target) && !torch::autograd::isFwGradDefinedTensorList(params),
              "mnist_fast.train_step_grads: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
              "supported");
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = train_step_grads(input, target, params, workspace, ignore_index, label_smoothing);
  for (const auto& t : workspace) torch::autograd::increment_version(t);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, Autograd, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_autograd));
  m.impl("train_step_grads", TORCH_FN(train_step_grads_autograd));
  m.impl("linear_relu", TORCH_FN(linear_relu_autograd));
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_autograd));
  m.impl("_linear_relu_backward", TORCH_FN(linear_relu_backward_autograd));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_autograd));
}

}  // namespace mnist_fast

// ---- fused_mlp: the whole MLP is one graph node ----
// It saves the input and weights (for the GEMMs), the hidden ReLU outputs (for the masks) and,
// after a log-softmax, the output (its backward needs only that); no pre-activations.
namespace mnist_fast {
namespace {

// Forward-mode AD has no rule here: a tangent would silently come out as zero, so refuse instead.
void forbid_forward_ad(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases) {
  using namespace torch::autograd;
  TORCH_CHECK(!isFwGradDefined(input) && !isFwGradDefinedTensorList(weights) && !isFwGradDefinedTensorList(biases), "mnist_fast.fused_mlp: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
              "supported; run the stock layers for it (mnist_fast.nn.unfuse(model))");
}

class FusedMLPFunction : public torch::autograd::Function<FusedMLPFunction> {
 public:
  // present_biases: the biases that exist, as tensors, so that each gets an autograd edge; biases
  // (every layer's entry, None included) is what the op takes.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::TensorList weights,
                               at::TensorList present_biases, const OptionalTensorList& biases, bool log_softmax) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, hidden] = fused_mlp_forward(input, weights, biases, log_softmax);
    variable_list saved{input};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    if (log_softmax) saved.push_back(output);
    ctx->save_for_backward(saved);
    c10::List<bool> has_bias;
    for (size_t l = 0; l < biases.size(); ++l) has_bias.push_back(biases.get(l).has_value());
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["log_softmax"] = log_softmax;
    ctx->mark_non_differentiable(hidden);
    ctx->set_materialize_grads(false);  // no zero-filled grads for the hidden outputs, which have none
    variable_list outputs{output};
    outputs.insert(outputs.end(), hidden.begin(), hidden.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto has_bias = ctx->saved_data["has_bias"].toBoolList();
    const bool log_softmax = ctx->saved_data["log_softmax"].toBool();
    const size_t layers = has_bias.size();
    // One result per forward argument: input, the weights, the present biases, biases, log_softmax.
    variable_list result;
    if (!grads[0].defined()) {  // the output took no part in what is differentiated
      result.resize(1 + layers + std::count(has_bias.begin(), has_bias.end(), true) + 2);
      return result;
    }
    const at::TensorList weights(saved.data() + 1, layers);
    const at::TensorList hidden(saved.data() + 1 + layers, layers - 1);
    std::optional<at::Tensor> output;
    if (log_softmax) output = saved.back();
    // Edges: input, every weight, then the biases that exist, in layer order.
    c10::List<bool> mask({ctx->needs_input_grad(0)});
    size_t edge = 1 + layers;
    for (size_t l = 0; l < layers; ++l) {
      mask.push_back(ctx->needs_input_grad(1 + l));
      mask.push_back(has_bias.get(l) && ctx->needs_input_grad(edge));
      edge += has_bias.get(l);
    }
    auto [grad_input, grad_weights, grad_biases] =
        fused_mlp_backward(grads[0], saved[0], weights, hidden, output, mask);
    result.push_back(grad_input);
    for (size_t l = 0; l < layers; ++l) result.push_back(grad_weights.get(l).value_or(at::Tensor()));
    for (size_t l = 0; l < layers; ++l) {
      if (has_bias.get(l)) result.push_back(grad_biases.get(l).value_or(at::Tensor()));
    }
    result.push_back(at::Tensor());
    result.push_back(at::Tensor());
    return result;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward_autograd(const at::Tensor& input,
                                                                          at::TensorList weights,
                                                                          const OptionalTensorList& biases,
                                                                          bool log_softmax) {
  forbid_forward_ad(input, weights, biases);
  std::vector<at::Tensor> present_biases;
  for (size_t l = 0; l < biases.size(); ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) present_biases.push_back(*b);
  }
  bool graph = records_graph(input);
  for (const auto& w : weights) graph = graph || records_graph(w);
  for (const auto& b : present_biases) graph = graph || records_graph(b);
  if (!graph) {  // evaluation: no node to build
    at::AutoDispatchBelowADInplaceOrView guard;
    return fused_mlp_forward(input, weights, biases, log_softmax);
  }
  auto out = FusedMLPFunction::apply(input, weights, at::TensorList(present_biases), biases, log_softmax);
  at::Tensor output = out[0];
  out.erase(out.begin());
  return {output, std::move(out)};
}

std::tuple<at::Tensor, OptionalTensorList, OptionalTensorList> fused_mlp_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, at::TensorList hidden,
    const std::optional<at::Tensor>& output, const c10::List<bool>& output_mask) {
  bool graph = records_graph(grad_output, input, output.value_or(at::Tensor()));
  for (const auto& w : weights) graph = graph || records_graph(w);
  for (const auto& h : hidden) graph = graph || records_graph(h);
  TORCH_CHECK(!graph, "mnist_fast: double backward of fused_mlp is not supported (backward was called with "
              "create_graph=True); use stock torch.nn layers for higher-order gradients");
  at::AutoDispatchBelowADInplaceOrView guard;
  return fused_mlp_backward(grad_output, input, weights, hidden, output, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, Autograd, m) {
  m.impl("fused_mlp_forward", TORCH_FN(fused_mlp_forward_autograd));
  m.impl("_fused_mlp_backward", TORCH_FN(fused_mlp_backward_autograd));
}

}  // namespace mnist_fast
