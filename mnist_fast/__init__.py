"""mnist_fast: fused Linear+ReLU and log-softmax+NLL operators for PyTorch, and a fast MNIST trainer.

    import mnist_fast
    from mnist_fast import functional as MF

    y = MF.linear_relu(x, weight, bias)           # == torch.relu(F.linear(x, weight, bias))
    loss = MF.cross_entropy(logits, target)       # == F.cross_entropy(logits, target)
    model = mnist_fast.fuse(stock_model)          # a whole MLP becomes one FusedMLP op (see nn.fuse)
    net = mnist_fast.models.MNISTNet()            # 784-128-64-10 from the fused layers
    trainer = mnist_fast.FusedTrainer(net, lr=0.01, momentum=0.9)
    loss, correct = trainer.step(images, labels)  # forward, loss, backward and SGD update: one op

The compiled operators are registered with PyTorch as torch.ops.mnist_fast.*.
"""
import torch  # noqa: F401  (the extension links against libtorch: load it first)

try:
    from . import _C  # registers torch.ops.mnist_fast.*
except ImportError as error:  # the usual causes, named: an unbuilt checkout, a wheel for another torch
    raise ImportError(
        f"mnist_fast's compiled extension could not be loaded from {__path__[0]}: {error}. In a source "
        "checkout, build it first (`make build`, or `pip install --no-build-isolation .`); an installed "
        f"wheel works only with the torch release it was built against (this is torch {torch.__version__})."
    ) from error
from . import _ops  # noqa: F401  (fake kernels for torch.compile and opcheck)
from . import functional, models, nn
from .nn import CrossEntropyLoss, FusedMLP, LinearReLU, fuse, unfuse
from .trainer import FusedTrainer

__version__ = "0.1.0"

__all__ = ["functional", "nn", "models", "LinearReLU", "FusedMLP", "CrossEntropyLoss", "fuse", "unfuse", "FusedTrainer",
           "cuda_compiled"]


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernels."""
    return _C.cuda_compiled()
