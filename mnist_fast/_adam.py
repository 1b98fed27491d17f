"""FusedTrainer's Adam and AdamW: torch.optim.Adam's options and checks, and its update as one fused
pass per parameter (csrc/cpu/adam.cpp), given the gradients the train_step_grads op left in the
trainer's workspace.
"""
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

from ._ops import fast_path

__all__ = ["OPTIMIZERS", "ADAM_DEFAULTS", "adam_defaults", "check_adam", "adam_entry", "adam_update"]

_adam_update = fast_path("adam_update")

OPTIMIZERS = ("adam", "adamw")
# torch.optim.Adam's parameter group without lr (AdamW: decoupled_weight_decay=True, weight_decay=1e-2).
ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False,
                 "foreach": None, "capturable": False, "differentiable": False, "fused": None,
                 "decoupled_weight_decay": False}


def adam_defaults(optimizer: str, lr: float, betas: Sequence[float], eps: float, weight_decay) -> Dict[str, Any]:
    """The parameter group torch.optim.Adam (AdamW) would make, checked as it checks it."""
    if weight_decay is None:  # torch's defaults
        weight_decay = 1e-2 if optimizer == "adamw" else 0.0
    group = {**ADAM_DEFAULTS, "lr": float(lr), "betas": (float(betas[0]), float(betas[1])), "eps": float(eps),
             "weight_decay": float(weight_decay), "decoupled_weight_decay": optimizer == "adamw"}
    check_adam(group)
    return group


def check_adam(group: Dict[str, Any]) -> None:
    """torch.optim.Adam's checks and messages (the adam_update op makes them too, but only after the
    gradients are computed); ValueError."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    for option in ("amsgrad", "maximize"):
        if group[option]:
            raise ValueError(f"FusedTrainer: {option}=True is not supported")


def adam_entry(entry: Dict[str, Any], p: Tensor) -> Dict[str, Any]:
    """entry, p's Adam state, ready for a step of p (updated in place and returned): created empty as
    Adam creates it at p's first step (step 0, zero moments), its moments in p's dtype and device."""
    if not entry:
        with torch.inference_mode(False):  # a later step outside inference mode writes to them
            entry.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.contiguous_format),
                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.contiguous_format))
    for key in ("exp_avg", "exp_avg_sq"):  # the model was moved or cast: keep the state, as Adam does
        t = entry[key]
        if t.dtype != p.dtype or t.device != p.device or not t.is_contiguous():
            entry[key] = t.to(p, memory_format=torch.contiguous_format)
    return entry


def adam_update(state: Dict[Tensor, Dict[str, Any]], params: List[Tensor], grads: List[Tensor],
                group: Dict[str, Any], lr: float) -> None:
    """torch.optim.Adam's step of params given their grads, with its per-parameter state (step,
    exp_avg, exp_avg_sq) in state, created at a parameter's first step as Adam creates it."""
    entries = [adam_entry(state[p], p) for p in params]
    # One fused call per step count (parameters frozen for a while lag behind the others).
    steps = torch.stack([e["step"] for e in entries]).tolist() if entries else []
    beta1, beta2 = group["betas"]
    for step in sorted(set(steps)):
        at = [k for k, s in enumerate(steps) if s == step]
        _adam_update([params[k] for k in at], [grads[k] for k in at], [entries[k]["exp_avg"] for k in at],
                     [entries[k]["exp_avg_sq"] for k in at], int(step) + 1, lr, beta1, beta2, group["eps"],
                     group["weight_decay"], group["decoupled_weight_decay"])
    if entries:
        torch._foreach_add_([e["step"] for e in entries], 1.0)
