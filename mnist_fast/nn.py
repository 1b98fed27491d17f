"""Drop-in modules built on the fused ops.

LinearReLU        nn.Linear followed by nn.ReLU, as one layer (same parameters, init and
                  state_dict keys as nn.Linear; it is an nn.Linear subclass).
CrossEntropyLoss  nn.CrossEntropyLoss computed by the fused log-softmax+NLL op.
fuse(module)      a copy of a model in which every Linear directly followed by a ReLU is a LinearReLU.
"""
import copy

import torch
from torch import Tensor, nn

from . import functional as MF

__all__ = ["LinearReLU", "CrossEntropyLoss", "fuse"]


class LinearReLU(nn.Linear):
    """relu(x @ weight.T + bias), fused. Arguments as nn.Linear."""

    def forward(self, input: Tensor) -> Tensor:
        return MF.linear_relu(input, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearReLU":
        """A LinearReLU that shares linear's weight and bias Parameters (no copy)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = linear.in_features, linear.out_features
        fused.weight = linear.weight
        fused.bias = linear.bias
        fused.train(linear.training)
        return fused


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss with the fused log-softmax+NLL op. Arguments as nn.CrossEntropyLoss."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return MF.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


def _fused_sequential(seq: nn.Sequential) -> nn.Sequential:
    # The fused layer takes the Linear's name and the ReLU's slot becomes an Identity, so the
    # fused model keeps the stock model's state_dict keys.
    children = list(seq.named_children())
    out = nn.Sequential()
    out.train(seq.training)
    i = 0
    while i < len(children):
        name, child = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if type(child) is nn.Linear and type(nxt) is nn.ReLU:
            out.add_module(name, LinearReLU.from_linear(child))
            out.add_module(children[i + 1][0], nn.Identity().train(seq.training))
            i += 2
            continue
        out.add_module(name, _fuse(child))
        i += 1
    return out


def _fuse(module: nn.Module) -> nn.Module:
    if type(module) is nn.Sequential:
        return _fused_sequential(module)
    if not any(True for _ in module.children()):
        return module
    clone = copy.copy(module)  # shallow: Parameters and buffers stay shared
    clone._modules = {name: _fuse(child) if child is not None else None for name, child in module._modules.items()}
    return clone


def fuse(module: nn.Module) -> nn.Module:
    """Return a model in which each nn.Linear directly followed by nn.ReLU inside an nn.Sequential
    is one LinearReLU sharing the same Parameters. The input model is not modified; everything
    else, Parameters and buffers included, is shared with it, and state_dict keys are unchanged.
    Train/eval mode is kept; hooks registered on the rebuilt Sequentials and on the fused Linear and
    ReLU modules are not carried over."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(module).__name__}")
    return _fuse(module)
