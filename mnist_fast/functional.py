"""Functional forms of the fused ops, with the signatures of their torch.nn.functional counterparts.

    linear_relu(input, weight, bias=None)  == torch.relu(F.linear(input, weight, bias))
    cross_entropy(input, target, ...)      == F.cross_entropy(input, target, ...)
    log_softmax_nll                         is cross_entropy (log-softmax followed by NLL)
    fused_mlp(input, weights, biases, log_softmax=False)
                                           == Linear, ReLU, ..., Linear (, log_softmax over the
                                              features): a whole MLP, forward and backward one op each

In eager mode the compiled ops are called through a pybind11 fast path; under torch.compile they
are called as torch.ops.mnist_fast.* so the compiler sees the registered ops (_ops.fast_path).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import _reduction

from ._ops import fast_path

__all__ = ["linear_relu", "cross_entropy", "log_softmax_nll", "fused_mlp"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_linear_relu = fast_path("linear_relu")
_loss_2d = fast_path("cross_entropy")  # (N, C) input, reduction as a code
_fused_mlp = fast_path("fused_mlp")


def linear_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """relu(input @ weight.T + bias) in one fused op; input of shape (*, in_features)."""
    return _linear_relu(input, weight, bias)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Fused log-softmax + NLL; the same arguments and results as F.cross_entropy.

    input: (C,), (N, C) or (N, C, d1, ...) logits. target: class indices of shape (), (N,) or
    (N, d1, ...) (int64 or uint8), or class probabilities of input's shape.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    code = _REDUCTIONS.get(reduction)
    if code is None:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("cross_entropy: input and target must be tensors")
    ndim = input.dim()
    if ndim == 2 and target.dim() == 1:  # the training loop's case, first: (N, C) logits, (N,) class indices
        return _loss_2d(input, target, weight, code, ignore_index, label_smoothing)
    if ndim == 0:
        raise ValueError("cross_entropy: expected input with at least 1 dimension (C,), (N, C) or (N, C, d1, ...), "
                         "got a 0-d tensor")
    probabilities = target.shape == input.shape and input.dim() > 0
    if probabilities and target.dtype != input.dtype and target.is_floating_point():
        # Stock promotes (e.g. float32 logits with float64 probabilities compute in float64).
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
        weight = weight.to(dtype) if weight is not None else None

    if input.dim() == 1:  # a single sample: (C,) with a () index or (C,) probabilities
        if not probabilities and target.dim() != 0:
            raise ValueError(f"cross_entropy: for a (C,) input expected a 0-d class-index target or (C,) "
                             f"probabilities, got target of shape {tuple(target.shape)}")
        loss = _loss_2d(input.unsqueeze(0), target.unsqueeze(0), weight, code, ignore_index, label_smoothing)
        return loss.squeeze(0) if code == 0 else loss
    if input.dim() == 2:
        return _loss_2d(input, target, weight, code, ignore_index, label_smoothing)

    # (N, C, d1, ...): classes last, then one row per element of (N, d1, ...).
    classes = input.shape[1]
    rows = input.movedim(1, -1).reshape(-1, classes)
    if probabilities:
        target_rows = target.movedim(1, -1).reshape(-1, classes)
        out_shape = target.shape[:1] + target.shape[2:]
    else:
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            raise ValueError(f"cross_entropy: expected target of shape {tuple(expected)} for input of shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        target_rows = target.reshape(-1)
        out_shape = target.shape
    loss = _loss_2d(rows, target_rows, weight, code, ignore_index, label_smoothing)
    return loss.reshape(out_shape) if code == 0 else loss


log_softmax_nll = cross_entropy


def fused_mlp(input: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Optional[Tensor]]] = None,
              log_softmax: bool = False) -> Tensor:
    """A whole MLP in one op: F.linear with weights[l] and biases[l] (None: no bias), torch.relu
    between the layers, and, if log_softmax, F.log_softmax over the last dimension at the end.
    input: (*, in_features); weights[l]: (out_l, in_l). One autograd node for the whole network."""
    if type(weights) is not list:
        weights = list(weights)
    if biases is None:
        biases = [None] * len(weights)
    elif type(biases) is not list:
        biases = list(biases)
    return _fused_mlp(input, weights, biases, log_softmax)
