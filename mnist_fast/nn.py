"""Drop-in modules built on the fused ops, and fuse()/unfuse() for the user's own model.

LinearReLU        nn.Linear followed by nn.ReLU, as one layer (same parameters, init and
                  state_dict keys as nn.Linear; it is an nn.Linear subclass).
FusedMLP          nn.Sequential(Linear, ReLU, ..., Linear[, LogSoftmax]) whose forward and backward
                  each run as one op (an nn.Sequential subclass: same children names, Parameters,
                  init and state_dict keys).
CrossEntropyLoss  nn.CrossEntropyLoss computed by the fused log-softmax+NLL op.
fuse(module)      a copy of a model (or a loss) with the fused modules in place of the stock ones.
unfuse(module)    back to stock modules sharing the Parameters.
"""
import collections
import copy
import warnings

import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import functional as MF

__all__ = ["LinearReLU", "FusedMLP", "CrossEntropyLoss", "fuse", "unfuse"]


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


def _linear_of(layer: LinearReLU) -> nn.Linear:
    """The stock nn.Linear sharing layer's Parameters."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = layer.in_features, layer.out_features
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear.train(layer.training)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss with the fused log-softmax+NLL op. Arguments as nn.CrossEntropyLoss."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # (positional: keyword arguments cost a measurable share of a batch-64 loss)
        return MF.cross_entropy(input, target, self.weight, None, self.ignore_index, None, self.reduction,
                                self.label_smoothing)


# ---- FusedMLP ----

class _Plan:
    """What a FusedMLP's children compute: an optional leading nn.Flatten, the Linear layers (a
    ReLU after each but the last) and an optional final nn.LogSoftmax."""

    def __init__(self, flatten, linears, log_softmax):
        self.flatten, self.linears, self.log_softmax = flatten, linears, log_softmax


def _plan_of(modules):
    """The _Plan of a list of modules, or a string saying why they are not a fusable MLP."""
    flatten, linears, relu_after, log_softmax = None, [], [], None
    i = 0
    while i < len(modules):
        m, t = modules[i], type(modules[i])
        nxt = type(modules[i + 1]) if i + 1 < len(modules) else None
        if log_softmax is not None and t is not nn.Identity:
            return f"{t.__name__} after the LogSoftmax"
        if t is nn.Identity:
            pass
        elif t is nn.Flatten and not linears and flatten is None:
            flatten = m
        elif t is LinearReLU or (t is nn.Linear and nxt is nn.ReLU):
            linears.append(m)
            relu_after.append(True)
            i += t is nn.Linear  # the ReLU
        elif t is nn.Linear:
            linears.append(m)
            relu_after.append(False)
        elif t is nn.LogSoftmax and linears:
            log_softmax = m
        else:
            return f"{t.__name__} is not a Linear, ReLU or final LogSoftmax"
        i += 1
    if not linears:
        return "no Linear layer"
    if any(not r for r in relu_after[:-1]):
        return "a Linear without a ReLU before the last layer"
    if relu_after[-1]:
        return "the last Linear is followed by a ReLU (the fused MLP ends in a plain Linear)"
    return _Plan(flatten, linears, log_softmax)


def _mlp_forward(input: Tensor, weights, biases, log_softmax_dim) -> Tensor:
    """The fused MLP, then a log-softmax over log_softmax_dim (None: none): in the same op when
    that is the last dimension, else the stock log_softmax after it."""
    if log_softmax_dim is None:
        return MF.fused_mlp(input, weights, biases)
    if log_softmax_dim == -1 or log_softmax_dim == input.dim() - 1:
        return MF.fused_mlp(input, weights, biases, True)
    return F.log_softmax(MF.fused_mlp(input, weights, biases), dim=log_softmax_dim)


def _param(module, name):
    """module.<name> as it is now, read from the Parameter registry when it is there: Module.__getattr__
    costs about as much as the rest of a small FusedMLP call. Anything else (a parametrization, no
    bias) goes through getattr."""
    p = module._parameters.get(name)
    return p if p is not None else getattr(module, name)


class FusedMLP(nn.Sequential):
    """nn.Sequential(Linear, ReLU, ..., Linear[, LogSoftmax(dim=1)]) as one fused op.

    Construct it as the nn.Sequential it replaces (modules, or an OrderedDict of them): each
    nn.Linear followed by an nn.ReLU becomes a LinearReLU sharing its Parameters, the ReLU's slot an
    nn.Identity, so children names, Parameters, init and state_dict keys stay those of the
    Sequential. An nn.Flatten may come first. forward runs the whole network, forward and backward,
    as one op each; the output keeps its meaning (log-probabilities after a LogSoftmax, so
    torch.exp(model(x)) still gives probabilities). Indexing gives the layers; a slice is a plain
    nn.Sequential of them. If the children are changed so that they no longer form such an MLP,
    forward runs them one after another as nn.Sequential would.
    """

    def __init__(self, *args):
        super().__init__(*args)
        names = list(self._modules)
        for k, name in enumerate(names):
            child, nxt = self._modules[name], self._modules[names[k + 1]] if k + 1 < len(names) else None
            if type(child) is nn.Linear and type(nxt) is nn.ReLU:
                self._modules[name] = LinearReLU.from_linear(child)
                self._modules[names[k + 1]] = nn.Identity().train(nxt.training)
        plan = _plan_of(list(self._modules.values()))
        if isinstance(plan, str):
            raise ValueError(f"FusedMLP: the modules are not Linear, ReLU, ..., Linear[, LogSoftmax]: {plan}")
        self._cache = (tuple(self._modules.values()), plan)

    @classmethod
    def from_sizes(cls, *sizes: int, bias: bool = True, log_softmax: bool = False) -> "FusedMLP":
        """FusedMLP.from_sizes(784, 128, 64, 10) is FusedMLP(Linear(784, 128), ReLU(), ..., Linear(64, 10)):
        the Parameters are created in the same order, so the same seed gives the same init."""
        if len(sizes) < 2:
            raise ValueError("FusedMLP.from_sizes: expected at least an input and an output size")
        modules = []
        for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            modules.append(nn.Linear(a, b, bias=bias))
            if k + 2 < len(sizes):
                modules.append(nn.ReLU())
        if log_softmax:
            modules.append(nn.LogSoftmax(dim=1))
        return cls(*modules)

    def _plan(self):
        modules = tuple(self._modules.values())
        if modules != self._cache[0]:  # the children were changed: plan again
            self._cache = (modules, _plan_of(list(modules)))
        return self._cache[1]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.Sequential(collections.OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def forward(self, input: Tensor) -> Tensor:
        plan = self._plan()
        if isinstance(plan, str):
            return super().forward(input)
        if plan.flatten is not None:
            input = plan.flatten(input)
        weights = [_param(m, "weight") for m in plan.linears]
        biases = [_param(m, "bias") for m in plan.linears]
        if plan.log_softmax is None:
            return MF.fused_mlp(input, weights, biases)
        dim = plan.log_softmax.dim
        if dim is None:  # nn.LogSoftmax's legacy implicit dimension: let it choose, as stock does
            return plan.log_softmax(MF.fused_mlp(input, weights, biases))
        return _mlp_forward(input, weights, biases, dim)


# ---- fuse ----

class _Report:
    """What fuse() left stock, said once per call."""

    def __init__(self):
        self.stock = []

    def warn(self):
        if self.stock:
            warnings.warn("mnist_fast.fuse: left stock (not fusable): " + "; ".join(self.stock), stacklevel=3)


def _path(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _fused_sequential(seq: nn.Sequential, prefix: str, report: _Report) -> nn.Sequential:
    # A whole MLP becomes a FusedMLP; otherwise each Linear directly followed by a ReLU is one
    # LinearReLU and the ReLU's slot an Identity. Either way the state_dict keys are the stock ones.
    plan = _plan_of(list(seq._modules.values()))
    if not isinstance(plan, str) and (len(plan.linears) > 1 or plan.log_softmax is not None):
        return FusedMLP(collections.OrderedDict(seq._modules.items())).train(seq.training)
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
        if type(child) is nn.Linear and nxt is not None:  # (a last Linear has nothing to fuse with)
            report.stock.append(f"{_path(prefix, name)} (nn.Linear followed by {type(nxt).__name__})")
        elif type(child) is nn.LogSoftmax:
            report.stock.append(f"{_path(prefix, name)} (nn.LogSoftmax, not after a fused MLP)")
        out.add_module(name, _fuse(child, _path(prefix, name), report))
        i += 1
    return out


def _fuse_loss(module: nn.Module):
    if type(module) is nn.CrossEntropyLoss:
        fused = copy.copy(module)  # shallow: the class weight buffer stays shared
        fused.__class__ = CrossEntropyLoss
        return fused
    return None


def _fuse(module: nn.Module, prefix: str, report: _Report) -> nn.Module:
    loss = _fuse_loss(module)
    if loss is not None:
        return loss
    if type(module) is nn.Sequential:
        return _fused_sequential(module, prefix, report)
    if not any(True for _ in module.children()) or isinstance(module, (FusedMLP, LinearReLU, fx.GraphModule)):
        return module
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # (containers have no forward)
        from . import _fx  # the forward of a module that calls F.relu / F.log_softmax itself

        traced = _fx.fuse_traced(module, prefix, report, _fuse)
        if traced is not None:
            return traced
    clone = copy.copy(module)  # shallow: Parameters and buffers stay shared
    clone._modules = {name: _fuse(child, _path(prefix, name), report) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


def fuse(module: nn.Module) -> nn.Module:
    """Return the model (or loss) with the fused modules in place of the stock ones:

    - an nn.Sequential that is an MLP -- Linear, ReLU, ..., Linear, optionally ending in
      nn.LogSoftmax -- becomes a FusedMLP (one op forward, one op backward);
    - in other nn.Sequentials each nn.Linear directly followed by nn.ReLU becomes a LinearReLU;
    - a module whose forward applies F.relu / torch.relu / F.log_softmax (or ReLU modules) to its
      Linear layers' outputs is traced with torch.fx and returned as a torch.fx.GraphModule in
      which each such chain is one fused op;
    - nn.CrossEntropyLoss becomes mnist_fast's CrossEntropyLoss. nn.NLLLoss is returned as it is:
      after a FusedMLP ending in LogSoftmax the log-softmax already runs inside the fused op, and
      NLL of log-probabilities is one gather.

    The input is not modified; Parameters and buffers are shared with it, state_dict keys and
    train/eval mode are kept, and what cannot be fused stays stock with a warning that names it.
    Hooks registered on replaced modules are not carried over. unfuse() goes back."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(module).__name__}")
    report = _Report()
    out = _fuse(module, "", report)
    report.warn()
    return out


# ---- unfuse ----

def _unfused_children(module: nn.Module, report: list) -> collections.OrderedDict:
    names = list(module._modules)
    out = collections.OrderedDict()
    for k, name in enumerate(names):
        child = module._modules[name]
        nxt = module._modules[names[k + 1]] if k + 1 < len(names) else None
        prev = module._modules[names[k - 1]] if k > 0 else None
        if type(child) is LinearReLU and type(nxt) is nn.Identity:
            out[name] = _linear_of(child)
        elif type(child) is nn.Identity and type(prev) is LinearReLU:
            out[name] = nn.ReLU().train(child.training)
        else:
            out[name] = _unfuse(child, report)
    return out


def _unfuse(module: nn.Module, report: list) -> nn.Module:
    if type(module) is CrossEntropyLoss:
        stock = copy.copy(module)
        stock.__class__ = nn.CrossEntropyLoss
        return stock
    if type(module) is LinearReLU:
        report.append("a LinearReLU without an Identity slot after it for its ReLU")
        return module
    if isinstance(module, fx.GraphModule):
        from . import _fx

        return _fx.unfuse_traced(module, lambda child: _unfuse(child, report))
    if isinstance(module, nn.Sequential):  # FusedMLP included
        return nn.Sequential(_unfused_children(module, report)).train(module.training)
    if not any(True for _ in module.children()):
        return module
    clone = copy.copy(module)
    clone._modules = {name: _unfuse(child, report) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


def unfuse(module: nn.Module) -> nn.Module:
    """The inverse of fuse(): the same model built from stock torch.nn modules and ops only (for
    ONNX, torch.export artifacts that load without mnist_fast, quantization), sharing the
    Parameters and buffers, with the same state_dict keys and train/eval mode."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"unfuse expects an nn.Module, got {type(module).__name__}")
    report = []
    out = _unfuse(module, report)
    if report:
        warnings.warn("mnist_fast.unfuse: kept fused (no stock equivalent with the same state_dict keys): "
                      + "; ".join(sorted(set(report))), stacklevel=2)
    return out
