"""Checkpoints and output files of mnist_fast.train: atomic writes, and loading that runs no code.

Checkpoints (`--checkpoint PATH`) are written atomically after every epoch and hold only tensors and
plain values (model, optimizer, RNG states, epoch, options, history), so they load with
torch.load(weights_only=True). `--resume` continues from PATH; with the same options, seed and
thread count on the CPU, an interrupted run ends with the same weights as an uninterrupted one
(the batch order of an epoch depends only on --seed and the epoch number).
"""
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = ["CheckpointError", "CHECKPOINT_KIND", "CHECKPOINT_VERSION", "RUN_DEFINING_OPTIONS", "atomic_write",
           "prepare_output_files", "save_checkpoint", "load_checkpoint", "restore_checkpoint", "run_options",
           "checkpoint_state"]

CHECKPOINT_KEYS = ("epochs_done", "options", "model", "optimizer", "rng", "history")
CHECKPOINT_KIND = "mnist_fast.train checkpoint"
CHECKPOINT_VERSION = 1
# Options that define the trajectory of a run: a checkpoint resumes only with the same values.
# --epochs counts too when the learning rate schedule depends on it.
RUN_DEFINING_OPTIONS = ("dataset", "backend", "optimizer", "lr", "momentum", "schedule", "batch_size", "seed",
                        "limit", "loader", "world_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit this run."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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


def prepare_output_files(paths) -> None:
    """Create the folders of the files a run will write (None: not written), and check they are writable, before
    training rather than after it: a typo in --plot should not cost a finished run."""
    outputs = [path for path in paths if path is not None]
    for path in outputs:
        if Path(path).is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name")
    for folder in {Path(path).parent for path in outputs}:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write to {folder}")


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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


def run_options(args, world_size: int) -> dict:
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


def checkpoint_state(epochs_done: int, options: dict, model, optimizer, history) -> dict:
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
