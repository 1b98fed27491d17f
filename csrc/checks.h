// Argument checks shared by every backend. Each kernel entry point calls one of the check_*_args
// functions first, so the CPU and CUDA paths reject exactly the same inputs with the same message,
// and nothing reaches a kernel loop that could read out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

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

// dtype of the saved per-row logsumexp: float64 whatever the input, so that x - lse keeps its
// digits for large logits (see row_math.h). It costs 8 bytes a row.
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
  TORCH_CHECK_VALUE(logsumexp.dim() == 1 && logsumexp.size(0) == input.size(0), op,
                    ": expected logsumexp of shape (", input.size(0), ",), got ", logsumexp.sizes());
  TORCH_CHECK(logsumexp.device() == input.device(), op, ": expected logsumexp on the same device as input");
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == logsumexp_dtype(input.scalar_type()), op,
                   ": expected logsumexp of dtype ", logsumexp_dtype(input.scalar_type()), ", got ",
                   logsumexp.scalar_type());
  return kind;
}

}  // namespace mnist_fast
