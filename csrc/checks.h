// Argument checks shared by every backend. Each kernel entry point calls one of the check_*_args
// functions first, so the CPU and CUDA paths reject exactly the same inputs with the same message,
// and nothing reaches a kernel loop that could read out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "row_math.h"

namespace mnist_fast {

inline bool is_supported_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t), op, ": expected ", name,
                   " to be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// `t` must live on the same device and have the same dtype as `ref`.
inline void check_same_kind(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                            const char* name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have the same dtype as ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// ---- linear_relu ----

inline void check_linear_relu_args(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "mnist_fast.linear_relu";
  check_float(input, op, "input");
  check_same_kind(input, "input", weight, "weight", op);
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": expected input of shape (*, in_features) with at least 1 dimension, got a ",
                    input.dim(), "-d tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": expected weight of shape (out_features, in_features), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(-1) == weight.size(1), op, ": input has ", input.size(-1),
                    " features in its last dimension but weight expects in_features = ", weight.size(1),
                    " (input shape ", input.sizes(), ", weight shape ", weight.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    check_same_kind(input, "input", *bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": expected bias of shape (", weight.size(0), ",), got shape ", bias->sizes());
  }
}

inline void check_linear_relu_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& weight, const at::Tensor& output) {
  constexpr const char* op = "mnist_fast.linear_relu_backward";
  check_linear_relu_args(input, weight, std::nullopt);
  check_same_kind(input, "input", grad_output, "grad_output", op);
  check_same_kind(input, "input", output, "output", op);
  auto expected = input.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK_VALUE(output.sizes() == at::IntArrayRef(expected), op, ": expected output of shape ",
                    at::IntArrayRef(expected), ", got ", output.sizes());
  TORCH_CHECK_VALUE(grad_output.sizes() == output.sizes(), op, ": expected grad_output of shape ",
                    output.sizes(), ", got ", grad_output.sizes());
}

// ---- cross_entropy ----

// The two kinds of target F.cross_entropy accepts.
enum class TargetKind { ClassIndex, Probability };

inline TargetKind check_cross_entropy_args(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "mnist_fast.cross_entropy";
  check_float(input, op, "input");
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": expected input of shape (N, C), got shape ", input.sizes(),
                    " (the Python function reshapes (C,) and (N, C, d1, ...) inputs)");
  TORCH_CHECK(target.device() == input.device(), op, ": expected target on the same device as input (",
              input.device(), "), got ", target.device());
  TORCH_CHECK_VALUE(reduction == row_math::kNone || reduction == row_math::kMean || reduction == row_math::kSum,
                    op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
  const int64_t classes = input.size(1);
  if (weight.has_value() && weight->defined()) {
    check_same_kind(input, "input", *weight, "weight", op);
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == classes, op,
                      ": expected a weight for each of the ", classes, " classes, got weight of shape ",
                      weight->sizes());
  }
  if (target.dim() == 2) {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), op,
                      ": probability targets must have the shape of input ", input.sizes(), ", got ",
                      target.sizes());
    TORCH_CHECK_TYPE(target.is_floating_point(), op,
                     ": expected a floating-point target for class probabilities, got ", target.scalar_type());
    TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), op,
                     ": expected probability targets with the dtype of input (", input.scalar_type(), "), got ",
                     target.scalar_type());
    TORCH_CHECK_VALUE(ignore_index < 0, op, ": ignore_index is not supported for probability targets");
    return TargetKind::Probability;
  }
  TORCH_CHECK_VALUE(target.dim() == 1, op, ": expected target of shape (N,) with class indices or (N, C) with ",
                    "class probabilities, got shape ", target.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
                   ": expected class-index targets of dtype int64 (or uint8), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == input.size(0), op, ": expected input batch_size (", input.size(0),
                    ") to match target batch_size (", target.size(0), ")");
  return TargetKind::ClassIndex;
}

// Class-index targets as the kernels read them: contiguous int64 (uint8 targets are widened).
inline at::Tensor index_targets(const at::Tensor& target) {
  return target.scalar_type() == at::kLong ? target.contiguous() : target.to(at::kLong).contiguous();
}

// dtype of the saved per-row statistics (row_math.h's SavedRowStats, kRowStats values a row):
// float64 whatever the input. It costs 16 bytes a row.
inline at::ScalarType logsumexp_dtype(at::ScalarType) {
  return at::kDouble;
}

// The backward op takes the forward's arguments plus the incoming grad and the saved logsumexp.
inline TargetKind check_cross_entropy_backward_args(const at::Tensor& grad_loss, const at::Tensor& input,
                                                    const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& logsumexp, int64_t reduction,
                                                    int64_t ignore_index, double label_smoothing) {
  constexpr const char* op = "mnist_fast.cross_entropy_backward";
  const auto kind = check_cross_entropy_args(input, target, weight, reduction, ignore_index, label_smoothing);
  check_same_kind(input, "input", grad_loss, "grad_loss", op);
  if (reduction == row_math::kNone) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == input.size(0), op,
                      ": expected grad_loss of shape (", input.size(0), ",), got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.dim() == 0, op, ": expected a 0-d grad_loss, got shape ", grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(logsumexp.dim() == 2 && logsumexp.size(0) == input.size(0) &&
                        logsumexp.size(1) == row_math::kRowStats,
                    op, ": expected logsumexp of shape (", input.size(0), ", ", row_math::kRowStats, "), got ",
                    logsumexp.sizes());
  TORCH_CHECK(logsumexp.device() == input.device(), op, ": expected logsumexp on the same device as input");
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == logsumexp_dtype(input.scalar_type()), op,
                   ": expected logsumexp of dtype ", logsumexp_dtype(input.scalar_type()), ", got ",
                   logsumexp.scalar_type());
  return kind;
}

// ---- train_step_sgd ----
// An MLP of L layers: params = [W_0, b_0, ..., W_{L-1}, b_{L-1}], W_l of shape (out_l, in_l), a ReLU
// after every layer but the last, class logits out of the last.

// The workspace of one step for a batch of `rows`, in order:
//   [0, L)        the output of each layer (N, out_l); the last one holds the logits, then their grad
//   [L, 2L - 1)   the grad of each hidden layer's output (N, out_l), masked in place by the ReLU
//   [2L - 1, 4L - 1)  the grad of each parameter, shaped and ordered as params
inline std::vector<std::vector<int64_t>> train_step_workspace_shapes(int64_t rows, at::TensorList params) {
  const size_t layers = params.size() / 2;
  std::vector<std::vector<int64_t>> shapes;
  for (size_t l = 0; l < layers; ++l) shapes.push_back({rows, params[2 * l].size(0)});
  for (size_t l = 0; l + 1 < layers; ++l) shapes.push_back({rows, params[2 * l].size(0)});
  for (const auto& p : params) shapes.push_back(p.sizes().vec());
  return shapes;
}

// The tensors of one step by role: params and the workspace in the layout above.
struct TrainStepTensors {
  at::Tensor input;  // (N, in_0), contiguous
  at::TensorList params;
  at::TensorList workspace;

  int64_t layers() const { return static_cast<int64_t>(params.size() / 2); }
  at::Tensor weight(int64_t l) const { return params[2 * l]; }
  at::Tensor bias(int64_t l) const { return params[2 * l + 1]; }
  // The output of layer l (the last one: the logits, then their grad) and the input of layer l.
  at::Tensor output(int64_t l) const { return workspace[l]; }
  at::Tensor layer_input(int64_t l) const { return l == 0 ? input : output(l - 1); }
  // The grad of hidden layer l's output, masked in place by its ReLU.
  at::Tensor output_grad(int64_t l) const { return workspace[layers() + l]; }
  // The grad of params[k].
  at::Tensor param_grad(int64_t k) const { return workspace[2 * layers() - 1 + k]; }
};

// Checks the layer chain of params against the input width; every parameter must be a contiguous
// float32/float64 tensor with input's dtype and device (they are updated in place).
inline void check_train_step_params(const at::Tensor& input, at::TensorList params, const char* op) {
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                   ": expected float32 or float64 input, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": expected input of shape (N, in_features), got shape ", input.sizes());
  TORCH_CHECK_VALUE(params.size() >= 2 && params.size() % 2 == 0, op,
                    ": expected params [weight_0, bias_0, ..., weight_L-1, bias_L-1] (an even, non-zero count), got ",
                    params.size(), " tensors");
  int64_t features = input.size(1);
  for (size_t l = 0; l < params.size() / 2; ++l) {
    const auto& w = params[2 * l];
    const auto& b = params[2 * l + 1];
    check_same_kind(input, "input", w, "every weight", op);
    check_same_kind(input, "input", b, "every bias", op);
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": expected weight ", l, " of shape (out_features, in_features), got shape ",
                      w.sizes());
    TORCH_CHECK_VALUE(w.size(1) == features, op, ": layer ", l, " expects ", w.size(1), " input features but ",
                      l == 0 ? "the input has " : "the previous layer gives ", features,
                      l == 0 ? " (input shape " : " (weight shape ", l == 0 ? input.sizes() : params[2 * l - 2].sizes(),
                      ", weight ", l, " shape ", w.sizes(), ")");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, ": expected bias ", l, " of shape (", w.size(0),
                      ",), got shape ", b.sizes());
    TORCH_CHECK(w.is_contiguous() && b.is_contiguous(), op, ": parameters of layer ", l,
                " must be contiguous (they are updated in place)");
    features = w.size(0);
  }
}

// torch.optim.SGD's checks, with its messages (FusedTrainer checks its options here too).
inline void check_sgd_options(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                              const char* op) {
  TORCH_CHECK_VALUE(lr >= 0.0, op, ": Invalid learning rate: ", lr);
  TORCH_CHECK_VALUE(momentum >= 0.0, op, ": Invalid momentum value: ", momentum);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, op, ": Invalid weight_decay value: ", weight_decay);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0), op,
                    ": Nesterov momentum requires a momentum and zero dampening");
}

inline void check_train_step_args(const at::Tensor& input, const at::Tensor& target, at::TensorList params,
                                  at::TensorList momentum_buffers, at::TensorList workspace, double lr,
                                  double momentum, double dampening, double weight_decay, bool nesterov,
                                  double label_smoothing, const char* op = "mnist_fast.train_step_sgd") {
  check_train_step_params(input, params, op);
  TORCH_CHECK(target.device() == input.device(), op, ": expected target on the same device as input (",
              input.device(), "), got ", target.device());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": expected class-index targets of dtype int64, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), op, ": expected target of shape (",
                    input.size(0), ",) (one class index per input row), got shape ", target.sizes());
    check_sgd_options(lr, momentum, dampening, weight_decay, nesterov, op);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
  if (momentum == 0.0) {
    TORCH_CHECK_VALUE(momentum_buffers.empty(), op, ": expected no momentum buffers when momentum is 0, got ",
                      momentum_buffers.size());
  } else {
    TORCH_CHECK_VALUE(momentum_buffers.size() == params.size(), op, ": expected one momentum buffer per parameter (",
                      params.size(), "), got ", momentum_buffers.size());
    for (size_t i = 0; i < params.size(); ++i) {
      check_same_kind(params[i], "its parameter", momentum_buffers[i], "every momentum buffer", op);
      TORCH_CHECK_VALUE(momentum_buffers[i].sizes() == params[i].sizes() && momentum_buffers[i].is_contiguous(), op,
                        ": expected momentum buffer ", i, " to be contiguous of shape ", params[i].sizes(), ", got ",
                        momentum_buffers[i].sizes());
    }
  }
  const auto shapes = train_step_workspace_shapes(input.size(0), params);
  TORCH_CHECK_VALUE(workspace.size() == shapes.size(), op, ": expected a workspace of ", shapes.size(),
                    " tensors for ", params.size() / 2, " layers, got ", workspace.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    check_same_kind(input, "input", workspace[i], "every workspace tensor", op);
    TORCH_CHECK_VALUE(workspace[i].sizes() == at::IntArrayRef(shapes[i]) && workspace[i].is_contiguous(), op,
                      ": expected workspace tensor ", i, " to be contiguous of shape ", at::IntArrayRef(shapes[i]),
                      ", got ", workspace[i].sizes(), " (allocate it with train_step_workspace for this batch size)");
  }
}

}  // namespace mnist_fast
