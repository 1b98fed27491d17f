"""The training CLI's loops (mnist_fast.train): one epoch over the batches with torch.optim or
FusedTrainer, and the evaluation of a split."""
import torch
from torch import nn

from . import data as mnist_data
from .trainer import FusedTrainer

__all__ = ["EVAL_BATCH_SIZE", "evaluate", "train_epoch"]

EVAL_BATCH_SIZE = 1000


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, split: mnist_data.Split):
    """(mean loss, accuracy) over a split."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.labels.device)
    for start in range(0, len(split), EVAL_BATCH_SIZE):
        images = split.images[start:start + EVAL_BATCH_SIZE].flatten(1)
        labels = split.labels[start:start + EVAL_BATCH_SIZE]
        output = model(images)
        loss_sum += criterion(output, labels) * labels.shape[0]
        correct += (output.argmax(1) == labels).sum()
    model.train(was_training)
    count = max(len(split), 1)
    return loss_sum.item() / count, correct.item() / count


def train_step(model, criterion, optimizer, images, labels):
    """One optimization step; returns the batch's mean loss."""
    if isinstance(optimizer, FusedTrainer):
        return optimizer.step(images, labels)[0]
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(images.flatten(1)), labels)
    loss.backward()
    optimizer.step()
    return loss


def train_epoch(model, criterion, optimizer, batches, device, progress):
    """One pass over this rank's batches; returns (sum of sample losses, samples seen)."""
    model.train()
    if isinstance(optimizer, FusedTrainer) and isinstance(batches, mnist_data.Batches):
        return _fit_epoch(optimizer, batches, progress)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for step, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = train_step(model, criterion, optimizer, images, labels)
        count = labels.shape[0]
        # Accumulate on the device: no host sync per step (.item() would stall a GPU).
        loss_sum.add_(loss.detach(), alpha=count)
        seen += count
        progress.update(count)
        if step % 100 == 99:
            progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)
    return loss_sum, seen


def _fit_epoch(trainer: FusedTrainer, batches: mnist_data.Batches, progress):
    """train_epoch's loop run by FusedTrainer.fit_epoch: the same batches and updates, reported every 100
    steps (on one process with every parameter trained, 100 steps per call of a fused epoch op)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=batches.split.labels.device)
    seen = 0

    def report(samples, losses, _correct):
        nonlocal seen
        if not samples:
            return
        counts = torch.full_like(losses, batches.batch_size, dtype=torch.float64)
        counts[-1] = samples - batches.batch_size * (losses.shape[0] - 1)
        loss_sum.add_((losses.double() * counts).sum())
        seen += samples
        progress.update(samples)
        progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)

    split = batches.split
    images, pixel_values = split.images, None
    if split.pixels is not None:  # the same training from a quarter of the bytes
        first = trainer.param_groups[0]["params"][0]
        images, pixel_values = split.pixels, mnist_data.pixel_values(first.dtype, first.device)
    trainer.fit_epoch(images, split.labels, batches.batch_size, order=batches.indices(), chunk=100, on_chunk=report,
                      pixel_values=pixel_values)
    return loss_sum, seen
