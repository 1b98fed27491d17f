"""FusedTrainer's Adam and AdamW (csrc/cpu/adam.cpp), kept apart from its SGD core.

The train step computes the gradients (an SGD step with lr 0 leaves every parameter as it is,
p - 0 * g, and leaves the gradients in its workspace); one fused pass per parameter then does
torch.optim.Adam's (AdamW's) update of exp_avg, exp_avg_sq and the parameter.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ._ops import fast_path

__all__ = ["AdamSteps"]

_train_step_sgd = fast_path("train_step_sgd")
_adam_update = fast_path("adam_update")


class AdamSteps:
    """The Adam/AdamW half of FusedTrainer (a mixin: it uses the trainer's parameters and workspace)."""

    _OPTIMIZERS = ("sgd", "adam", "adamw")

    def _init_optimizer(self, optimizer, weight_decay, momentum, dampening, nesterov, betas, eps) -> float:
        """Sets the optimizer and its Adam options; returns weight_decay with the optimizer's default."""
        if optimizer not in self._OPTIMIZERS:
            raise ValueError(f"FusedTrainer: optimizer must be one of {self._OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        self._adam: Optional[Dict[str, Any]] = None  # step, exp_avgs, exp_avg_sqs: None until the first step
        if optimizer == "sgd":
            return 0.0 if weight_decay is None else weight_decay
        if momentum != 0.0 or dampening != 0.0 or nesterov:
            raise ValueError(f"FusedTrainer: momentum, dampening and nesterov are SGD options, not {optimizer}'s")
        if self._params[0].device.type != "cpu":
            raise ValueError(f"FusedTrainer: optimizer={optimizer!r} runs on the CPU only")
        self._check_adam(betas, eps)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        return (1e-2 if optimizer == "adamw" else 0.0) if weight_decay is None else weight_decay  # torch's defaults

    @staticmethod
    def _check_adam(betas, eps):
        # torch.optim.Adam's checks and messages.
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")

    def _adam_step(self, x: Tensor, labels: Tensor) -> Tuple[Tensor, int]:
        ws = self._workspace(x)
        loss, correct = _train_step_sgd(x, labels, self._params, [], ws, 0.0, 0.0, 0.0, 0.0, False, False,
                                        self.ignore_index, self.label_smoothing)
        grads = ws[len(ws) - len(self._params):]  # the parameters' gradients (layout: csrc/checks.h)
        state = self._adam
        if state is None:
            with torch.inference_mode(False):
                state = {"step": 0, "exp_avgs": [torch.zeros_like(p) for p in self._params],
                         "exp_avg_sqs": [torch.zeros_like(p) for p in self._params]}
        elif any(m.dtype != p.dtype or m.device != p.device for m, p in zip(state["exp_avgs"], self._params)):
            state = {"step": state["step"], **{k: [t.to(p) for t, p in zip(state[k], self._params)]
                                               for k in ("exp_avgs", "exp_avg_sqs")}}
        _adam_update(self._params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["step"] + 1, self.lr,
                     self.betas[0], self.betas[1], self.eps, self.weight_decay, self.optimizer == "adamw")
        state["step"] += 1
        self._adam = state
        return loss, int(correct)

    def _adam_group(self) -> Dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay,
                "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                "fused": None, "decoupled_weight_decay": self.optimizer == "adamw",
                "params": list(range(len(self._params)))}

    def _adam_state_dict(self) -> Dict[str, Any]:
        state = {}
        if self._adam is not None:
            step = torch.tensor(float(self._adam["step"]))
            for k in range(len(self._params)):
                state[self._model_index[k]] = {"step": step.clone(), "exp_avg": self._adam["exp_avgs"][k],
                                               "exp_avg_sq": self._adam["exp_avg_sqs"][k]}
        return {"state": state, "param_groups": [self._adam_group()]}

    def _load_adam_state_dict(self, state_dict: Dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"FusedTrainer.load_state_dict: expected one parameter group, got {len(groups)}")
        group = groups[0]
        ids = list(group["params"])
        if len(ids) != len(self._params):
            raise ValueError(f"FusedTrainer.load_state_dict: the state has {len(ids)} parameters, the model "
                             f"{len(self._params)}")
        if "betas" not in group:
            raise ValueError(f"FusedTrainer.load_state_dict: optimizer={self.optimizer!r} needs an Adam state_dict")
        for option in ("amsgrad", "maximize"):
            if group.get(option, False):
                raise ValueError(f"FusedTrainer.load_state_dict: {option}=True is not supported")
        if bool(group.get("decoupled_weight_decay", False)) != (self.optimizer == "adamw"):
            raise ValueError(f"FusedTrainer.load_state_dict: the state is not {self.optimizer}'s "
                             "(decoupled_weight_decay differs)")
        lr, betas, eps, weight_decay = (group.get(k, d) for k, d in
                                        (("lr", 1e-3), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("weight_decay", 0.0)))
        lr, eps, weight_decay = (float(v) for v in (lr, eps, weight_decay))
        betas = tuple(float(b) for b in betas)
        self._check_hyper(lr, 0.0, 0.0, weight_decay, False)
        self._check_adam(betas, eps)
        saved = state_dict["state"]
        entries = [saved.get(ids[self._model_index[k]]) for k in range(len(self._params))]
        if any(e is not None for e in entries) and not all(e is not None for e in entries):
            raise ValueError("FusedTrainer.load_state_dict: Adam state for only some of the parameters")
        adam = None
        if entries and entries[0] is not None:
            steps = {float(e["step"]) for e in entries}
            if len(steps) != 1:
                raise ValueError(f"FusedTrainer.load_state_dict: the parameters are at different steps {sorted(steps)}")
            adam = {"step": int(steps.pop())}
            for key, name in (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq")):
                tensors = []
                for e, p in zip(entries, self._params):
                    t = e[name]
                    if t.shape != p.shape:
                        raise ValueError(f"FusedTrainer.load_state_dict: {name} of shape {tuple(t.shape)} for a "
                                         f"parameter of shape {tuple(p.shape)}")
                    tensors.append(t.detach().to(dtype=p.dtype, device=p.device, copy=True).contiguous())
                adam[key] = tensors
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self._adam = adam
