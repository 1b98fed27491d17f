"""The training recipe of mnist_fast.train: the model of each backend, the optimizer and the
learning-rate schedule."""
import math

import torch
from torch import nn

from .models import MNISTNet, stock_mlp
from .nn import CrossEntropyLoss
from .trainer import FusedTrainer

__all__ = ["build_model", "training_criterion", "build_optimizer", "build_fused_trainer", "learning_rate",
           "set_learning_rate"]


def build_model(backend: str):
    """(model, criterion) of a backend. Both models produce outputs whose argmax is the class and
    whose softmax gives the class probabilities (logits for fused, log-probabilities for stock), and
    both are built in the same order, so one seed gives both the same initial weights."""
    if backend in ("fused", "fused-step"):
        return MNISTNet(), CrossEntropyLoss()
    if backend == "stock":
        return stock_mlp(log_softmax=True), nn.NLLLoss()
    raise ValueError(f"unknown backend {backend!r}")


def training_criterion(backend: str, label_smoothing: float) -> nn.Module:
    """The loss a backend trains with (build_model's criterion, which scores, has no smoothing).
    The stock model outputs log-probabilities; cross-entropy of those is exactly that of the logits
    (log_softmax leaves log-probabilities unchanged), so stock's smoothed loss is nn.CrossEntropyLoss."""
    if backend in ("fused", "fused-step"):
        return CrossEntropyLoss(label_smoothing=label_smoothing)
    if not label_smoothing:
        return nn.NLLLoss()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def learning_rate(args, epoch: int) -> float:
    """The learning rate of epoch `epoch` (0-based): a function of the options alone, so a resumed
    run needs no scheduler state."""
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return args.lr


def build_optimizer(args, parameters) -> torch.optim.Optimizer:
    """SGD or Adam, with PyTorch's fused (single-kernel) update where this torch has one for the
    device: measured here it takes 32 instead of 80 us per SGD step, about a tenth of a step."""
    parameters = list(parameters)
    if args.optimizer == "sgd":
        optimizer_class, options = torch.optim.SGD, {"lr": args.lr, "momentum": args.momentum}
    else:
        optimizer_class, options = torch.optim.Adam, {"lr": args.lr}
    options["weight_decay"] = args.weight_decay  # L2, added to the gradient (Adam's too: not AdamW)
    try:
        return optimizer_class(parameters, fused=True, **options)
    except (RuntimeError, TypeError):  # an older torch, or no fused kernel for this device
        return optimizer_class(parameters, **options)


def build_fused_trainer(args, model) -> FusedTrainer:
    """--backend fused-step: the same SGD (momentum, weight decay) or Adam (L2 weight decay, not AdamW's) and
    smoothed loss as build_optimizer and training_criterion, in one op per step. Under torchrun the trainer
    all-reduces the gradients itself (torch.distributed is initialized by then)."""
    options = {"momentum": args.momentum} if args.optimizer == "sgd" else {}
    return FusedTrainer(model, lr=args.lr, weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                        optimizer=args.optimizer, **options)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # FusedTrainer's too: it is an Optimizer
        group["lr"] = lr
