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
    lse = input.new_empty((rows,), dtype=torch.float64)  # float64 for every input dtype (row_math.h)
    return loss, lse


@torch.library.register_fake("mnist_fast::cross_entropy_backward")
def _cross_entropy_backward_fake(
    grad_loss, input, target, weight, logsumexp, reduction, ignore_index, label_smoothing, output_mask
):
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_target = torch.empty_like(input) if output_mask[1] else None
    return grad_input, grad_target


# ---- fused_mlp (a whole MLP as one op) ----

def _check_mlp_chain(input, weights, biases):
    torch._check(input.dim() >= 1, lambda: "fused_mlp: input needs at least 1 dimension")
    torch._check(len(weights) >= 1 and len(biases) == len(weights), lambda: "fused_mlp: one bias entry per weight")
    # A meta tensor among CPU ones dispatches here, not to the kernel that checks devices.
    for t in [*weights, *[b for b in biases if b is not None]]:
        torch._check(t.device == input.device, lambda: f"mnist_fast.fused_mlp: expected every weight and bias on "
                     f"the same device as input ({input.device}), got {t.device}")
    features = input.shape[-1]
    for w in weights:
        torch._check(w.dim() == 2, lambda: "fused_mlp: every weight must be 2-d")
        torch._check(w.shape[1] == features, lambda: "fused_mlp: the layers do not chain")
        features = w.shape[0]


@torch.library.register_fake("mnist_fast::fused_mlp_forward")
def _fused_mlp_forward_fake(input, weights, biases, log_softmax=False):
    _check_mlp_chain(input, weights, biases)
    rows = 1
    for size in input.shape[:-1]:
        rows = rows * size
    hidden = [input.new_empty((rows, w.shape[0])) for w in weights[:-1]]
    return input.new_empty((*input.shape[:-1], weights[-1].shape[0])), hidden


@torch.library.register_fake("mnist_fast::_fused_mlp_backward")
def _fused_mlp_backward_fake(grad_output, input, weights, hidden, output, output_mask):
    # Every gradient the kernel returns is a fresh contiguous tensor.
    grad_input = input.new_empty(input.shape) if output_mask[0] else None
    grad_weights = [w.new_empty(w.shape) if output_mask[1 + 2 * l] else None for l, w in enumerate(weights)]
    grad_biases = [w.new_empty((w.shape[0],)) if output_mask[2 + 2 * l] else None for l, w in enumerate(weights)]
    return grad_input, grad_weights, grad_biases
