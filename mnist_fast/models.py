"""The MNIST classifier of the lesson, 784-128-64-10, built from the fused layers."""
from torch import Tensor, nn

from .nn import LinearReLU

__all__ = ["MNISTNet"]


class MNISTNet(nn.Module):
    """784 -> 128 -> ReLU -> 64 -> ReLU -> 10, returning logits (pair it with CrossEntropyLoss).

    Accepts images of shape (N, 1, 28, 28), (N, 28, 28) or flat (N, 784).
    """

    def __init__(self, in_features: int = 784, hidden: tuple = (128, 64), classes: int = 10):
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.Sequential(*(LinearReLU(a, b) for a, b in zip(sizes[:-1], sizes[1:])))
        self.output = nn.Linear(sizes[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        # flatten(1), not reshape(N, -1): -1 cannot be inferred from an empty batch.
        return self.output(self.hidden(x.flatten(1)))
