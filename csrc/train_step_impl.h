// The fused SGD training step (train_step_sgd) and its gradient-only form (train_step_grads): the
// argument checks and entry points every backend shares, and the sequential schedule CUDA runs
// (the CPU splits the same passes between its threads: cpu/train_step.cpp). A backend registers
// train_step_sgd_impl<its step> and train_step_grads_impl<its step>; the sequential step,
// train_step<Kernels>, takes a struct of the backend's kernels with these static functions:
//   valid_rows(target, classes, ignore_index)        raises IndexError for a class index out of
//                                                    range; returns the number of rows not ignored
//   bias_relu_inplace(z, bias)                       z = relu(z + bias), linear_relu's epilogue
//   loss_and_logit_grad(logits, bias, target, valid_rows, ignore_index, label_smoothing,
//                       grad_bias, loss, correct)    adds the last bias, writes the mean loss, the
//                                                    correct count, d loss / d logits over the
//                                                    logits and its column sums as grad_bias
//   mask_grad(grad, output, grad, grad_bias)         linear_relu's backward pass, in place
//   sgd_update(param, grad, buffer, options)         torch.optim.SGD's update (buffer undefined
//                                                    when momentum is 0)
//
// For layers l = 0..L-1 (ReLU after every layer but the last), A_{-1} = input:
//   forward    Z_l = A_{l-1} W_l^T (GEMM), then bias+ReLU in place
//   loss       one pass over the logits: last bias, argmax, log-softmax+NLL (mean), and the logit
//              grad written over the logits, with the last bias grad
//   backward   G_{l-1} = dZ_l W_l (GEMM, with the not yet updated W_l), grad W_l = dZ_l^T A_{l-1}
//              (GEMM), then the ReLU mask of G_{l-1} in place with the bias grad in the same pass
//   update     SGD of W_l and b_l as soon as their grads exist (every grad depends on the old
//              parameters only, so this is the math of a stock step)
// train_step_grads_impl is the same pass without the update: the parameters stay as they are and
// the workspace holds their gradients, for an update made elsewhere (Adam's; an all-reduce first).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/record_function.h>
#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <vector>

#include "checks.h"

namespace mnist_fast {

// The options of torch.optim.SGD for one step; the kernels turn them into row_math::SgdOptions.
struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
  bool first_step;  // no momentum buffer yet: it starts as the gradient
};

// The step on checked arguments; sgd null: the gradients only.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> train_step(const at::Tensor& input, const at::Tensor& target_, at::TensorList params,
                                              at::TensorList momentum_buffers, at::TensorList workspace,
                                              const SgdArgs* sgd, int64_t ignore_index, double label_smoothing) {
  // After the checks, so that an input on the wrong device gets their message (not a CUDAGuard's).
  const c10::OptionalDeviceGuard guard(input.device());
  const TrainStepTensors s{input.contiguous(), params, workspace};
  const auto target = target_.contiguous();
  const int64_t layers = s.layers(), last = layers - 1;
  // Every target is validated before anything is written.
  const int64_t valid_rows = Kernels::valid_rows(target, s.weight(last).size(0), ignore_index);

  at::Tensor loss = at::empty({}, input.options());
  at::Tensor correct = at::empty({}, input.options().dtype(at::kLong));
  // The phases are named for torch.profiler (free when it is off).
  {
    RECORD_FUNCTION("mnist_fast::train_step_sgd::forward", std::vector<c10::IValue>());
    for (int64_t l = 0; l < layers; ++l) {
      auto z = s.output(l);
      at::mm_out(z, s.layer_input(l), s.weight(l).t());
      if (l < last) Kernels::bias_relu_inplace(z, s.bias(l));
    }
  }
  {
    RECORD_FUNCTION("mnist_fast::train_step_sgd::loss", std::vector<c10::IValue>());
    auto logits = s.output(last);
    auto last_bias_grad = s.param_grad(2 * last + 1);
    Kernels::loss_and_logit_grad(logits, s.bias(last), target, valid_rows, ignore_index, label_smoothing,
                                 last_bias_grad, loss, correct);
  }
  for (int64_t l = last; l >= 0; --l) {
    const at::Tensor dz = l == last ? s.output(l) : s.output_grad(l);  // d loss / d pre-activation of layer l
    {
      RECORD_FUNCTION("mnist_fast::train_step_sgd::backward", std::vector<c10::IValue>());
      if (l > 0) {
        auto g = s.output_grad(l - 1);
        at::mm_out(g, dz, s.weight(l));
        auto gb = s.param_grad(2 * l - 1);
        Kernels::mask_grad(g, s.output(l - 1), g, gb);
      }
      auto gw = s.param_grad(2 * l);
      at::mm_out(gw, dz.t(), s.layer_input(l));
    }
    if (sgd == nullptr) continue;
    RECORD_FUNCTION("mnist_fast::train_step_sgd::sgd_update", std::vector<c10::IValue>());
    for (int64_t k = 2 * l; k <= 2 * l + 1; ++k) {
      Kernels::sgd_update(params[k], s.param_grad(k), sgd->momentum != 0.0 ? momentum_buffers[k] : at::Tensor(),
                          *sgd);
    }
  }
  return {loss, correct};
}

// A backend's step: step(input, target, params, momentum_buffers, workspace, sgd or null,
// ignore_index, label_smoothing) on checked arguments, as train_step<Kernels> below.
template <auto step>
std::tuple<at::Tensor, at::Tensor> train_step_sgd_impl(const at::Tensor& input, const at::Tensor& target,
                                                       at::TensorList params, at::TensorList momentum_buffers,
                                                       at::TensorList workspace, double lr, double momentum,
                                                       double dampening, double weight_decay, bool nesterov,
                                                       bool first_step, int64_t ignore_index,
                                                       double label_smoothing) {
  check_train_step_args(input, target, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                        nesterov, label_smoothing);
  const SgdArgs sgd{lr, momentum, dampening, weight_decay, nesterov, first_step};
  return step(input, target, params, momentum_buffers, workspace, &sgd, ignore_index, label_smoothing);
}

template <auto step>
std::tuple<at::Tensor, at::Tensor> train_step_grads_impl(const at::Tensor& input, const at::Tensor& target,
                                                         at::TensorList params, at::TensorList workspace,
                                                         int64_t ignore_index, double label_smoothing) {
  check_train_step_args(input, target, params, {}, workspace, 0.0, 0.0, 0.0, 0.0, false, label_smoothing,
                        "mnist_fast.train_step_grads");
  return step(input, target, params, {}, workspace, nullptr, ignore_index, label_smoothing);
}

}  // namespace mnist_fast
