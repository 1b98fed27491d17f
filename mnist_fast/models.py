"""The MNIST classifier of the lesson, 784-128-64-10: built from the fused layers (MNISTNet), and in stock
PyTorch (stock_mlp), the reference everything fused is checked and timed against."""
import re

from torch import Tensor, nn

from .nn import FusedMLP

__all__ = ["MNISTNet", "stock_mlp", "LESSON_SIZES"]

LESSON_SIZES = (784, 128, 64, 10)

# The keys of MNISTNet before it had the lesson's: hidden.<i>.* for the Linear+ReLU layers, output.* for the last.
_EARLIER_KEY = re.compile(r"(?:hidden\.(\d+)|output)\.(.+)")


class MNISTNet(FusedMLP):
    """784 -> 128 -> ReLU -> 64 -> ReLU -> 10, returning logits (pair it with CrossEntropyLoss).

    Accepts images of shape (N, 1, 28, 28), (N, 28, 28) or flat (N, 784). A FusedMLP (one op forward,
    one op backward) whose children and state_dict keys are those of the lesson's
    nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)):
    0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias. Its state_dict loads into that Sequential,
    with or without a trailing nn.LogSoftmax(dim=1), and back; state dicts with the earlier keys
    (hidden.0.weight, ..., output.bias) load too. As for any FusedMLP, forward-mode AD (torch.func.jvp)
    needs unfuse(net): that Sequential takes flat (N, 784) inputs.
    """

    def __init__(self, in_features: int = LESSON_SIZES[0], hidden: tuple = LESSON_SIZES[1:-1],
                 classes: int = LESSON_SIZES[-1]):
        super().__init__(*stock_mlp((in_features, *hidden, classes)))  # stock_mlp's init order

    def forward(self, x: Tensor) -> Tensor:
        # flatten(1), not reshape(N, -1): -1 cannot be inferred from an empty batch. (Not an nn.Flatten
        # child: it would shift the lesson's keys.)
        return super().forward(x.flatten(1))

    def rename_earlier_keys(self, state_dict: dict, prefix: str = "") -> dict:
        """Rename, in place, the earlier keys under prefix (hidden.<i>.*, output.*) to the current ones
        (<2i>.*, <last>.*), unless the current key is there too; returns state_dict."""
        for key in list(state_dict):
            match = key.startswith(prefix) and _EARLIER_KEY.fullmatch(key[len(prefix):])
            if not match:
                continue
            index = 2 * int(match[1]) if match[1] is not None else len(self) - 1
            new = f"{prefix}{index}.{match[2]}"
            if new not in state_dict:
                state_dict[new] = state_dict.pop(key)
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict passes its own copy of the dict, shared with the children: renaming here
        # lets them find their keys, and strict loading sees no unexpected ones.
        self.rename_earlier_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def stock_mlp(sizes=LESSON_SIZES, *, log_softmax: bool = False) -> nn.Sequential:
    """The lesson's MLP in stock PyTorch: Linear + ReLU per hidden layer, then Linear to the classes
    (+ LogSoftmax, for NLLLoss). MNISTNet is built from it, so one seed gives both the same initial
    weights. Takes flat (N, sizes[0]) inputs."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)
