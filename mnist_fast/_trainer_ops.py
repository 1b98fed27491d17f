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
