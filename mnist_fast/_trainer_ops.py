"""Fake (meta) kernels of the training-step ops, for torch.compile and torch.library.opcheck.

train_step_sgd mutates params, momentum_buffers and workspace in place (their schema says so) and
returns a 0-d loss of the input's dtype and a 0-d int64 count of correct predictions.
train_step_workspace is a composite op (it only allocates) and needs no fake.
"""
import torch


@torch.library.register_fake("mnist_fast::train_step_sgd")
def _train_step_sgd_fake(input, target, params, momentum_buffers, workspace, lr, momentum, dampening,
                         weight_decay, nesterov, first_step, ignore_index, label_smoothing):
    torch._check(input.dim() == 2, lambda: "train_step_sgd: input must be (N, in_features)")
    torch._check(len(params) >= 2 and len(params) % 2 == 0, lambda: "train_step_sgd: params must be weight/bias pairs")
    return input.new_empty(()), input.new_empty((), dtype=torch.int64)


# ---- whole-epoch training (csrc/train_epoch.cpp) ----
# train_epoch_sgd mutates params and momentum_buffers in place and returns one loss (input dtype)
# and one correct count (int64) per step: ceil(len(order) / batch_size) steps.

@torch.library.register_fake("mnist_fast::train_epoch_sgd")
def _train_epoch_sgd_fake(images, labels, order, batch_size, lr, params, momentum_buffers, momentum, dampening,
                          weight_decay, nesterov, first_step, ignore_index, label_smoothing):
    torch._check(batch_size >= 1, lambda: "train_epoch_sgd: batch_size must be positive")
    torch._check(order.dim() == 1, lambda: "train_epoch_sgd: order must be 1-D")
    torch._check(len(params) >= 2 and len(params) % 2 == 0,
                 lambda: "train_epoch_sgd: params must be weight/bias pairs")
    steps = (order.shape[0] + batch_size - 1) // batch_size
    return images.new_empty((steps,)), images.new_empty((steps,), dtype=torch.int64)


# ---- Adam / AdamW update (csrc/cpu/adam.cpp) ----
# adam_update mutates params, exp_avgs and exp_avg_sqs in place and returns nothing.

@torch.library.register_fake("mnist_fast::adam_update")
def _adam_update_fake(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                      decoupled_weight_decay):
    torch._check(len(grads) == len(params) and len(exp_avgs) == len(params) and len(exp_avg_sqs) == len(params),
                 lambda: "adam_update: expected one gradient, exp_avg and exp_avg_sq per parameter")
    return None
