"""FusedTrainer.fit_epoch: a whole epoch of training steps, batch gather included, in a few calls of
the train_epoch_sgd or train_epoch_adam op (on one process, every parameter trained) or as the loop
of steps (an all-reduce, a frozen parameter)."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._adam import adam_entry, check_adam
from ._ops import fast_path

__all__ = ["EpochSteps"]

_train_epoch_sgd = fast_path("train_epoch_sgd")
_train_epoch_adam = fast_path("train_epoch_adam")


class EpochSteps:
    """fit_epoch for FusedTrainer (which supplies _inputs, _current_params, _fused_sgd, _store_buffers,
    _train_batch and the Optimizer's param_groups)."""

    def fit_epoch(self, images: Tensor, labels: Tensor, batch_size: int,
                  generator: Optional[torch.Generator] = None, lr_schedule: Optional[Sequence[float]] = None, *,
                  order: Optional[Tensor] = None, chunk: Optional[int] = None,
                  on_chunk: Optional[Callable[[int, Tensor, Tensor], None]] = None,
                  pixel_values: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One epoch of training steps; returns the per-step (losses, correct counts) as tensors on the device.

        The same training, bit for bit, as the step loop

            order = torch.randperm(len(images), generator=generator)
            for s, start in enumerate(range(0, len(order), batch_size)):
                index = order[start:start + batch_size]
                trainer.step(images[index], labels[index])   # with lr = lr_schedule[s] when given

        On one process with every parameter trained, the steps (batch gather included) run in C++,
        ``chunk`` steps per call (default: all of them in one call); otherwise (an all-reduce, a frozen
        parameter, Adam state at different step counts) it is that loop. images: (N, ...) on the
        parameters' device and of their dtype (all the training data, e.g. a normalized Split), or
        uint8 with pixel_values (below); labels: (N,) class indices. order: the sample order to use
        instead of a permutation drawn with ``generator`` (any 1-D index tensor, e.g.
        data.Batches.indices()). lr_schedule: one learning rate per step; trainer.lr (unchanged)
        otherwise. on_chunk(samples, losses, correct) is called after each ``chunk`` steps with the
        number of samples they trained and their losses and correct counts (e.g. to update a progress
        bar). Every index and target of the epoch is checked before the first update.

        images may instead be uint8 (e.g. a Split's pixels) with pixel_values, the input value of each
        byte value ((256,), the parameters' dtype and device; data.pixel_values() is data.normalize's):
        the training is then that of the images pixel_values[images.long()], bit for bit, and a
        shuffled batch gathers a quarter of the bytes.
        """
        x, labels = self._inputs(images, labels, "fit_epoch", pixel_values)
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
        params = self._current_params()
        fused = self._fused_sgd(params)
        adam = self._fused_adam(params) if fused is None else None
        if fused is None and adam is None:
            return self._fit_epoch_steps(x, labels, order, batch_size, lrs.tolist(), chunk, on_chunk, pixel_values)
        if chunk < steps:  # each call checks its own steps; a bad target in a later one must fail before the first
            self._check_epoch(x, labels, order, batch_size)
        if adam is not None and steps:
            check_adam({**self.param_groups[0], "lr": float(lrs.max())})  # every step's options, up front
        losses, correct = [], []
        for first in range(0, max(steps, 1), chunk):
            last = min(first + chunk, steps)
            part = order[first * batch_size:last * batch_size]
            group = self.param_groups[0]
            if adam is not None:
                chunk_losses, chunk_correct = self._adam_epoch_call(x, labels, part, batch_size, lrs[first:last],
                                                                    params, adam, pixel_values)
            else:
                buffers, first_step = fused
                chunk_losses, chunk_correct = _train_epoch_sgd(
                    x, labels, part, batch_size, lrs[first:last], params, buffers, group["momentum"],
                    group["dampening"], group["weight_decay"], group["nesterov"], first_step, self.ignore_index,
                    self.label_smoothing, pixel_values)
                if first_step and last > first:  # only once an update went through
                    self._store_buffers(params, buffers)
                    fused = self._fused_sgd(params)
            losses.append(chunk_losses)
            correct.append(chunk_correct)
            if on_chunk is not None:
                on_chunk(part.shape[0], chunk_losses, chunk_correct)
        return torch.cat(losses), torch.cat(correct)

    def _fused_adam(self, params: List[Tensor]) -> Optional[List[Dict[str, Any]]]:
        """Adam's state entries of params (new ones for parameters without state) for the train_epoch_adam
        op, or None where it cannot run: SGD, an all-reduce, a frozen parameter, parameters at different
        step counts."""
        if self.optimizer == "sgd" or self._world_size > 1 or not all([p.requires_grad for p in params]):
            return None
        # (a new entry is stored only once an update went through)
        entries = [adam_entry(self.state.get(p) or {}, p) for p in params]
        if len({float(e["step"]) for e in entries}) != 1:
            return None
        return entries

    def _adam_epoch_call(self, x, labels, part, batch_size, lrs, params, entries, pixel_values):
        """One call of the train_epoch_adam op over the steps of part; the state entries are stored (and
        their step counts advanced) once it went through."""
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        losses, correct = _train_epoch_adam(
            x, labels, part, batch_size, lrs, params, [e["exp_avg"] for e in entries],
            [e["exp_avg_sq"] for e in entries], int(entries[0]["step"]), beta1, beta2, group["eps"],
            group["weight_decay"], group["decoupled_weight_decay"], self.ignore_index, self.label_smoothing,
            pixel_values)
        if lrs.shape[0]:
            for p, e in zip(params, entries):
                self.state[p] = e
            torch._foreach_add_([e["step"] for e in entries], float(lrs.shape[0]))
        return losses, correct

    def _fit_epoch_steps(self, x: Tensor, labels: Tensor, order: Tensor, batch_size: int, lrs: List[float],
                         chunk: int, on_chunk, pixel_values: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """fit_epoch as its loop of steps (an all-reduce, a frozen parameter, Adam state at different step
        counts)."""
        self._check_epoch(x, labels, order, batch_size, strict=True)
        params = self._current_params()
        losses, correct = [], []
        steps = len(lrs)
        for first in range(0, max(steps, 1), chunk):
            last = min(first + chunk, steps)
            chunk_losses, chunk_correct = [], []
            for s in range(first, last):
                index = order[s * batch_size:(s + 1) * batch_size]
                batch = x.index_select(0, index)
                if pixel_values is not None:
                    batch = pixel_values.index_select(0, batch.flatten().int()).view(batch.shape)
                loss, hits = self._train_batch(batch, labels.index_select(0, index), params, lrs[s])
                chunk_losses.append(loss)
                chunk_correct.append(hits)
            chunk_losses = torch.stack(chunk_losses) if chunk_losses else params[0].new_empty((0,))
            chunk_correct = torch.stack(chunk_correct) if chunk_correct else labels.new_empty((0,))
            losses.append(chunk_losses)
            correct.append(chunk_correct)
            if on_chunk is not None:
                on_chunk(min(last * batch_size, order.shape[0]) - first * batch_size, chunk_losses, chunk_correct)
        return torch.cat(losses), torch.cat(correct)

    def _check_epoch(self, x: Tensor, labels: Tensor, order: Tensor, batch_size: int, strict: bool = False) -> None:
        """The epoch op's up-front checks of order and targets (csrc/train_epoch.cpp), over the whole epoch.
        What they need is checked by the op itself on its first call, before it trains, unless strict
        (an epoch that runs as a loop of steps)."""
        n = x.shape[0]
        where = "FusedTrainer.fit_epoch"
        if strict:
            if labels.dtype != torch.int64:
                raise TypeError(f"{where}: expected labels of dtype int64, got {labels.dtype}")
            if labels.shape != (n,):
                raise ValueError(f"{where}: expected labels of shape ({n},) (one per image), got shape "
                                 f"{tuple(labels.shape)}")
            if order.dtype != torch.int64:
                raise TypeError(f"{where}: expected an int64 order, got {order.dtype}")
            if order.dim() != 1:
                raise ValueError(f"{where}: expected a 1-D order (sample indices), got shape {tuple(order.shape)}")
        elif order.dtype != torch.int64 or order.dim() != 1 or labels.dtype != torch.int64 or labels.shape != (n,):
            return
        if order.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(order))
        if low < 0 or high >= n:
            raise IndexError(f"{where}: order holds index {low if low < 0 else high}, out of range for {n} samples")
        classes = self._params[-1].shape[0]

        def invalid(t):
            return (t != self.ignore_index) & ((t < 0) | (t >= classes))
        # The labels in their own order first: a sequential pass, where labels[order] would gather
        # from all over them (~1 ms more an epoch, cache-cold right after training); only a bad label
        # needs the epoch's order, to name the first step it would reach.
        if not invalid(labels).any():
            return
        targets = labels[order]
        bad = invalid(targets)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"{where}: Target {int(targets[i])} is out of bounds for {classes} "
                             f"classes (sample {int(order[i])}, step {i // batch_size}).")
