// Autograd for the forward ops, in C++ under the Autograd dispatch key (torchvision's pattern):
// a Python autograd wrapper costs more per call than a whole stock cross-entropy at batch 64.
//
// Each forward saves only what its backward op needs: the ReLU output (not the pre-activation) and
// the per-row logsumexp (not the log-softmax). The backward ops are registered ops of their own, so
// torch.compile sees only registered ops.
//
// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) is handled here too: a hand-built
// node has no jvp, and the no-graph fast path would drop a tangent silently.
#include <ATen/TensorOperators.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "ops.h"
#include "row_math.h"

namespace mnist_fast {
namespace {

using torch::autograd::variable_list;

// The backward nodes are plain torch::autograd::Nodes with SavedVariables, as PyTorch's generated
// nodes are: at batch 64 the bookkeeping of a torch::autograd::Function (CppNode: its context, the
// saved_data map, output wrapping) is a measurable share of a whole cross-entropy forward+backward.
using torch::autograd::SavedVariable;

// Builds node, its edges to `inputs` (an undefined tensor gets an invalid edge: no grad asked) and
// makes it the grad_fn of output.
template <typename NodeT>
void attach(const c10::intrusive_ptr<NodeT>& node, const variable_list& inputs, const at::Tensor& output) {
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  torch::autograd::set_history(output, node);
}

// A backward node whose saved tensors are one list, released together after backward (unless
// retain_graph). save(t, is_output): is_output for the node's own output (saved after attach).
class SavedTensorsNode : public torch::autograd::Node {
 public:
  explicit SavedTensorsNode(const char* name) : name_(name) {}
  std::string name() const override { return name_; }
  void release_variables() override {
    for (auto& v : saved_) v.reset_data();
  }
  void save(const at::Tensor& t, bool is_output = false) { saved_.emplace_back(t, is_output); }

 protected:
  at::Tensor saved(size_t i) { return saved_[i].unpack(getptr()); }

 private:
  const char* name_;
  std::vector<SavedVariable> saved_;
};

struct LinearReLUBackward : public SavedTensorsNode {
  // next edges: 0 input, 1 weight, 2 bias (invalid when absent); saved: input, weight, output
  LinearReLUBackward() : SavedTensorsNode("LinearReLUBackward") {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    if (!grads[0].defined()) return out;
    auto [grad_input, grad_weight, grad_bias] = linear_relu_backward(
        grads[0], saved(0), saved(1), saved(2),
        {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)});
    out[0] = std::move(grad_input);
    out[1] = std::move(grad_weight);
    out[2] = std::move(grad_bias);
    return out;
  }
};

struct CrossEntropyBackward : public SavedTensorsNode {
  // next edges: 0 input, 1 target (probabilities that require grad), 2 weight (when given);
  // saved: input, target, weight (undefined when absent), the row stats
  CrossEntropyBackward() : SavedTensorsNode("CrossEntropyBackward") {}
  bool has_weight = false;
  int64_t reduction = 0, ignore_index = 0;
  double label_smoothing = 0.0;

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!(has_weight && task_should_compute_output(2)),
                "mnist_fast.cross_entropy: the gradient with respect to weight is not implemented");
    variable_list out(num_outputs());
    const bool want_input = task_should_compute_output(0), want_target = task_should_compute_output(1);
    if (!grads[0].defined() || !(want_input || want_target)) return out;
    const std::optional<at::Tensor> w = has_weight ? std::optional<at::Tensor>(saved(2)) : std::nullopt;
    auto [grad_input, grad_target] = cross_entropy_backward(grads[0], saved(0), saved(1), w, saved(3), reduction,
                                                            ignore_index, label_smoothing, {want_input, want_target});
    out[0] = std::move(grad_input);
    out[1] = std::move(grad_target);
    return out;
  }
};

// The error of a derivative asked of a backward while it records a graph (create_graph=True):
// see forbid_double_backward.
void check_no_double_backward(bool recording, const char* op) {
  TORCH_CHECK(!recording, "mnist_fast: double backward of ", op,
              " is not supported (backward was called with create_graph=True); use stock "
              "torch.nn.functional for higher-order gradients");
}

// The node of the CPU path that computes the input's gradient in the forward
// (_cross_entropy_forward_backward): that gradient is for an incoming grad of 1, so backward only
// scales it, with no second pass over the logits. Saves the gradient (input's shape) instead of the
// input and the row stats.
struct CrossEntropyScaleBackward : public SavedTensorsNode {
  // next edges: 0 input; saved: the unit gradient
  CrossEntropyScaleBackward() : SavedTensorsNode("CrossEntropyBackward") {}
  bool per_row = false;  // reduction 'none': one incoming grad per row

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    if (!grads[0].defined() || !task_should_compute_output(0)) return out;
    // The saved gradient is a constant here: a graph of this product would miss its dependence on
    // the input, so higher-order gradients are refused as the backward op refuses them.
    check_no_double_backward(at::GradMode::is_enabled(), "cross_entropy");
    const auto unit = saved(0);
    // loss.backward()'s own incoming grad of 1: the saved gradient is the answer. It is handed on
    // (no copy, and AccumulateGrad then adopts it) unless the graph is kept for another backward,
    // which must find it intact.
    if (!per_row && !torch::autograd::get_current_graph_task_keep_graph() && is_plain_one(grads[0])) {
      out[0] = unit;
    } else {
      out[0] = per_row ? unit * grads[0].unsqueeze(1) : unit * grads[0];
    }
    return out;
  }

  // Whether g is an ordinary CPU float or double scalar tensor holding 1 (not a fake, functional or
  // functorch tensor, whose data cannot be read here).
  static bool is_plain_one(const at::Tensor& g) {
    constexpr c10::DispatchKeySet wrappers = c10::python_ks | c10::DispatchKeySet({c10::DispatchKey::Functionalize,
                                                                                   c10::DispatchKey::FuncTorchGradWrapper,
                                                                                   c10::DispatchKey::FuncTorchBatched});
    if (g.dim() != 0 || !g.is_cpu() || g.layout() != at::kStrided || g.is_neg() || g.key_set().has_any(wrappers) ||
        !g.has_storage()) {
      return false;
    }
    if (g.scalar_type() == at::kFloat) return *static_cast<const float*>(g.const_data_ptr()) == 1.0f;
    if (g.scalar_type() == at::kDouble) return *static_cast<const double*>(g.const_data_ptr()) == 1.0;
    return false;
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
  check_no_double_backward(records_graph(tensors...), op);
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
  auto output = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_relu(input, weight, bias);
  }();
  auto node = c10::make_intrusive<LinearReLUBackward>();
  attach(node, {input, weight, bias.value_or(at::Tensor())}, output);
  node->save(input);
  node->save(weight);
  node->save(output, /*is_output=*/true);
  return output;
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
  const at::Tensor w = weight.value_or(at::Tensor());
  // Only the input needs a gradient (the training loop's case): on the CPU, forward and backward in
  // one pass over the logits while they are in cache. bfloat16 and float16 take the two-op path,
  // whose gradient is rounded once, from float.
  const auto dtype = input.scalar_type();
  if (input.requires_grad() && input.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble) &&
      !(target.defined() && target.requires_grad()) && !(w.defined() && w.requires_grad())) {
    auto [loss, stats, unit_grad] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return cross_entropy_forward_backward(input, target, weight, reduction, ignore_index, label_smoothing);
    }();
    auto node = c10::make_intrusive<CrossEntropyScaleBackward>();
    attach(node, {input}, loss);
    node->save(unit_grad);  // no history: not differentiable
    node->per_row = reduction == row_math::kNone;
    return {loss, stats};
  }
  auto [loss, stats] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing);
  }();
  auto node = c10::make_intrusive<CrossEntropyBackward>();
  attach(node, {input, target, w}, loss);
  node->save(input);
  node->save(target);
  node->save(w);
  node->save(stats);  // no history: not differentiable
  node->has_weight = w.defined();
  node->reduction = reduction;
  node->ignore_index = ignore_index;
  node->label_smoothing = label_smoothing;
  return {loss, stats};
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

// The autograd kernel's own path, which returns the gradient: differentiating through it (a
// functorch transform over torch.func.grad / jacrev, say) asks for a higher-order derivative.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  forbid_double_backward("cross_entropy", input, target, weight.value_or(at::Tensor()));
  at::AutoDispatchBelowADInplaceOrView guard;
  return cross_entropy_forward_backward(input, target, weight, reduction, ignore_index, label_smoothing);
}

// ---- the optimizer ops (train_step_sgd, train_epoch_sgd, train_epoch_adam) ----
// Such an op is an optimizer step: it updates parameters (leaves that require grad) in place and
// its outputs have no gradient, like torch.optim.SGD.step() under no_grad. Its autograd kernel runs
// it below autograd (so the steps of an epoch skip their own autograd kernel) and bumps the version
// counters of what it wrote, the tensors of its list arguments, so that a graph that saved one of
// those tensors notices at backward time.

// Whether an argument carries a tangent: a tensor, or a tensor of a list; other arguments never do.
bool carries_tangent(const at::Tensor& t) {
  return has_tangent(t);
}
bool carries_tangent(at::TensorList list) {
  return std::any_of(list.begin(), list.end(), [](const at::Tensor& t) { return has_tangent(t); });
}
template <typename T>
bool carries_tangent(const T&) {
  return false;
}

void bump_versions(at::TensorList list) {
  for (const auto& t : list) torch::autograd::increment_version(t);
}
template <typename T>
void bump_versions(const T&) {}  // not a list: nothing the op wrote

// refuse_tangents: the op's name, when forward-mode AD is refused with an error (nullptr: no check).
template <auto op, const char* refuse_tangents, typename Signature = std::remove_pointer_t<decltype(op)>>
struct OptimizerAutograd;

template <auto op, const char* refuse_tangents, typename R, typename... Args>
struct OptimizerAutograd<op, refuse_tangents, R(Args...)> {
  static R call(Args... args) {
    if constexpr (refuse_tangents != nullptr) {
      TORCH_CHECK(!(... || carries_tangent(args)), refuse_tangents,
                  ": forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported: an optimizer "
                  "step has no derivative");
    }
    R out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op(args...);
    }
    (bump_versions(args), ...);
    return out;
  }
};

constexpr char kTrainStepSgd[] = "mnist_fast.train_step_sgd";
using TrainStepAutograd = OptimizerAutograd<train_step_sgd, kTrainStepSgd>;
// The epoch's steps run below autograd too: they see no tangent (none is refused, as before).
using TrainEpochAutograd = OptimizerAutograd<train_epoch_sgd, nullptr>;
using TrainEpochAdamAutograd = OptimizerAutograd<train_epoch_adam, nullptr>;

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
  m.impl("train_step_sgd", TORCH_FN(TrainStepAutograd::call));
  m.impl("train_epoch_sgd", TORCH_FN(TrainEpochAutograd::call));
  m.impl("train_epoch_adam", TORCH_FN(TrainEpochAdamAutograd::call));
  m.impl("train_step_grads", TORCH_FN(train_step_grads_autograd));
  m.impl("linear_relu", TORCH_FN(linear_relu_autograd));
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_autograd));
  m.impl("_linear_relu_backward", TORCH_FN(linear_relu_backward_autograd));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_autograd));
  m.impl("_cross_entropy_forward_backward", TORCH_FN(cross_entropy_forward_backward_autograd));
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

struct FusedMLPBackward : public SavedTensorsNode {
  // next edges: input, every weight, then the biases that exist, in layer order;
  // saved: input, the L weights, the L - 1 hidden outputs, then the output after a final log-softmax
  FusedMLPBackward() : SavedTensorsNode("FusedMLPBackward") {}
  std::vector<bool> has_bias;  // one per layer
  bool has_output = false;

  variable_list apply(variable_list&& grads) override {
    variable_list out(num_outputs());
    if (!grads[0].defined()) return out;  // the output took no part in what is differentiated
    const size_t layers = has_bias.size();
    std::vector<at::Tensor> w, h;
    for (size_t l = 0; l < layers; ++l) w.push_back(saved(1 + l));
    for (size_t l = 0; l + 1 < layers; ++l) h.push_back(saved(1 + layers + l));
    std::optional<at::Tensor> y;
    if (has_output) y = saved(2 * layers);
    c10::List<bool> mask({task_should_compute_output(0)});
    size_t edge = 1 + layers;
    for (size_t l = 0; l < layers; ++l) {
      mask.push_back(task_should_compute_output(1 + l));
      mask.push_back(has_bias[l] && task_should_compute_output(edge));
      edge += has_bias[l];
    }
    auto [grad_input, grad_weights, grad_biases] = fused_mlp_backward(grads[0], saved(0), w, h, y, mask);
    out[0] = std::move(grad_input);
    edge = 1 + layers;
    for (size_t l = 0; l < layers; ++l) {
      out[1 + l] = grad_weights.get(l).value_or(at::Tensor());
      if (has_bias[l]) out[edge++] = grad_biases.get(l).value_or(at::Tensor());
    }
    return out;
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
  auto [output, hidden] = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fused_mlp_forward(input, weights, biases, log_softmax);
  }();
  auto node = c10::make_intrusive<FusedMLPBackward>();
  variable_list edges{input};
  edges.insert(edges.end(), weights.begin(), weights.end());
  edges.insert(edges.end(), present_biases.begin(), present_biases.end());
  attach(node, edges, output);  // the hidden outputs get no history: they are not differentiable
  node->save(input);
  for (const auto& w : weights) node->save(w);
  for (const auto& h : hidden) node->save(h);
  for (size_t l = 0; l < biases.size(); ++l) node->has_bias.push_back(biases.get(l).has_value() && biases.get(l)->defined());
  if (log_softmax) {
    node->save(output, /*is_output=*/true);
    node->has_output = true;
  }
  return {output, std::move(hidden)};
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
