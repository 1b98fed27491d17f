"""The MNIST classifier of the lesson, 784-128-64-10: built from the fused layers (MNISTNet), and in stock
PyTorch (stock_mlp), the reference everything fused is checked and timed against."""
from torch import Tensor, nn

from .nn import LinearReLU

__all__ = ["MNISTNet", "stock_mlp", "LESSON_SIZES"]

LESSON_SIZES = (784, 128, 64, 10)


class MNISTNet(nn.Module):
    """784 -> 128 -> ReLU -> 64 -> ReLU -> 10, returning logits (pair it with CrossEntropyLoss).

    Accepts images of shape (N, 1, 28, 28), (N, 28, 28) or flat (N, 784).
    """

    def __init__(self, in_features: int = LESSON_SIZES[0], hidden: tuple = LESSON_SIZES[1:-1],
                 classes: int = LESSON_SIZES[-1]):
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.Sequential(*(LinearReLU(a, b) for a, b in zip(sizes[:-1], sizes[1:])))
        self.output = nn.Linear(sizes[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        # flatten(1), not reshape(N, -1): -1 cannot be inferred from an empty batch.
        return self.output(self.hidden(x.flatten(1)))


def stock_mlp(sizes=LESSON_SIZES, *, log_softmax: bool = False) -> nn.Sequential:
    """The lesson's MLP in stock PyTorch: Linear + ReLU per hidden layer, then Linear to the classes
    (+ LogSoftmax, for NLLLoss). Built in the same order as MNISTNet, so one seed gives both the same
    initial weights. Takes flat (N, sizes[0]) inputs."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    if log_softmax:
        layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)
