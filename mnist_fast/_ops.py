"""Fake (meta) kernels of every mnist_fast op: shapes and dtypes only.

They let torch.compile trace the ops and torch.library.opcheck test them. Autograd is registered
in C++ (csrc/autograd.cpp), not here: the Python wiring would cost more per call than the op.
"""
import torch


@torch.library.register_fake("mnist_fast::linear_relu")
def _linear_relu_fake(input, weight, bias):
    torch._check(input.dim() >= 1, lambda: "linear_relu: input needs at least 1 dimension")
    torch._check(weight.dim() == 2, lambda: "linear_relu: weight must be 2-d")
    torch._check(input.shape[-1] == weight.shape[1], lambda: "linear_relu: in_features mismatch")
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("mnist_fast::linear_relu_backward")
def _linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_weight = torch.empty_like(weight) if output_mask[1] else None
    grad_bias = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("mnist_fast::cross_entropy_forward")
def _cross_entropy_forward_fake(input, target, weight, reduction, ignore_index, label_smoothing):
    torch._check(input.dim() == 2, lambda: "cross_entropy: input must be (N, C)")
    rows = input.shape[0]
    loss = input.new_empty((rows,) if reduction == 0 else ())
    # Per row the max and log(sum(exp(x - max))), float64 for every input dtype (row_math.h).
    lse = input.new_empty((rows, 2), dtype=torch.float64)
    return loss, lse


@torch.library.register_fake("mnist_fast::cross_entropy_backward")
def _cross_entropy_backward_fake(
    grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing, output_mask
):
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_target = torch.empty_like(input) if output_mask[1] else None
    return grad_input, grad_target
