"""FusedTrainer: a whole SGD training step of an MLP classifier in one fused op.

    trainer = FusedTrainer(model, lr=0.01, momentum=0.9)
    for images, labels in loader:
        loss, correct = trainer.step(images, labels)

One call runs the forward pass, the mean cross-entropy, the backward pass and torch.optim.SGD's
update (momentum, dampening, weight decay, Nesterov) of every layer, on workspaces allocated once
per batch size. It is the same mathematics as

    loss = F.cross_entropy(model(images), labels); optimizer.zero_grad(); loss.backward(); optimizer.step()

with `optimizer = torch.optim.SGD(model.parameters(), ...)`, and the model's Parameters are updated
in place: they stay the single source of truth (model.state_dict(), checkpoints, evaluation with
model(x) work as usual). Parameter .grad fields are neither read nor written.

A whole epoch runs in a few calls, the batch gather included, with the same result bit for bit:

    losses, correct = trainer.fit_epoch(train_images, train_labels, batch_size=64, generator=g)

Supported models: MNISTNet, and nn.Sequential stacks (nested ones too) of LinearReLU, nn.Linear
followed by nn.ReLU, nn.Identity and a leading nn.Flatten, ending in a plain nn.Linear that gives the
logits; every layer with a bias; float32 or float64 parameters on one device. The CPU kernel is
the tested one; the CUDA kernel (csrc/cuda/train_step.cu) compiles but has not run on a GPU yet.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _C
from ._ops import fast_path
from ._adam import AdamSteps
from .models import MNISTNet
from .nn import FusedMLP, LinearReLU

__all__ = ["FusedTrainer"]

_OPS = torch.ops.mnist_fast
_train_step_sgd = fast_path("train_step_sgd")
_train_epoch_sgd = fast_path("train_epoch_sgd")
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


def _mlp_layers(model: nn.Module) -> List[nn.Linear]:
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


class FusedTrainer(AdamSteps):
    """SGD training of an MLP classifier with the whole step in one fused op.

    Arguments as torch.optim.SGD (lr, momentum, dampening, weight_decay, nesterov), plus the loss's
    ignore_index and label_smoothing as in nn.CrossEntropyLoss (mean reduction, class-index targets).
    The hyper-parameters are plain attributes and may be changed between steps (a learning-rate
    schedule assigns trainer.lr).

    optimizer='adam' or 'adamw' (CPU only): torch.optim.Adam's / AdamW's update instead of SGD's,
    with betas, eps and weight_decay as there (default weight_decay: 0 for Adam, 1e-2 for AdamW);
    step() then runs the fused forward/loss/backward and one fused Adam pass per parameter.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: Optional[float] = None, nesterov: bool = False, *, ignore_index: int = -100,
                 label_smoothing: float = 0.0, optimizer: str = "sgd", betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        layers = _mlp_layers(model)
        self.model = model
        self._params: List[nn.Parameter] = []
        for layer in layers:
            self._params += [layer.weight, layer.bias]
        first = self._params[0]
        if first.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"FusedTrainer: parameters must be float32 or float64, got {first.dtype}")
        if first.device.type == "cuda" and not _C.cuda_compiled():
            raise ValueError("FusedTrainer: this build of mnist_fast has no CUDA kernels")
        if first.device.type not in ("cpu", "cuda"):
            raise ValueError(f"FusedTrainer: CPU and CUDA models are supported, got {first.device}")
        for p in self._params:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError("FusedTrainer: every parameter must have the same dtype and device, got "
                                 f"{p.dtype} on {p.device} and {first.dtype} on {first.device}")
            if not p.is_contiguous():
                raise ValueError("FusedTrainer: parameters must be contiguous (they are updated in place)")
            if not p.requires_grad:
                raise ValueError("FusedTrainer: every parameter of the model is updated, but one has "
                                 "requires_grad=False (a frozen layer); train such a model with torch.optim.SGD")
        # Index of each of our parameters in model.parameters(): the numbering of an SGD state_dict.
        model_index = {id(p): i for i, p in enumerate(model.parameters())}
        if len(model_index) != len(self._params) or any(id(p) not in model_index for p in self._params):
            raise ValueError("FusedTrainer: the model has parameters outside its Linear layers (or shares one "
                             "between layers), which the fused step would not train")
        self._model_index = [model_index[id(p)] for p in self._params]
        weight_decay = self._init_optimizer(optimizer, weight_decay, momentum, dampening, nesterov, betas, eps)
        self._check_hyper(lr, momentum, dampening, weight_decay, nesterov)
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)
        self.ignore_index, self.label_smoothing = int(ignore_index), float(label_smoothing)
        self._buffers: Optional[List[Tensor]] = None  # momentum buffers, None until the first momentum step
        self._workspaces: Dict[Tuple, List[Tensor]] = {}

    @staticmethod
    def _check_hyper(lr, momentum, dampening, weight_decay, nesterov):
        # torch.optim.SGD's checks and messages, the very ones of the train_step_sgd op (csrc/checks.h).
        _C.check_sgd_options(lr, momentum, dampening, weight_decay, nesterov)

    def _workspace(self, x: Tensor) -> List[Tensor]:
        key = (x.shape[0], x.dtype, x.device)
        ws = self._workspaces.get(key)
        if ws is None:
            if len(self._workspaces) >= 4:  # batch sizes come and go (the last batch of an epoch)
                self._workspaces.clear()
            with torch.inference_mode(False):  # a later step outside inference mode writes to them
                ws = self._workspaces[key] = _OPS.train_step_workspace.default(x, self._params)
        return ws

    def step(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, int]:
        """One training step on a batch; returns (mean loss as a 0-d tensor, number of correct predictions
        among the rows that are not ignored).

        images: (N, ...) flattened to (N, in_features); labels: (N,) int64 class indices.
        """
        x, labels = self._inputs(images, labels, "step")
        if self.optimizer != "sgd":
            return self._adam_step(x, labels)
        buffers, first_step = self._momentum_buffers()
        loss, correct = _train_step_sgd(
            x, labels, self._params, buffers, self._workspace(x), self.lr, self.momentum, self.dampening,
            self.weight_decay, self.nesterov, first_step, self.ignore_index, self.label_smoothing)
        if first_step:  # only once the step went through: a rejected batch leaves no state behind
            self._buffers = buffers
        return loss, int(correct)

    def _inputs(self, images: Tensor, labels: Tensor, method: str) -> Tuple[Tensor, Tensor]:
        """images flattened to (N, in_features) and int64 labels, or a clear error."""
        if images.dim() < 2:
            raise ValueError(f"FusedTrainer.{method}: expected images of shape (N, ...) with N samples, got shape "
                             f"{tuple(images.shape)}")
        x = images.flatten(1)
        first = self._params[0]
        if x.dtype != first.dtype or x.device != first.device:
            raise TypeError(f"FusedTrainer.{method}: expected images of the parameters' dtype and device "
                            f"({first.dtype} on {first.device}), got {x.dtype} on {x.device}")
        if labels.dtype == torch.uint8:  # as F.cross_entropy, which also takes uint8 class indices
            labels = labels.long()
        return x, labels

    def fit_epoch(self, images: Tensor, labels: Tensor, batch_size: int,
                  generator: Optional[torch.Generator] = None, lr_schedule: Optional[Sequence[float]] = None, *,
                  order: Optional[Tensor] = None, chunk: Optional[int] = None,
                  on_chunk: Optional[Callable[[int, Tensor, Tensor], None]] = None) -> Tuple[Tensor, Tensor]:
        """One epoch of training steps in a few fused calls; returns the per-step (losses, correct counts)
        as tensors on the device.

        The same training, bit for bit, as the step loop

            order = torch.randperm(len(images), generator=generator)
            for s, start in enumerate(range(0, len(order), batch_size)):
                index = order[start:start + batch_size]
                trainer.step(images[index], labels[index])   # with lr = lr_schedule[s] when given

        but with the steps (batch gather included) run in C++, ``chunk`` steps per call (default: all
        of them in one call). images: (N, ...) on the parameters' device and of their dtype (all the
        training data, e.g. a normalized Split); labels: (N,) class indices. order: the sample order
        to use instead of a permutation drawn with ``generator`` (any 1-D index tensor, e.g.
        data.Batches.indices()). lr_schedule: one learning rate per step; trainer.lr (unchanged)
        otherwise. on_chunk(samples, losses, correct) is called after each call with the number of
        samples it trained and its steps' losses and correct counts (e.g. to update a progress bar).
        Every index and target of the epoch is checked before the first update.
        """
        x, labels = self._inputs(images, labels, "fit_epoch")
        if self.optimizer != "sgd":
            raise NotImplementedError(f"FusedTrainer.fit_epoch runs SGD; with optimizer={self.optimizer!r} "
                                      "call step() for each batch")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"FusedTrainer.fit_epoch: batch_size must be a positive int, got {batch_size!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"FusedTrainer.fit_epoch: chunk must be a positive number of steps, got {chunk!r}")
        if order is None:  # drawn on the CPU, as data.Batches does: the same order on every device
            order = torch.randperm(x.shape[0], generator=generator)
        elif generator is not None:
            raise ValueError("FusedTrainer.fit_epoch: pass either an order or a generator to draw one, not both")
        order = order.to(x.device)
        steps = -(-order.shape[0] // batch_size) if order.dim() == 1 else 0
        if lr_schedule is None:
            lrs = torch.full((steps,), self.lr, dtype=torch.float64)
        else:
            lrs = torch.as_tensor(lr_schedule, dtype=torch.float64, device="cpu").flatten()
            if lrs.shape[0] != steps:
                raise ValueError(f"FusedTrainer.fit_epoch: lr_schedule has {lrs.shape[0]} learning rates for "
                                 f"{steps} steps ({order.shape[0]} samples in batches of {batch_size})")
            if (lrs < 0).any():  # before the first step, not halfway through the epoch
                raise ValueError(f"Invalid learning rate: {lrs[lrs < 0][0].item()}")
        chunk = chunk or max(steps, 1)
        if chunk < steps:  # each call checks its own steps; a bad target in a later one must fail before the first
            self._check_epoch(x, labels, order, batch_size)
        losses, correct = [], []
        for first in range(0, max(steps, 1), chunk):
            last = min(first + chunk, steps)
            part = order[first * batch_size:last * batch_size]
            buffers, first_step = self._momentum_buffers()
            chunk_losses, chunk_correct = _train_epoch_sgd(
                x, labels, part, batch_size, lrs[first:last], self._params, buffers, self.momentum, self.dampening,
                self.weight_decay, self.nesterov, first_step, self.ignore_index, self.label_smoothing)
            if first_step and last > first:  # only once an update went through
                self._buffers = buffers
            losses.append(chunk_losses)
            correct.append(chunk_correct)
            if on_chunk is not None:
                on_chunk(part.shape[0], chunk_losses, chunk_correct)
        return torch.cat(losses), torch.cat(correct)

    def _check_epoch(self, x: Tensor, labels: Tensor, order: Tensor, batch_size: int) -> None:
        """The op's up-front checks of order and targets (csrc/train_epoch.cpp), over the whole epoch. What
        they need is checked by the op itself on the first call, before it trains."""
        n = x.shape[0]
        if order.dtype != torch.int64 or order.dim() != 1 or labels.dtype != torch.int64 or labels.shape != (n,):
            return
        low, high = (int(v) for v in torch.aminmax(order))
        if low < 0 or high >= n:
            raise IndexError(f"FusedTrainer.fit_epoch: order holds index {low if low < 0 else high}, out of range "
                             f"for {n} samples")
        targets = labels[order]
        classes = self._params[-1].shape[0]
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= classes))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"FusedTrainer.fit_epoch: Target {int(targets[i])} is out of bounds for {classes} "
                             f"classes (sample {int(order[i])}, step {i // batch_size}).")

    def _momentum_buffers(self) -> Tuple[List[Tensor], bool]:
        """The momentum buffers for the next step (none when momentum is 0) and whether that step is the
        first momentum step (new, unset buffers: the op sets buffer = gradient). The caller stores new
        buffers in self._buffers once the op went through, so that a rejected batch leaves no state."""
        if self.momentum == 0.0:
            return [], False
        buffers = self._buffers
        if buffers is None:
            with torch.inference_mode(False):  # a later step outside inference mode writes to them
                return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in self._params], True
        if any(b.dtype != p.dtype or b.device != p.device for b, p in zip(buffers, self._params)):
            # The model was moved or cast (model.double()): keep the state, as torch.optim.SGD does.
            buffers = self._buffers = [b.to(p) for b, p in zip(buffers, self._params)]
        return buffers, False

    def _group(self) -> Dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov, "maximize": False, "foreach": None,
                "differentiable": False, "fused": None, "params": list(range(len(self._params)))}

    def state_dict(self) -> Dict[str, Any]:
        """The optimizer state in torch.optim.SGD's format, parameters numbered as in model.parameters():
        torch.optim.SGD(model.parameters()).load_state_dict(trainer.state_dict()) continues the same run.
        As with SGD, the momentum buffers are returned by reference, not copied.
        With optimizer='adam'/'adamw': torch.optim.Adam's / AdamW's format instead."""
        if self.optimizer != "sgd":
            return self._adam_state_dict()
        state = {}
        if self._buffers is not None:
            for k, buf in enumerate(self._buffers):
                state[self._model_index[k]] = {"momentum_buffer": buf}
        return {"state": state, "param_groups": [self._group()]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores hyper-parameters and momentum buffers from FusedTrainer.state_dict() or from a
        torch.optim.SGD(model.parameters()) state_dict (one parameter group); with optimizer='adam'/'adamw',
        from an Adam / AdamW one."""
        if self.optimizer != "sgd":
            return self._load_adam_state_dict(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"FusedTrainer.load_state_dict: expected one parameter group, got {len(groups)}")
        group = groups[0]
        ids = list(group["params"])
        if len(ids) != len(self._params):
            raise ValueError(f"FusedTrainer.load_state_dict: the state has {len(ids)} parameters, the model "
                             f"{len(self._params)}")
        if group.get("maximize", False):
            raise ValueError("FusedTrainer.load_state_dict: maximize=True is not supported")
        hyper = [group.get(k, d) for k, d in
                 (("lr", 1e-3), ("momentum", 0.0), ("dampening", 0.0), ("weight_decay", 0.0), ("nesterov", False))]
        hyper = [float(h) if isinstance(h, Tensor) else h for h in hyper]
        self._check_hyper(*hyper)
        # Parameter number ids[pos] of the saved state is model.parameters()[pos].
        saved = state_dict["state"]
        buffers = []
        for k, p in enumerate(self._params):
            entry = saved.get(ids[self._model_index[k]], {})
            buf = entry.get("momentum_buffer")
            if buf is not None and buf.shape != p.shape:
                raise ValueError(f"FusedTrainer.load_state_dict: momentum buffer of shape {tuple(buf.shape)} for a "
                                 f"parameter of shape {tuple(p.shape)}")
            buffers.append(buf)
        have = [b is not None for b in buffers]
        if any(have) and not all(have):
            raise ValueError("FusedTrainer.load_state_dict: momentum buffers for only some of the parameters")
        self.lr, self.momentum, self.dampening, self.weight_decay = (float(h) for h in hyper[:4])
        self.nesterov = bool(hyper[4])
        if all(have):
            self._buffers = [b.detach().to(dtype=p.dtype, device=p.device, copy=True).contiguous()
                             for b, p in zip(buffers, self._params)]
        else:
            self._buffers = None

    def __repr__(self) -> str:
        sizes = [self._params[0].shape[1]] + [w.shape[0] for w in self._params[::2]]
        if self.optimizer != "sgd":
            return (f"FusedTrainer({'-'.join(map(str, sizes))}, optimizer={self.optimizer!r}, lr={self.lr}, "
                    f"betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay})")
        return (f"FusedTrainer({'-'.join(map(str, sizes))}, lr={self.lr}, momentum={self.momentum}, "
                f"dampening={self.dampening}, weight_decay={self.weight_decay}, nesterov={self.nesterov})")
