"""Train the lesson's 784-128-64-10 classifier on MNIST or Fashion-MNIST with the fused layers.

    python -m mnist_fast.train                                   # MNIST, 10 epochs, the defaults
    python -m mnist_fast.train --dataset fashion-mnist --plot curves.png --show 8
    python -m mnist_fast.train --lr 0.003 --momentum 0 --schedule constant --epochs 5   # the lesson's recipe
    python -m mnist_fast.train --backend stock                   # nn.Sequential + LogSoftmax + NLLLoss
    python -m mnist_fast.train --backend fused-step              # the whole SGD step as one fused op
    python -m mnist_fast.train --checkpoint run.pt               # ... then after a kill, add --resume
    torchrun --nproc_per_node=2 -m mnist_fast.train              # DistributedDataParallel

Defaults: SGD with momentum 0.9, lr 0.01 decayed by a cosine over the epochs, batch 64, 10 epochs, one
CPU thread. Measured on Fashion-MNIST: 88.3-88.6% test accuracy after 10 epochs (seeds 0-2), against
79% for the lesson's recipe after 5. MNIST itself could not be measured on the development machines
(no copy, no network); it is the easier of the two, and the target there is >= 97.5%.

Datasets: `--dataset mnist` (default) or `fashion-mnist`, looked for as mnist_fast.data describes
(--data-dir, torchvision's layout under it, Debian's /usr/share/datasets/fashion-mnist, then a
download). `--dataset auto` is the demo mode of `make train`: MNIST when it can be found or
downloaded, otherwise, when Fashion-MNIST is on the machine, one line saying so and a Fashion-MNIST
run. An explicit `--dataset mnist` never switches datasets.

Data path: each split is one normalized tensor on the device and batches are cut by indexing
(`--loader tensor`, default); `--loader dataloader` runs the lesson's torchvision DataLoader +
transforms pipeline over the same samples, to measure the difference.

Checkpoints (`--checkpoint PATH`) are written atomically after every epoch and hold only tensors and
plain values (model, optimizer, RNG states, epoch, options, history), so they load with
torch.load(weights_only=True). `--resume` continues from PATH; with the same options, seed and
thread count on the CPU, an interrupted run ends with the same weights as an uninterrupted one
(the batch order of an epoch depends only on --seed and the epoch number).

Multi-process: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); each rank trains on its shard of every shuffled epoch with
--batch-size samples per step; rank 0 alone evaluates, prints and writes files.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import _C
from . import data as mnist_data
from .models import MNISTNet
from .nn import CrossEntropyLoss
from .trainer import FusedTrainer

__all__ = ["main", "train", "parse_args", "build_model", "TrainResult", "CheckpointError",
           "save_checkpoint", "load_checkpoint"]

DEFAULT_LR = {"sgd": 0.01, "adam": 0.001}
DEFAULT_MOMENTUM = 0.9
EVAL_BATCH_SIZE = 1000
MAX_SHOW = 50  # rows of the --show figure; matplotlib refuses images much taller than that
CHECKPOINT_KEYS = ("epochs_done", "options", "model", "optimizer", "rng", "history")
CHECKPOINT_KIND = "mnist_fast.train checkpoint"
CHECKPOINT_VERSION = 1
# Options that define the trajectory of a run: a checkpoint resumes only with the same values.
# --epochs counts too when the learning rate schedule depends on it.
RUN_DEFINING_OPTIONS = ("dataset", "backend", "optimizer", "lr", "momentum", "schedule", "batch_size", "seed",
                        "limit", "loader", "world_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit this run."""


# ----------------------------------------------------------------------------------------------
# Options


def _number(kind, accept: Callable, wanted: str):
    """An argparse type: text -> kind(text), refused with 'expected {wanted}' unless accept(value)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value
    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_fast.train",
        description="Train the lesson's 784-128-64-10 MNIST classifier with mnist_fast's fused layers.",
    )
    add = parser.add_argument
    add("--dataset", choices=(*mnist_data.DATASETS, "auto"), default="mnist",
        help="default: mnist; auto: MNIST, or Fashion-MNIST with a notice when MNIST cannot be had")
    add("--data-dir", metavar="FOLDER", default=None,
        help="folder with the IDX files (default: ~/.pytorch/MNIST_data or ~/.pytorch/F_MNIST_data); "
             "with --dataset auto it applies to MNIST")
    add("--no-download", action="store_true", help="never try to download a missing dataset")
    add("--epochs", type=_positive_int, default=10, help="default: 10")
    add("--batch-size", type=_positive_int, default=64,
        help="samples per step, per process under torchrun (default: 64)")
    add("--optimizer", choices=("sgd", "adam"), default="sgd", help="default: sgd")
    add("--lr", type=_positive_float, default=None,
        help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adam']} for adam)")
    add("--momentum", type=float, default=None, help=f"SGD momentum (default: {DEFAULT_MOMENTUM}; the lesson used 0)")
    add("--schedule", choices=("cosine", "constant"), default="cosine",
        help="learning rate per epoch; cosine (default) decays from --lr towards 0 over --epochs")
    add("--backend", choices=("fused", "fused-step", "stock"), default="fused",
        help="fused (default): mnist_fast's MNISTNet + CrossEntropyLoss; fused-step: the same model "
             "trained by mnist_fast.FusedTrainer (forward, loss, backward and SGD update in one op); "
             "stock: the lesson's nn.Sequential + LogSoftmax + NLLLoss")
    add("--loader", choices=("tensor", "dataloader"), default="tensor",
        help="tensor (default): batches cut from whole tensors; "
             "dataloader: the lesson's DataLoader + transforms, for comparison")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (cuda when available)")
    add("--threads", type=_non_negative_int, default=1,
        help="CPU threads (default: 1; 0: torch's choice). One thread is fastest for this small model on a "
             "shared machine, and a fixed count keeps resumed runs bit-identical")
    add("--seed", type=int, default=0, help="seeds the initial weights and every epoch's shuffle (default: 0)")
    add("--limit", type=_positive_int, default=None, metavar="N", help="train on the first N training images only")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--checkpoint", type=Path, default=None, metavar="PATH", help="write a checkpoint here after every epoch")
    add("--resume", action="store_true", help="continue the run saved in --checkpoint")
    add("--plot", type=Path, default=None, metavar="PNG", help="write a plot of loss and accuracy per epoch")
    add("--metrics", type=Path, default=None, metavar="JSON", help="write the per-epoch metrics")
    add("--show", type=_non_negative_int, default=0, metavar="N",
        help=f"write a PNG of the first N (at most {MAX_SHOW}) test images with their predicted class probabilities")
    add("--show-file", type=Path, default=Path("predictions.png"), metavar="PNG",
        help="where --show writes (default: predictions.png)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH (the checkpoint to continue from)")
    if args.optimizer == "adam" and args.momentum is not None:
        parser.error("--momentum applies to --optimizer sgd only")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.momentum is None:
        args.momentum = DEFAULT_MOMENTUM if args.optimizer == "sgd" else 0.0  # adam: unused
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False); "
                     "use --device cpu")
    uses_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if uses_cuda and args.backend != "stock" and not _C.cuda_compiled():
        parser.error("this build of mnist_fast has no CUDA kernels: rebuild it where nvcc is found, "
                     "or pass --device cpu or --backend stock")
    if args.backend == "fused-step":
        if args.optimizer != "sgd":
            parser.error("--backend fused-step runs SGD; use --optimizer sgd (or --backend fused for adam)")
        if args.compile:
            parser.error("--backend fused-step is already one op per step; drop --compile")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            parser.error("--backend fused-step has no gradient all-reduce; use --backend fused under torchrun")
    if args.show > MAX_SHOW:
        parser.error(f"--show: at most {MAX_SHOW} images, got {args.show}")
    if (args.plot or args.show) and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot and --show need matplotlib: pip install matplotlib")
    if args.loader == "dataloader" and importlib.util.find_spec("torchvision") is None:
        parser.error("--loader dataloader needs torchvision: pip install torchvision")
    if args.loader == "dataloader" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--loader dataloader is for single-process comparisons; use --loader tensor under torchrun")
    return args


# ----------------------------------------------------------------------------------------------
# Model, optimizer


def build_model(backend: str):
    """(model, criterion) of a backend. Both models produce outputs whose argmax is the class and
    whose softmax gives the class probabilities (logits for fused, log-probabilities for stock), and
    both are built in the same order, so one seed gives both the same initial weights."""
    if backend in ("fused", "fused-step"):
        return MNISTNet(), CrossEntropyLoss()
    if backend == "stock":
        model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                              nn.Linear(64, 10), nn.LogSoftmax(dim=1))
        return model, nn.NLLLoss()
    raise ValueError(f"unknown backend {backend!r}")


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
    try:
        return optimizer_class(parameters, fused=True, **options)
    except (RuntimeError, TypeError):  # an older torch, or no fused kernel for this device
        return optimizer_class(parameters, **options)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over path: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with weights_only=True (no code runs); CheckpointError when it can't be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; drop --resume to start a new run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
        reason = str(e).split(". ")[0].strip() or type(e).__name__  # torch's first sentence says what broke
        if reason.startswith("Weights only load failed"):
            reason = "it holds Python objects besides tensors and plain values, and loading those could run code"
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); delete it or pass another path") from e
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not an mnist_fast.train checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is checkpoint version {state.get('version')}; "
                              f"this mnist_fast reads version {CHECKPOINT_VERSION}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it has no {', '.join(missing)}")
    return state


def _run_options(args, world_size: int) -> dict:
    options = {name: getattr(args, name) for name in RUN_DEFINING_OPTIONS if name != "world_size"}
    options["world_size"] = world_size
    if args.schedule != "constant":
        options["epochs"] = args.epochs
    return options


def _check_model_state(path: Path, saved: dict, model: nn.Module) -> None:
    """Refuse a state dict whose names or shapes differ from the model's, before anything is loaded."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in saved.items()} if isinstance(saved, dict) else {}
    if found == expected:
        return
    problems = [f"missing {name}" for name in expected.keys() - found.keys()]
    problems += [f"unexpected {name}" for name in found.keys() - expected.keys()]
    problems += [f"{name}: shape {found[name]} in the checkpoint, {shape} in the model"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    raise CheckpointError(f"{path} holds a different model: " + "; ".join(sorted(problems)))


def restore_checkpoint(path: Path, state: dict, options: dict, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """Load model, optimizer and RNG states; all checks come first, so a mismatch loads nothing."""
    saved_options = state.get("options", {})
    differences = [f"--{name.replace('_', '-')} {value} (checkpoint: {saved_options.get(name)})"
                   for name, value in options.items() if saved_options.get(name) != value]
    if differences:
        hint = " (the cosine schedule depends on --epochs: only --schedule constant runs can be extended)" \
            if options.get("epochs") != saved_options.get("epochs") else ""
        raise CheckpointError(f"{path} was written by a run with other options; resuming needs the same ones. "
                              f"Differs: {', '.join(differences)}{hint}")
    _check_model_state(path, state.get("model"), model)
    try:
        optimizer.load_state_dict(state["optimizer"])  # checks its groups before changing anything
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from e
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"]["cpu"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _checkpoint_state(epochs_done: int, options: dict, model, optimizer, history) -> dict:
    return {
        "kind": CHECKPOINT_KIND,
        "version": CHECKPOINT_VERSION,
        "epochs_done": epochs_done,
        "options": options,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "history": history,
    }


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no display, no global state)


def _save_figure(figure, path: Path) -> None:
    _atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def plot_history(history: List[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["test_loss"] for h in history], "o-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * h["test_accuracy"] for h in history], "o-", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    _save_figure(figure, path)


def show_predictions(images: torch.Tensor, labels: torch.Tensor, probabilities: torch.Tensor,
                     classes: Sequence[str], path: Path) -> None:
    """The lesson's view_classify for several images: each image beside its class probabilities."""
    from matplotlib.figure import Figure

    count = images.shape[0]
    figure = Figure(figsize=(7, 2.2 * count), layout="constrained")
    axes = figure.subplots(count, 2, squeeze=False, width_ratios=(1, 2))
    for (image_ax, bar_ax), image, label, probs in zip(axes, images.cpu(), labels.cpu(), probabilities.cpu()):
        image_ax.imshow(image.reshape(28, 28).numpy(), cmap="gray")
        image_ax.set_title(f"true: {classes[int(label)]}\npredicted: {classes[int(probs.argmax())]}", fontsize=9)
        image_ax.axis("off")
        bar_ax.barh(range(len(classes)), probs.numpy())
        bar_ax.set_yticks(range(len(classes)), classes, fontsize=8)
        bar_ax.set_xlim(0, 1.1)
        bar_ax.set_title("Class Probability", fontsize=9)
    _save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (unwrapped from DDP / torch.compile)
    dataset: str
    history: List[dict] = field(default_factory=list)


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _init_distributed(device_choice: str) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Distributed()
    env = _Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return env


def _resolve_device(choice: str, env: _Distributed) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _prepare_output_folders(args) -> None:
    """Create the folders of the files this run will write, and check they are writable, before
    training rather than after it: a typo in --plot should not cost a finished run."""
    outputs = [args.checkpoint, args.plot, args.metrics, args.show_file if args.show else None]
    for path in outputs:
        if path is not None and Path(path).is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name")
    for folder in {Path(path).parent for path in outputs if path is not None}:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write to {folder}")


def _load_data(args, log) -> mnist_data.Dataset:
    download = not args.no_download
    if args.dataset != "auto":
        return mnist_data.load_dataset(args.dataset, args.data_dir, download=download, announce=log)
    try:  # quietly: when MNIST can't be had, the one line below says all there is to say
        return mnist_data.load_dataset("mnist", args.data_dir, download=download)
    except mnist_data.DatasetNotFoundError as mnist_missing:
        try:
            fashion = mnist_data.load_dataset("fashion-mnist", download=False)
        except mnist_data.DatasetNotFoundError:
            raise mnist_missing from None
        log(f"MNIST not found or downloadable here; training Fashion-MNIST from {fashion.source} instead "
            f"(pass --dataset mnist --data-dir FOLDER to insist on MNIST)")
        return fashion


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


def set_learning_rate(optimizer, lr: float) -> None:
    if isinstance(optimizer, FusedTrainer):
        optimizer.lr = lr
    else:
        for group in optimizer.param_groups:
            group["lr"] = lr


def _train_step(model, criterion, optimizer, images, labels):
    """One optimization step; returns the batch's mean loss."""
    if isinstance(optimizer, FusedTrainer):
        return optimizer.step(images, labels)[0]
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(images.flatten(1)), labels)
    loss.backward()
    optimizer.step()
    return loss


def _train_epoch(model, criterion, optimizer, batches, device, progress):
    """One pass over this rank's batches; returns (sum of sample losses, samples seen)."""
    model.train()
    if isinstance(optimizer, FusedTrainer) and optimizer.optimizer == "sgd" and isinstance(batches, mnist_data.Batches):
        return _fit_epoch(optimizer, batches, progress)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for step, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = _train_step(model, criterion, optimizer, images, labels)
        count = labels.shape[0]
        # Accumulate on the device: no host sync per step (.item() would stall a GPU).
        loss_sum.add_(loss.detach(), alpha=count)
        seen += count
        progress.update(count)
        if step % 100 == 99:
            progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)
    return loss_sum, seen


def _fit_epoch(trainer: FusedTrainer, batches: mnist_data.Batches, progress):
    """_train_epoch's loop run by FusedTrainer.fit_epoch: the same batches and updates, 100 steps per call."""
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
    trainer.fit_epoch(split.images, split.labels, batches.batch_size, order=batches.indices(), chunk=100,
                      on_chunk=report)
    return loss_sum, seen


def train(args: argparse.Namespace) -> TrainResult:
    """Run the training that parsed options describe (see the module docstring)."""
    env = _init_distributed(args.device)
    try:
        return _train(args, env)
    finally:
        if env.active:
            dist.destroy_process_group()


def _train(args, env: _Distributed) -> TrainResult:
    log = print if env.rank == 0 else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if env.rank == 0:
        _prepare_output_folders(args)

    # Rank 0 finds (and maybe downloads) the data first, so that ranks don't download over each other.
    if env.active and env.rank != 0:
        dist.barrier()
    dataset = _load_data(args, log)
    if env.active and env.rank == 0:
        dist.barrier()
    args.dataset = dataset.name  # "auto" resolved: this is what the checkpoint records
    train_split = dataset.train.head(args.limit).to(device)
    test_split = dataset.test.to(device)

    if args.loader == "tensor":
        batches = mnist_data.Batches(train_split, args.batch_size, seed=args.seed,
                                     rank=env.rank, world_size=env.world_size)
    else:
        batches = mnist_data.LessonBatches(train_split, args.batch_size, seed=args.seed)

    torch.manual_seed(args.seed)
    model, criterion = build_model(args.backend)
    model.to(device)
    if args.backend == "fused-step":
        optimizer = FusedTrainer(model, lr=args.lr, momentum=args.momentum)
    else:
        optimizer = build_optimizer(args, model.parameters())
    options = _run_options(args, env.world_size)

    history: List[dict] = []
    start_epoch = 0
    if args.resume:
        state = load_checkpoint(args.checkpoint)
        restore_checkpoint(args.checkpoint, state, options, model, optimizer)
        history, start_epoch = list(state["history"]), int(state["epochs_done"])
        log(f"resumed from {args.checkpoint} after epoch {start_epoch}")

    train_model = model
    if env.active:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    optimizer_text = f"{args.optimizer} lr {args.lr}" + (f" momentum {args.momentum}" * (args.optimizer == "sgd"))
    log(f"{dataset.name}: {len(train_split)} training / {len(test_split)} test images from {dataset.source}; "
        f"{args.backend} backend, {args.loader} loader, {optimizer_text}, batch {args.batch_size}, "
        f"device {device}" + (f", {env.world_size} processes" if env.active else ""))

    for epoch in range(start_epoch, args.epochs):
        batches.set_epoch(epoch)
        set_learning_rate(optimizer, learning_rate(args, epoch))
        progress = tqdm(total=batches.num_samples,
                        desc=f"epoch {epoch + 1}/{args.epochs}", unit="img", unit_scale=True, leave=False,
                        disable=None if env.rank == 0 else True, dynamic_ncols=True)
        started = time.perf_counter()
        loss_sum, seen = _train_epoch(train_model, criterion, optimizer, batches, device, progress)
        if env.active:  # the train loss over all ranks' samples
            totals = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
            dist.all_reduce(totals)
            loss_sum, seen = totals[0], int(totals[1].item())
        train_loss = loss_sum.item() / seen  # .item() also waits for the device, so the time is right
        epoch_time = time.perf_counter() - started
        progress.close()
        if env.rank != 0:
            continue

        test_loss, test_accuracy = evaluate(model, criterion, test_split)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss,
                        "test_accuracy": test_accuracy, "epoch_time_s": epoch_time,
                        "samples_per_s": seen / epoch_time})
        log(f"epoch {epoch + 1:>2}/{args.epochs}  train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
            f"test accuracy {100 * test_accuracy:.2f}%  {epoch_time:.2f} s ({seen / epoch_time:,.0f} images/s)")
        if args.checkpoint is not None:
            save_checkpoint(args.checkpoint, _checkpoint_state(epoch + 1, options, model, optimizer, history))

    if env.rank == 0:
        _report(args, dataset, model, test_split, history, start_epoch, log)
    return TrainResult(model=model, dataset=dataset.name, history=history)


def _report(args, dataset, model, test_split, history, start_epoch, log) -> None:
    """The final summary and the files asked for."""
    if history:
        timed = history[start_epoch:] or history
        mean_time = sum(h["epoch_time_s"] for h in timed) / len(timed)
        epochs = f"{len(history)} epoch" + "s" * (len(history) != 1)
        log(f"done: {dataset.name}, {epochs}, test accuracy {100 * history[-1]['test_accuracy']:.2f}%, "
            f"mean epoch time {mean_time:.2f} s")
    if args.metrics is not None:
        document = {"dataset": dataset.name, "options": {k: (str(v) if isinstance(v, Path) else v)
                                                           for k, v in vars(args).items()},
                    "history": history}
        _atomic_write(args.metrics, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
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


# ----------------------------------------------------------------------------------------------
# Command line

# Errors whose message tells the user what to do; anything else is a bug and keeps its traceback.
_USER_ERRORS = (mnist_data.DatasetNotFoundError, mnist_data.IdxError, CheckpointError, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: `python -m mnist_fast.train --help`. Returns the exit status."""
    args = parse_args(argv)
    try:
        train(args)
    except _USER_ERRORS as e:
        print(f"mnist_fast.train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mnist_fast.train: interrupted" + (f"; continue with --resume --checkpoint {args.checkpoint}"
                                                  if args.checkpoint else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
