"""The layers of the MLPs FusedTrainer trains: a model's Linear layers in order, or a clear error."""
from typing import List, Tuple

from torch import nn

from .models import MNISTNet
from .nn import FusedMLP, LinearReLU

__all__ = ["mlp_layers"]

_SUPPORTED = ("FusedTrainer supports MNISTNet and nn.Sequential stacks of LinearReLU / nn.Linear + nn.ReLU "
              "layers (nn.Identity and a leading nn.Flatten allowed) ending in a plain nn.Linear")


def _flat_children(module: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Sequential:
            out.extend(_flat_children(child, path))
        else:
            out.append((path, child))
    return out


def mlp_layers(model: nn.Module) -> List[nn.Linear]:
    """The Linear layers of a supported MLP, in order (a ReLU after each but the last), or raise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"FusedTrainer expects an nn.Module, got {type(model).__name__}")
    if type(model) in (nn.Sequential, FusedMLP, MNISTNet):  # fuse() makes a whole-MLP Sequential a FusedMLP
        children = _flat_children(model, "")
    else:
        raise ValueError(f"{_SUPPORTED}; got {type(model).__name__}")

    layers, relu_after = [], []
    i = 0
    while i < len(children):
        name, child = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if type(child) is nn.Identity:
            i += 1
        elif type(child) is nn.Flatten and not layers and child.start_dim == 1 and child.end_dim == -1:
            i += 1
        elif type(child) is LinearReLU:
            layers.append((name, child))
            relu_after.append(True)
            i += 1
        elif type(child) is nn.Linear and type(nxt) is nn.ReLU:
            layers.append((name, child))
            relu_after.append(True)
            i += 2
        elif type(child) is nn.Linear:
            layers.append((name, child))
            relu_after.append(False)
            i += 1
        else:
            raise ValueError(f"{_SUPPORTED}; got {type(child).__name__} at '{name}'")
    if not layers:
        raise ValueError(f"{_SUPPORTED}; the model has no Linear layer")
    for (name, _), relu in zip(layers[:-1], relu_after[:-1]):
        if not relu:
            raise ValueError(f"{_SUPPORTED}; layer '{name}' is a Linear without a ReLU in the middle of the stack")
    if relu_after[-1]:
        raise ValueError(f"{_SUPPORTED}; the last layer '{layers[-1][0]}' must be a plain nn.Linear giving the "
                         "logits, not a Linear+ReLU")
    for name, layer in layers:
        if layer.bias is None:
            raise ValueError(f"FusedTrainer: layer '{name}' has no bias; layers without bias are not supported")
    return [layer for _, layer in layers]
