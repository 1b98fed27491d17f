// The C++ entry points of mnist_fast's operators. Each one calls the registered op through the
// dispatcher, so it reaches the right backend kernel (CPU, CUDA) and the autograd wrapper.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace mnist_fast {

// relu(input @ weight.T + bias); input (*, in_features), weight (out_features, in_features).
at::Tensor linear_relu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// Gradients (input, weight, bias) of linear_relu given the saved output; an entry whose
// output_mask is false is returned undefined and costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& output,
                                                                    std::array<bool, 3> output_mask);

// Fused log-softmax + NLL of an (N, C) input: returns (loss, logsumexp of every row).
// reduction: 0 none, 1 mean, 2 sum. target: (N,) class indices or (N, C) probabilities.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t reduction, int64_t ignore_index,
                                                         double label_smoothing);

// Gradients (input, target) of cross_entropy_forward's loss; target's only for probability targets.
std::tuple<at::Tensor, at::Tensor> cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                                          const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& logsumexp, int64_t reduction,
                                                          int64_t ignore_index, double label_smoothing,
                                                          std::array<bool, 2> output_mask);

// cross_entropy_forward plus the gradient of its loss with respect to input for an incoming grad of
// 1 (of every row, for reduction 'none'), in one pass: (loss, logsumexp, grad_input). CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing);

// The loss alone: cross_entropy_forward(...)[0].
at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing);

// One SGD step of an MLP: forward, mean cross-entropy, backward and torch.optim.SGD's update of
// params = [W_0, b_0, ..., W_{L-1}, b_{L-1}] (ReLU after every layer but the last) and of the
// momentum buffers (empty when momentum is 0), in place. first_step: the buffers start as the
// gradient. workspace: train_step_workspace(input, params). Returns (loss, number of rows whose
// argmax is the target).
std::tuple<at::Tensor, at::Tensor> train_step_sgd(const at::Tensor& input, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers,
                                                  at::TensorList workspace, double lr, double momentum,
                                                  double dampening, double weight_decay, bool nesterov,
                                                  bool first_step, int64_t ignore_index, double label_smoothing);

// The workspace of train_step_sgd for input's batch size, dtype and device.
std::vector<at::Tensor> train_step_workspace(const at::Tensor& input, at::TensorList params);

// ---- fused_mlp: a whole MLP (Linear, ReLU, ..., Linear, optional log-softmax) as one op ----

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// weights[l] (out_l, in_l), biases[l] (out_l,) or absent; a ReLU after every layer but the last;
// log_softmax: a log-softmax over the features of the last layer's output. Returns (output of
// shape (*, out_{L-1}), the L-1 hidden ReLU outputs as (rows, out_l) matrices).
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward(const at::Tensor& input, at::TensorList weights,
                                                                 const OptionalTensorList& biases, bool log_softmax);

// The output alone: fused_mlp_forward(...)[0].
at::Tensor fused_mlp(const at::Tensor& input, at::TensorList weights, const OptionalTensorList& biases,
                     bool log_softmax);

// Gradients (input, weights, biases) of fused_mlp_forward's output, given the saved hidden
// activations and, when the forward ended in a log-softmax, its output (else absent).
// output_mask: [input, weight_0, bias_0, ..., weight_{L-1}, bias_{L-1}]; an entry that is false
// comes back undefined (None), and layers below the lowest requested gradient are not visited.
std::tuple<at::Tensor, OptionalTensorList, OptionalTensorList> fused_mlp_backward(
    const at::Tensor& grad_output, const at::Tensor& input, at::TensorList weights, at::TensorList hidden,
    const std::optional<at::Tensor>& output, const c10::List<bool>& output_mask);

// ---- whole-epoch training (train_epoch.cpp) ----

// The SGD steps of an epoch in one call: batch s is images[order[s*batch_size : (s+1)*batch_size]]
// (the last one may be smaller), trained by train_step_sgd with learning rate lr[s] (lr: float64
// on the CPU, one per step); params and momentum_buffers are updated in place as by that loop of
// steps, first_step applying to the first one. uint8 images are the indices of their values in
// pixel_values (256 of the parameters' dtype): batch s is then pixel_values[images[...]]. Every index
// of order and every target is checked before the first update. Returns the per-step (losses,
// correct counts).
std::tuple<at::Tensor, at::Tensor> train_epoch_sgd(const at::Tensor& images, const at::Tensor& labels,
                                                   const at::Tensor& order, int64_t batch_size, const at::Tensor& lr,
                                                   at::TensorList params, at::TensorList momentum_buffers,
                                                   double momentum, double dampening, double weight_decay,
                                                   bool nesterov, bool first_step, int64_t ignore_index,
                                                   double label_smoothing,
                                                   const std::optional<at::Tensor>& pixel_values = std::nullopt);
// The same epoch with torch.optim.Adam's (AdamW's) steps: batch s's gradients (train_step_grads),
// then adam_update of params, exp_avgs and exp_avg_sqs at step count step + s + 1 with lr[s].
std::tuple<at::Tensor, at::Tensor> train_epoch_adam(const at::Tensor& images, const at::Tensor& labels,
                                                    const at::Tensor& order, int64_t batch_size, const at::Tensor& lr,
                                                    at::TensorList params, at::TensorList exp_avgs,
                                                    at::TensorList exp_avg_sqs, int64_t step, double beta1,
                                                    double beta2, double eps, double weight_decay,
                                                    bool decoupled_weight_decay, int64_t ignore_index,
                                                    double label_smoothing,
                                                    const std::optional<at::Tensor>& pixel_values = std::nullopt);

// ---- Adam / AdamW update (cpu/adam.cpp) ----

// torch.optim.Adam's update (AdamW's with decoupled_weight_decay) of every params[i] given its
// gradient grads[i], in place with exp_avgs and exp_avg_sqs; step: the step's number, from 1.
void adam_update(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled_weight_decay);

}  // namespace mnist_fast

// ---- the gradients of a training step (train_step_impl.h) ----
namespace mnist_fast {

// train_step_sgd without the update: params stay as they are; the workspace's last params.size()
// tensors hold their gradients. Returns (loss, correct).
std::tuple<at::Tensor, at::Tensor> train_step_grads(const at::Tensor& input, const at::Tensor& target,
                                                    at::TensorList params, at::TensorList workspace,
                                                    int64_t ignore_index, double label_smoothing);

}  // namespace mnist_fast
