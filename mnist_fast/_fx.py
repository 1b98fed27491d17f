"""fuse()/unfuse() for modules whose forward applies the activations itself, as in

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)

The forward is traced with torch.fx (nn.Sequential and the fused modules stay calls, as stock
leaf modules do); each chain Linear -> relu -> ... -> Linear [-> log_softmax] whose intermediate
values have no other use becomes one fused op reading the same Parameters. The result is a
torch.fx.GraphModule that shares the original module's children, Parameters and buffers, so
state_dict keys are unchanged.
"""
import collections

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import functional as MF
from . import nn as mnn

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_LOG_SOFTMAX_FUNCTIONS = {F.log_softmax, torch.log_softmax}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (nn.Sequential, mnn.LinearReLU, mnn.CrossEntropyLoss)) or super().is_leaf_module(m, qualname)


def _sole_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _takes_only(node, value):
    """Whether node's first argument is value and nothing else is a graph value."""
    return bool(node.args) and node.args[0] is value and not any(
        isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))


def _is_relu(node, value, modules):
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and _takes_only(node, value)
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and _takes_only(node, value) and len(node.args) == 1
    return node.op == "call_module" and type(modules[node.target]) is nn.ReLU and _takes_only(node, value)


def _log_softmax_dim(node, value, modules):
    """The dimension of a log-softmax of value, or None if node is not one (or has no dim, or a dtype)."""
    if not _takes_only(node, value):
        return None
    if node.op == "call_module" and type(modules[node.target]) is nn.LogSoftmax:
        return modules[node.target].dim
    if (node.op == "call_function" and node.target in _LOG_SOFTMAX_FUNCTIONS) or (
            node.op == "call_method" and node.target == "log_softmax"):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dtype_at = 3 if node.target is F.log_softmax else 2  # F.log_softmax(input, dim, _stacklevel, dtype)
        if node.kwargs.get("dtype") is not None or (len(node.args) > dtype_at and node.args[dtype_at] is not None):
            return None
        return dim if isinstance(dim, int) else None
    return None


def _linear_module(node, modules):
    if node.op == "call_module" and type(modules[node.target]) in (nn.Linear, mnn.LinearReLU):
        if len(node.args) == 1 and not node.kwargs:
            return modules[node.target]
    return None


def _chain(start, modules):
    """The longest chain from the Linear call `start`: (layer names, nodes, final node, ends in a
    ReLU, log-softmax dim or None)."""
    names, nodes, node = [], [], start
    while True:
        names.append(node.target)
        nodes.append(node)
        out = node
        relu = type(modules[node.target]) is mnn.LinearReLU
        user = _sole_user(out)
        if not relu and user is not None and _is_relu(user, out, modules):
            relu, out = True, user
            nodes.append(user)
        user = _sole_user(out)
        if relu:
            if user is not None and _linear_module(user, modules) is not None and user.args[0] is out:
                node = user
                continue
            return names, nodes, out, True, None
        dim = _log_softmax_dim(user, out, modules) if user is not None else None
        if dim is not None:
            nodes.append(user)
            return names, nodes, user, False, dim
        return names, nodes, out, False, None


def fuse_traced(module, prefix, report, fuse_child):
    """module with its Linear chains fused as a GraphModule, or None when there is nothing to fuse
    this way (the caller then fuses its children)."""
    # Only worth tracing when some Linear is called by a forward (not in an nn.Sequential, which
    # the caller fuses as it is).
    modules = dict(module.named_modules())
    if not any(type(m) in (nn.Linear, mnn.LinearReLU) and not isinstance(modules[n.rpartition(".")[0]], nn.Sequential)
               for n, m in modules.items() if n):
        return None
    name = prefix or type(module).__name__
    try:
        graph = _Tracer().trace(module)
    except Exception as e:  # data-dependent control flow and the like
        report.stock.append(f"{name} (its forward cannot be traced by torch.fx: {type(e).__name__}: {e}; "
                            "only its submodules are fused)")
        return None
    consumed, fused = set(), 0
    for node in list(graph.nodes):
        if node in consumed or _linear_module(node, modules) is None:
            continue
        names, nodes, last, relu_end, dim = _chain(node, modules)
        consumed.update(nodes)
        layers = [modules[n] for n in names]
        if dim is None and len(layers) == 1 and (not relu_end or type(layers[0]) is mnn.LinearReLU):
            continue  # a single Linear (or LinearReLU): nothing to fuse
        with graph.inserting_before(node):
            weights = [graph.get_attr(f"{n}.weight") for n in names]
            biases = [graph.get_attr(f"{n}.bias") if m.bias is not None else None for n, m in zip(names, layers)]
            x = node.args[0]
            if len(layers) == 1 and relu_end:
                new = graph.call_function(MF.linear_relu, (x, weights[0], biases[0]))
            else:
                new = graph.call_function(mnn._mlp_forward, (x, weights, biases, dim))
                if relu_end:
                    new = graph.call_function(torch.relu, (new,))
        last.replace_all_uses_with(new)
        for n in reversed(nodes):
            graph.erase_node(n)
        fused += 1
    if not fused:
        return None
    graph.lint()
    for node in graph.nodes:
        linear = _linear_module(node, modules)
        if type(linear) is nn.Linear and any(u.op != "output" for u in node.users):
            users = ", ".join(str(u.target) for u in node.users)
            report.stock.append(f"{_qualified(prefix, node.target)} (nn.Linear followed by {users})")
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    # Share the original's children, Parameters and buffers (the fused ones for its children).
    gm._modules = collections.OrderedDict(
        (n, fuse_child(c, _qualified(prefix, n), report) if c is not None else None) for n, c in module._modules.items())
    gm._parameters = collections.OrderedDict(module._parameters)
    gm._buffers = collections.OrderedDict(module._buffers)
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    gm.train(module.training)
    return gm


def _qualified(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def unfuse_traced(gm, unfuse_child):
    """gm with each fused call written back as stock F.linear / torch.relu / F.log_softmax."""
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (mnn._mlp_forward, MF.linear_relu, MF.fused_mlp):
            if node.target is MF.linear_relu:
                x, weights, biases, dim = node.args[0], [node.args[1]], [node.args[2]], None
                relu_last = True
            elif node.target is MF.fused_mlp:
                x, weights, biases = node.args[:3]
                dim, relu_last = (-1 if len(node.args) > 3 and node.args[3] else None), False
            else:
                x, weights, biases, dim = node.args
                relu_last = False
            out = env[x]
            for k, (w, b) in enumerate(zip(weights, biases)):
                out = graph.call_function(F.linear, (out, env[w], env[b] if b is not None else None))
                if k + 1 < len(weights) or relu_last:
                    out = graph.call_function(torch.relu, (out,))
            if dim is not None:
                out = graph.call_function(F.log_softmax, (out,), {"dim": dim})
            env[node] = out
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    stock = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    stock._modules = collections.OrderedDict(
        (n, unfuse_child(c) if c is not None else None) for n, c in gm._modules.items())
    stock._parameters = collections.OrderedDict(gm._parameters)
    stock._buffers = collections.OrderedDict(gm._buffers)
    stock._non_persistent_buffers_set = set(gm._non_persistent_buffers_set)
    stock.train(gm.training)
    return stock

