"""FusedTrainer: a whole SGD (or Adam) training step of an MLP classifier in one fused op, as a
torch.optim.Optimizer.

    trainer = FusedTrainer(model, lr=0.01, momentum=0.9)
    for images, labels in loader:
        loss, correct = trainer.step(images, labels)

One call runs the forward pass, the mean cross-entropy, the backward pass and torch.optim.SGD's
update (momentum, dampening, weight decay, Nesterov) of every layer, on workspaces allocated once
per batch size. It is the same mathematics as

    loss = F.cross_entropy(model(images), labels); optimizer.zero_grad(); loss.backward(); optimizer.step()

with `optimizer = torch.optim.SGD(model.parameters(), ...)`, and the model's Parameters are updated
in place: they stay the single source of truth (model.state_dict(), checkpoints, evaluation with
model(x) work as usual). Parameter .grad fields are neither read nor written. The trainer is an
Optimizer (param_groups, lr schedulers, the stock state_dict format); optimizer='adam' / 'adamw'
runs torch.optim.Adam's / AdamW's update instead, and under torch.distributed the gradients are
averaged between the backward pass and the update (the train_step_grads op, one all-reduce, then
the update).

A whole epoch runs in a few calls, the batch gather included, with the same result bit for bit:

    losses, correct = trainer.fit_epoch(train_images, train_labels, batch_size=64, generator=g)

Supported models: MNISTNet, and nn.Sequential stacks (nested ones too) of LinearReLU, nn.Linear
followed by nn.ReLU, nn.Identity and a leading nn.Flatten, ending in a plain nn.Linear that gives the
logits; every layer with a bias; float32 or float64 parameters on one device. The CPU kernel is
the tested one; the CUDA kernel (csrc/cuda/train_step.cu) compiles but has not run on a GPU yet.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import optimizer as _optimizer_module
from torch.optim.sgd import sgd as _sgd  # torch.optim.SGD's update, given the gradients

from . import _C
from ._adam import ADAM_DEFAULTS, OPTIMIZERS, adam_defaults, adam_update, check_adam
from ._epoch import EpochSteps
from ._mlp_layers import mlp_layers
from ._ops import fast_path
from .distributed import broadcast_from_rank_0, trainer_world_size

__all__ = ["FusedTrainer"]

_OPS = torch.ops.mnist_fast
_train_step_sgd = fast_path("train_step_sgd")
_train_step_grads = fast_path("train_step_grads")
# torch.optim.SGD's parameter group without lr.
SGD_DEFAULTS = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False,
                "foreach": None, "differentiable": False, "fused": None}


def _option(key: str) -> property:
    """trainer.<key>: param_groups[0][key], what torch.optim.lr_scheduler and load_state_dict write."""
    def get(self):
        group = self.param_groups[0]
        if key not in group:
            raise AttributeError(f"FusedTrainer(optimizer={self.optimizer!r}) has no option {key!r}")
        return group[key]

    def set(self, value):
        get(self)
        self.param_groups[0][key] = value

    return property(get, set, doc=f"param_groups[0][{key!r}]")


class FusedTrainer(EpochSteps, torch.optim.Optimizer):
    """SGD (or Adam, AdamW) training of an MLP classifier with the whole step in one fused op, as a
    torch.optim.Optimizer.

    Arguments as torch.optim.SGD (lr, momentum, dampening, weight_decay, nesterov), plus the loss's
    ignore_index and label_smoothing as in nn.CrossEntropyLoss (mean reduction, class-index targets).
    optimizer='adam' or 'adamw' (CPU only): torch.optim.Adam's / AdamW's update instead of SGD's, with
    betas, eps and weight_decay as there (default weight_decay: 0 for Adam, 1e-2 for AdamW).

    As an Optimizer: one parameter group, the model's parameters in model.parameters() order, with
    torch.optim.SGD's (Adam's) keys; every step reads its options from param_groups[0], so
    torch.optim.lr_scheduler.* schedule it, and trainer.lr, trainer.momentum, ... are that group's
    entries. state_dict() and load_state_dict() are the Optimizer ones, in torch.optim.SGD's (Adam's)
    format: either way between the trainer and torch.optim.SGD(model.parameters()) (Adam, AdamW).
    maximize and amsgrad are not supported (a group with either True is refused).

    step(images, labels) takes the batch and returns (loss, correct): there is no closure, since the
    fused op computes the loss itself. zero_grad() is harmless (the step does not use .grad).

    It follows the model as torch.optim.SGD (Adam) would: a parameter frozen (requires_grad=False) is
    not updated, and its state is kept, until it is unfrozen; a model moved or cast keeps the
    optimizer state. A parameter replaced after construction (model.load_state_dict(sd, assign=True),
    layer.weight = nn.Parameter(...)) is refused at the next step: a stock optimizer would go on
    updating the old tensor, which the model no longer uses.

    distributed: all-reduce the gradients between the backward pass and the update, averaged over the
    processes as DistributedDataParallel does, in one flat buffer (one collective per step); the
    parameters are broadcast from rank 0 here, as DDP does when it wraps a model. None (default):
    when torch.distributed is initialized with more than one process. Each process steps on its own
    batch; every process must take the same number of steps.
    """

    lr = _option("lr")
    momentum = _option("momentum")
    dampening = _option("dampening")
    weight_decay = _option("weight_decay")
    nesterov = _option("nesterov")
    betas = _option("betas")
    eps = _option("eps")

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: Optional[float] = None, nesterov: bool = False, *, ignore_index: int = -100,
                 label_smoothing: float = 0.0, optimizer: str = "sgd", betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, distributed: Optional[bool] = None):
        layers = mlp_layers(model)
        params: List[nn.Parameter] = []
        for layer in layers:
            params += [layer.weight, layer.bias]
        first = params[0]
        if first.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"FusedTrainer: parameters must be float32 or float64, got {first.dtype}")
        if first.device.type == "cuda" and not _C.cuda_compiled():
            raise ValueError("FusedTrainer: this build of mnist_fast has no CUDA kernels")
        if first.device.type not in ("cpu", "cuda"):
            raise ValueError(f"FusedTrainer: CPU and CUDA models are supported, got {first.device}")
        for p in params:
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError("FusedTrainer: every parameter must have the same dtype and device, got "
                                 f"{p.dtype} on {p.device} and {first.dtype} on {first.device}")
            if not p.is_contiguous():
                raise ValueError("FusedTrainer: parameters must be contiguous (they are updated in place)")
        model_params = list(model.parameters())
        if len(model_params) != len(params) or {id(p) for p in model_params} != {id(p) for p in params}:
            raise ValueError("FusedTrainer: the model has parameters outside its Linear layers (or shares one "
                             "between layers), which the fused step would not train")
        if optimizer == "sgd":
            defaults = {**SGD_DEFAULTS, "lr": float(lr), "momentum": float(momentum), "dampening": float(dampening),
                        "weight_decay": 0.0 if weight_decay is None else float(weight_decay),
                        "nesterov": bool(nesterov)}
            self._check_sgd(defaults, defaults["lr"])
        elif optimizer in OPTIMIZERS:
            if momentum != 0.0 or dampening != 0.0 or nesterov:
                raise ValueError(f"FusedTrainer: momentum, dampening and nesterov are SGD options, not {optimizer}'s")
            if first.device.type != "cpu":
                raise ValueError(f"FusedTrainer: optimizer={optimizer!r} runs on the CPU only")
            defaults = adam_defaults(optimizer, lr, betas, eps, weight_decay)
        else:
            raise ValueError(f"FusedTrainer: optimizer must be one of {('sgd', *OPTIMIZERS)}, got {optimizer!r}")
        # The group in model.parameters() order: the numbering of a stock optimizer's state_dict.
        super().__init__(model_params, defaults)
        self.model, self.optimizer = model, optimizer
        self.ignore_index, self.label_smoothing = int(ignore_index), float(label_smoothing)
        self._params = params  # in the op's order: [W_0, b_0, W_1, b_1, ...]
        names = {id(p): name for name, p in model.named_parameters()}
        # Where each parameter lives, to notice one replaced after construction.
        self._slots = [(layer, attr, names[id(getattr(layer, attr))]) for layer in layers for attr in ("weight", "bias")]
        self._workspaces: Dict[Tuple, Tuple[List[Tensor], Tensor]] = {}
        self._world_size = trainer_world_size(distributed)
        if self._world_size > 1:
            broadcast_from_rank_0(params)
        self._fused_op = optimizer == "sgd" and self._world_size == 1  # train_step_sgd can run (see _fused_sgd)
        self._checked_buffers: Tuple[Any, List[Tensor]] = (None, [])

    # ---- torch.optim.Optimizer ----

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("FusedTrainer trains one parameter group, its model's; another cannot be added")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim.Optimizer.load_state_dict, from a FusedTrainer's or a stock optimizer's state_dict
        (torch.optim.SGD(model.parameters()), or Adam / AdamW's for optimizer='adam' / 'adamw'): the
        options come from the state too. Everything is checked before anything changes, and the state's
        tensors are copied (torch.optim's optimizers would share them with state_dict)."""
        defaults = self._torch_defaults()
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"FusedTrainer.load_state_dict: expected one parameter group, got {len(groups)}")
        group = {**defaults, **groups[0]}
        ids = list(group["params"])
        if len(ids) != len(self._params):
            raise ValueError(f"FusedTrainer.load_state_dict: the state has {len(ids)} parameters, the model "
                             f"{len(self._params)}")
        if self.optimizer == "sgd":
            if "betas" in group:
                raise ValueError("FusedTrainer.load_state_dict: optimizer='sgd' needs an SGD state_dict, got Adam's")
            if group["maximize"]:
                raise ValueError("FusedTrainer: maximize=True is not supported")
            self._check_sgd(group, group["lr"])
        else:
            if "betas" not in groups[0]:
                raise ValueError(f"FusedTrainer.load_state_dict: optimizer={self.optimizer!r} needs an Adam state_dict")
            if bool(group["decoupled_weight_decay"]) != (self.optimizer == "adamw"):
                raise ValueError(f"FusedTrainer.load_state_dict: the state is not {self.optimizer}'s "
                                 "(decoupled_weight_decay differs)")
            check_adam(group)
        for k, p in zip(ids, self.param_groups[0]["params"]):
            for name, value in state_dict["state"].get(k, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(f"FusedTrainer.load_state_dict: {name.replace('_', ' ')} of shape "
                                     f"{tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")
        # Copies, contiguous (the ops need it): stepping must not write into the caller's tensors.
        state = {k: {name: v.clone(memory_format=torch.contiguous_format) if isinstance(v, Tensor) else v
                     for name, v in entry.items()} for k, entry in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
        for key, value in defaults.items():  # a state from an older torch may lack the newer keys
            self.param_groups[0].setdefault(key, value)
        for entry in self.state.values():
            if "step" in entry and not isinstance(entry["step"], Tensor):
                entry["step"] = torch.tensor(float(entry["step"]))  # as Adam keeps it

    def _torch_defaults(self) -> Dict[str, Any]:
        if self.optimizer == "sgd":
            return SGD_DEFAULTS
        return {**ADAM_DEFAULTS, "decoupled_weight_decay": self.optimizer == "adamw"}

    def __getstate__(self) -> Dict[str, Any]:
        # All of it (Optimizer's keeps only its own three entries), without the workspaces: rebuilt on use.
        return {**self.__dict__, "_workspaces": {}}

    # ---- training ----

    def step(self, images: Optional[Tensor] = None, labels: Optional[Tensor] = None,
             closure: None = None) -> Tuple[Tensor, int]:
        """One training step on a batch; returns (mean loss as a 0-d tensor, number of correct predictions
        among the rows that are not ignored).

        images: (N, ...) flattened to (N, in_features); labels: (N,) int64 class indices. Unlike
        Optimizer.step(closure), it takes the batch: the fused op computes the loss itself.
        """
        # Optimizer's wrapper (step hooks, a profiler range) costs ~10 us a step: only when it has work.
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _hooks_or_profiler():
            return _hooked_step(self, images, labels, closure)
        return _step(self, images, labels, closure)

    step.hooked = True  # tells Optimizer.__init__ not to wrap it: step does so itself when needed

    def _step(self, images, labels, closure) -> Tuple[Tensor, int]:
        if closure is not None or images is None or labels is None or callable(images):
            raise TypeError("FusedTrainer.step(images, labels) takes the batch to train on: it computes the loss "
                            "itself in the fused op, so it has no closure to call")
        x, labels = self._inputs(images, labels, "step")
        loss, correct = self._train_batch(x, labels, self._current_params(), self.param_groups[0]["lr"])
        return loss, int(correct)

    def _train_batch(self, x: Tensor, labels: Tensor, params: List[Tensor], lr: float) -> Tuple[Tensor, Tensor]:
        """One step at learning rate lr: the fused SGD op where it can run, else the gradients op, the
        all-reduce and the update of the parameters that require grad."""
        fused = self._fused_sgd(params)
        group = self.param_groups[0]
        if fused is not None:
            buffers, first_step = fused
            loss, correct = _train_step_sgd(
                x, labels, params, buffers, self._workspace(x), lr, group["momentum"], group["dampening"],
                group["weight_decay"], group["nesterov"], first_step, self.ignore_index, self.label_smoothing)
            if first_step:  # only once the step went through: a rejected batch leaves no state behind
                self._store_buffers(params, buffers)
            return loss, correct
        if self.optimizer == "sgd":
            self._check_sgd(group, lr)
        else:
            check_adam({**group, "lr": lr})
        workspace, flat = self._workspace_and_grads(x)
        loss, correct = _train_step_grads(x, labels, params, workspace, self.ignore_index, self.label_smoothing)
        if self._world_size > 1:  # averaged as DistributedDataParallel does: divided, then summed
            flat.div_(self._world_size)
            dist.all_reduce(flat)
        grads = workspace[len(workspace) - len(params):]
        trainable = [k for k, p in enumerate(params) if p.requires_grad]
        params, grads = [params[k] for k in trainable], [grads[k] for k in trainable]
        if self.optimizer != "sgd":
            adam_update(self.state, params, grads, group, lr)
            return loss, correct
        momentum = group["momentum"]
        buffers = self._momentum_buffer_list(params) if momentum != 0.0 else []
        with torch.inference_mode(False), torch.no_grad():  # new buffers: not inference tensors
            _sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=momentum, lr=lr,
                 dampening=group["dampening"], nesterov=group["nesterov"], maximize=False)
        if momentum != 0.0:
            self._store_buffers(params, buffers)
        return loss, correct

    def _fused_sgd(self, params: List[Tensor]) -> Optional[Tuple[List[Tensor], bool]]:
        """(momentum buffers, first momentum step) for the train_step_sgd op, or None where that op cannot
        run: another optimizer, an all-reduce, a frozen parameter, buffers for some parameters only.
        New buffers are unset (the op sets buffer = gradient); the caller stores them once the op went
        through, so that a rejected batch leaves no state."""
        group = self.param_groups[0]
        if group["maximize"]:
            raise ValueError("FusedTrainer: maximize=True is not supported")
        if not self._fused_op or not all([p.requires_grad for p in params]):
            return None
        if group["momentum"] == 0.0:
            return [], False
        # The buffers the last call checked, while the state still holds them and the model was not cast.
        kind, checked = self._checked_buffers
        if kind == (params[0].dtype, params[0].device) and all(
                [self.state.get(p, _NO_STATE).get("momentum_buffer") is b for p, b in zip(params, checked)]):
            return checked, False
        buffers = self._momentum_buffer_list(params)
        if all(b is None for b in buffers):
            with torch.inference_mode(False):  # a later step outside inference mode writes to them
                return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params], True
        if any(b is None for b in buffers):
            return None
        self._checked_buffers = (params[0].dtype, params[0].device), buffers
        return buffers, False

    def _momentum_buffer_list(self, params: List[Tensor]) -> List[Optional[Tensor]]:
        """Each parameter's momentum buffer or None, of its dtype and device (the model was moved or cast:
        the state is kept, as torch.optim.SGD keeps it) and contiguous (the op needs it)."""
        buffers = []
        for p in params:
            entry = self.state.get(p)
            buf = entry.get("momentum_buffer") if entry else None
            if buf is not None and (buf.dtype != p.dtype or buf.device != p.device or not buf.is_contiguous()):
                buf = entry["momentum_buffer"] = buf.to(p, memory_format=torch.contiguous_format)
            buffers.append(buf)
        return buffers

    def _store_buffers(self, params: List[Tensor], buffers: List[Tensor]) -> None:
        for p, buf in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buf

    @staticmethod
    def _check_sgd(group: Dict[str, Any], lr: float) -> None:
        # torch.optim.SGD's checks and messages, the very ones of the train_step_sgd op (csrc/checks.h).
        _C.check_sgd_options(float(lr), float(group["momentum"]), float(group["dampening"]),
                             float(group["weight_decay"]), bool(group["nesterov"]))

    def _current_params(self) -> List[Tensor]:
        """The parameters in the op's order, or an error if the model has replaced one since construction."""
        for (layer, attr, name), p in zip(self._slots, self._params):
            if layer._parameters.get(attr) is not p:
                raise RuntimeError(
                    f"FusedTrainer: the model's parameter '{name}' was replaced after the trainer was built (by "
                    "load_state_dict(..., assign=True), or a new nn.Parameter); torch.optim.SGD would go on "
                    "updating the old tensor, which the model no longer uses. Build a new FusedTrainer for the "
                    "model (new_trainer.load_state_dict(trainer.state_dict()) keeps the optimizer state)")
        return self._params

    def _workspace(self, x: Tensor) -> List[Tensor]:
        """The op's workspace for x's batch size."""
        return self._workspace_and_grads(x)[0]

    def _workspace_and_grads(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        """The op's workspace for x's batch size, the parameters' gradients in it as views of one flat
        buffer (returned too): the all-reduce sends that buffer whole."""
        key = (x.shape[0], x.dtype, x.device)
        entry = self._workspaces.get(key)
        if entry is None:
            if len(self._workspaces) >= 4:  # batch sizes come and go (the last batch of an epoch)
                self._workspaces.clear()
            sizes = [p.numel() for p in self._params]
            with torch.inference_mode(False):  # a later step outside inference mode writes to them
                workspace = list(_OPS.train_step_workspace.default(x, self._params))
                flat = torch.empty(sum(sizes), dtype=x.dtype, device=x.device)
                workspace[len(workspace) - len(sizes):] = [
                    g.view(p.shape) for g, p in zip(flat.split(sizes), self._params)]
            entry = self._workspaces[key] = (workspace, flat)
        return entry

    def _inputs(self, images: Tensor, labels: Tensor, method: str,
                pixel_values: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """images flattened to (N, in_features) and int64 labels, or a clear error. uint8 images (fit_epoch)
        come with pixel_values, the input value of each byte value."""
        if images.dim() < 2:
            raise ValueError(f"FusedTrainer.{method}: expected images of shape (N, ...) with N samples, got shape "
                             f"{tuple(images.shape)}")
        x = images.flatten(1)
        first = self._params[0]
        if pixel_values is not None or x.dtype == torch.uint8:
            if x.dtype != torch.uint8 or pixel_values is None:
                raise TypeError(f"FusedTrainer.{method}: uint8 images and pixel_values go together (the input "
                                f"value of each byte value, e.g. data.pixel_values()); got {x.dtype} images and "
                                f"{'no' if pixel_values is None else 'a'} pixel_values")
            if pixel_values.shape != (256,) or pixel_values.dtype != first.dtype or pixel_values.device != first.device:
                raise TypeError(f"FusedTrainer.{method}: expected pixel_values of shape (256,) with the parameters' "
                                f"dtype and device ({first.dtype} on {first.device}), got shape "
                                f"{tuple(pixel_values.shape)}, {pixel_values.dtype} on {pixel_values.device}")
            if x.device != first.device:
                raise TypeError(f"FusedTrainer.{method}: expected images on the parameters' device ({first.device}), "
                                f"got {x.device}")
        elif x.dtype != first.dtype or x.device != first.device:
            raise TypeError(f"FusedTrainer.{method}: expected images of the parameters' dtype and device "
                            f"({first.dtype} on {first.device}), got {x.dtype} on {x.device}")
        if labels.dtype == torch.uint8:  # as F.cross_entropy, which also takes uint8 class indices
            labels = labels.long()
        return x, labels

    def __repr__(self) -> str:
        sizes = [self._params[0].shape[1]] + [w.shape[0] for w in self._params[::2]]
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov") if self.optimizer == "sgd" else \
            ("lr", "betas", "eps", "weight_decay")
        options = "".join(f", {key}={self.param_groups[0][key]}" for key in keys)
        kind = "" if self.optimizer == "sgd" else f", optimizer={self.optimizer!r}"
        distributed = f", world_size={self._world_size}" if self._world_size > 1 else ""
        return f"FusedTrainer({'-'.join(map(str, sizes))}{kind}{options}{distributed})"


_NO_STATE: Dict[str, Any] = {}
_hooked_step = torch.optim.Optimizer.profile_hook_step(FusedTrainer._step)
_step = FusedTrainer._step
_GLOBAL_HOOKS = [getattr(_optimizer_module, name, None)
                 for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")]


def _hooks_or_profiler() -> bool:
    """Whether a global optimizer step hook is registered (or torch's registry of them has moved) or the
    profiler is on: then step runs through Optimizer's wrapper."""
    return any(hooks is None or hooks for hooks in _GLOBAL_HOOKS) or torch._C._autograd._profiler_enabled()
