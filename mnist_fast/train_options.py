"""The options of mnist_fast.train (`python -m mnist_fast.train --help`): the parser, and the checks of
combinations that argparse cannot express, so that a bad command line fails before any work starts."""
import argparse
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import _C
from . import data as mnist_data
from .distributed import DEFAULT_DDP_TIMEOUT_S
from .run_log import tensorboard_available

__all__ = ["build_parser", "parse_args", "DEFAULT_LR", "DEFAULT_MOMENTUM", "MAX_SHOW", "MAX_SEED", "OUTPUT_DIR_FILES"]

DEFAULT_LR = {"sgd": 0.02, "adam": 0.001}
DEFAULT_MOMENTUM = 0.9
MAX_SHOW = 50  # rows of the --show figure; matplotlib refuses images much taller than that
MAX_SEED = 2**32 - 1  # numpy's range; keeps every epoch's generator seed (see mnist_fast.data) in torch's range


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
_non_negative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
_fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")

# What --output-dir DIR writes, and where (an explicit --checkpoint, --metrics, --plot or --show-file wins).
OUTPUT_DIR_FILES = {"checkpoint": "checkpoint.pt", "metrics": "metrics.jsonl", "plot": "curves.png",
                    "show_file": "predictions.png"}


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
    add("--epochs", type=_positive_int, default=30, help="default: 30")
    add("--batch-size", type=_positive_int, default=64,
        help="samples per step, per process under torchrun (default: 64)")
    add("--optimizer", choices=("sgd", "adam"), default="sgd", help="default: sgd")
    add("--lr", type=_positive_float, default=None,
        help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adam']} for adam)")
    add("--momentum", type=float, default=None, help=f"SGD momentum (default: {DEFAULT_MOMENTUM}; the lesson used 0)")
    add("--schedule", choices=("cosine", "constant"), default="cosine",
        help="learning rate per epoch; cosine (default) decays from --lr towards 0 over --epochs")
    add("--weight-decay", type=_non_negative_float, default=0.0, metavar="W",
        help="L2 penalty added to the gradient, as torch.optim's weight_decay (default: 0)")
    add("--label-smoothing", type=_fraction, default=0.0, metavar="EPS",
        help="train on targets smoothed as nn.CrossEntropyLoss(label_smoothing=EPS) does, every backend "
             "(default: 0); scores are always plain cross-entropy")
    add("--backend", choices=("fused", "fused-step", "stock"), default="fused",
        help="fused (default): mnist_fast's MNISTNet + CrossEntropyLoss; fused-step: the same model "
             "trained by mnist_fast.FusedTrainer (forward, loss, backward and the SGD or Adam update in one op, "
             "the gradient all-reduce in between under torchrun); "
             "stock: the lesson's nn.Sequential + LogSoftmax + NLLLoss")
    add("--loader", choices=("tensor", "dataloader"), default="tensor",
        help="tensor (default): batches cut from whole tensors; "
             "dataloader: the lesson's DataLoader + transforms, for comparison")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto (cuda when available)")
    add("--threads", type=_non_negative_int, default=1,
        help="CPU threads (default: 1; 0: torch's choice). --backend fused-step splits each step between them "
             "(2 threads: about 1.6x on two idle cores); one is the steadiest on a shared machine, and a fixed "
             "count keeps resumed runs bit-identical")
    add("--flush-denormal", action="store_true",
        help="compute on the CPU with denormal floats (below 1.2e-38) flushed to zero, as JAX/XLA does "
             "(torch.set_flush_denormal): momentum buffers of ReLU units that stopped firing decay into "
             "denormals, which slow torch.optim.SGD (--backend stock and fused; --backend fused-step's update "
             "computes them at full speed, the same bits); like --threads, keep it the same for a "
             "bit-identical resume")
    add("--seed", type=_number(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED}"), default=0,
        help=f"seeds the initial weights and every epoch's shuffle, 0..{MAX_SEED} (default: 0)")
    add("--limit", type=_positive_int, default=None, metavar="N", help="train on the first N training images only")
    add("--val-split", type=_non_negative_int, default=0, metavar="N",
        help="hold out N training images (picked by --seed) and score them after every epoch; the test set "
             "is then scored once, at the end (default: 0, no validation set: the test set every epoch)")
    add("--eval-test-every-epoch", action="store_true",
        help="with --val-split: score the test set after every epoch too")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--output-dir", type=Path, default=None, metavar="DIR",
        help="write the checkpoint, metrics and plot (and --show's figure) into DIR as "
             + ", ".join(OUTPUT_DIR_FILES.values()) + "; an explicit path option wins")
    add("--checkpoint", type=Path, default=None, metavar="PATH", help="write a checkpoint here after every epoch")
    add("--resume", action="store_true", help="continue the run saved in --checkpoint (or --output-dir)")
    add("--plot", type=Path, default=None, metavar="PNG",
        help="write a plot of loss and accuracy per epoch at the end (or when interrupted)")
    add("--metrics", type=Path, default=None, metavar="JSONL",
        help="write the per-epoch metrics as JSON Lines, after every epoch (see mnist_fast.run_log)")
    add("--tensorboard", type=Path, default=None, metavar="DIR",
        help="log the per-epoch metrics for TensorBoard into DIR (needs the tensorboard package)")
    add("--show", type=_non_negative_int, default=0, metavar="N",
        help=f"write a PNG of the first N (at most {MAX_SHOW}) test images with their predicted class probabilities")
    add("--show-file", type=Path, default=None, metavar="PNG",
        help="where --show writes (default: predictions.png, in --output-dir if given)")
    add("--ddp-timeout", type=_positive_float, default=DEFAULT_DDP_TIMEOUT_S, metavar="SECONDS",
        help="under torchrun: how long a process waits for the others at a collective before it fails "
             f"(default: {DEFAULT_DDP_TIMEOUT_S:g}; torch's own default is 1800)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plot_skipped = False
    if args.output_dir is not None:
        for name, file_name in OUTPUT_DIR_FILES.items():
            if getattr(args, name) is None:
                setattr(args, name, args.output_dir / file_name)
        if args.plot == args.output_dir / OUTPUT_DIR_FILES["plot"] and importlib.util.find_spec("matplotlib") is None:
            args.plot, args.plot_skipped = None, True  # not asked for by name: the run says so, and goes on
    if args.show_file is None:
        args.show_file = Path(OUTPUT_DIR_FILES["show_file"])
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH or --output-dir DIR (the checkpoint to continue from)")
    if args.eval_test_every_epoch and not args.val_split:
        parser.error("--eval-test-every-epoch goes with --val-split N "
                     "(without one, the test set is scored every epoch)")
    if args.tensorboard is not None and not tensorboard_available():
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
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
        if args.compile:
            parser.error("--backend fused-step is already one op per step; drop --compile")
        if args.optimizer != "sgd" and uses_cuda:
            parser.error(f"--backend fused-step --optimizer {args.optimizer} runs on the CPU only; pass --device cpu "
                         "(or --backend fused)")
    if args.show > MAX_SHOW:
        parser.error(f"--show: at most {MAX_SHOW} images, got {args.show}")
    if (args.plot or args.show) and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot and --show need matplotlib: pip install matplotlib")
    if args.loader == "dataloader" and importlib.util.find_spec("torchvision") is None:
        parser.error("--loader dataloader needs torchvision: pip install torchvision")
    if args.loader == "dataloader" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--loader dataloader is for single-process comparisons; use --loader tensor under torchrun")
    return args
