"""Checkpoints and output files of mnist_fast.train: safe writes, and loading that runs no code.

Checkpoints (`--checkpoint PATH`) are written atomically after every epoch and hold only tensors and
plain values (model, optimizer, RNG states, epoch, options, history), so they load with
torch.load(weights_only=True); every field is checked before anything is restored. `--resume`
continues from PATH; with the same options, seed and thread count on the CPU, an interrupted run ends
with the same weights as an uninterrupted one (the batch order of an epoch depends only on --seed and
the epoch number).

Output files (checkpoint, metrics, plots) are replaced atomically when they are regular files: the
bytes go to `.<name>.<pid>.tmp` beside the file, which is then renamed over it, so a reader or a
crash sees the old file or the new one, never half of one. A symlink is followed (the link stays, its
target is replaced). Anything else that exists (a device such as /dev/null, a FIFO), and /dev/stdout,
/dev/fd/N and the like (a shell's redirection into a file), is appended to in place.
Temp files left by a killed run are removed by the next run that writes the same file.
"""
import io
import math
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .models import MNISTNet

__all__ = ["CheckpointError", "OutputError", "CHECKPOINT_KIND", "CHECKPOINT_VERSION", "RUN_DEFINING_OPTIONS",
           "write_output", "writes_through", "prepare_output_files", "remove_stale_temp_files",
           "save_checkpoint", "load_checkpoint", "restore_checkpoint", "run_options", "checkpoint_state"]

CHECKPOINT_KEYS = ("epochs_done", "options", "model", "optimizer", "rng", "history")
CHECKPOINT_KIND = "mnist_fast.train checkpoint"
CHECKPOINT_VERSION = 1
# Options that define the trajectory of a run: a checkpoint resumes only with the same values.
# --epochs counts too when the learning rate schedule depends on it.
RUN_DEFINING_OPTIONS = ("dataset", "backend", "optimizer", "lr", "momentum", "schedule", "batch_size", "seed",
                        "limit", "loader", "world_size", "weight_decay", "label_smoothing", "val_split")
# Options added after the first version 1 checkpoints: a checkpoint without one ran with this value.
_ADDED_OPTIONS = {"weight_decay": 0.0, "label_smoothing": 0.0, "val_split": 0}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit this run."""


class OutputError(OSError):
    """An output file that cannot be written; the message names the file and the cause."""


# ----------------------------------------------------------------------------------------------
# Output files


def _target(path) -> Path:
    """The file a write to path lands in: symlinks resolved, so that the link itself is kept."""
    return Path(os.path.realpath(path))


# Names of an open file descriptor: even when it is a regular file (a shell's `> log`), it is not ours to replace.
_FD_PATH = re.compile(r"/dev/(stdout|stderr|fd/[0-9]+)|/proc/(self|thread-self|[0-9]+)/fd/[0-9]+")


def _names_a_file_descriptor(path) -> bool:
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links in a row
        if _FD_PATH.fullmatch(current):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.abspath(os.path.join(os.path.dirname(current), os.readlink(current)))
    return False


def writes_through(path) -> bool:
    """True when path is written in place (a device, a FIFO, /dev/stdout...), False when it is replaced
    (a regular file) or created."""
    if _names_a_file_descriptor(path):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)  # follows symlinks
    except OSError:  # not there (yet), or a parent is not a folder: the write reports it
        return False


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _write(path: Path, data: bytes, exclusive: bool) -> None:
    """The one place bytes reach the disk (tests make it fail as a full disk would). Not exclusive: appended,
    so that /dev/stdout redirected into a file does not truncate it."""
    with open(path, "xb" if exclusive else "ab") as f:
        f.write(data)
        if exclusive:  # a new file that will be renamed into place: on disk first
            f.flush()
            os.fsync(f.fileno())


def write_output(path, data: bytes) -> None:
    """Write data to path as this module's docstring says. Raises OutputError naming path and the cause;
    when replacing a regular file fails, that file is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name")
    if writes_through(path):
        try:
            _write(path, data, exclusive=False)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
        return
    target = _target(path)
    existed = target.exists()
    tmp = _temp_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # left by a killed process that had our pid
        _write(tmp, data, exclusive=True)
        if existed:  # keep the permissions the user gave the file
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except OSError as e:
        kept = "; the previous file is unchanged" if existed else ""
        raise OutputError(f"cannot write {path}: {e.strerror or e}{kept}") from e
    finally:
        tmp.unlink(missing_ok=True)
    try:  # the rename itself on disk; some file systems cannot fsync a folder, which is fine
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(path) -> None:
    """Delete the `.<name>.<pid>.tmp` files that write_output left beside path in a process that no longer
    runs (killed while writing); files of running processes and other names are left alone."""
    target = _target(path)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.([0-9]+)\.tmp")
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match and int(match.group(1)) > 0 and not _pid_alive(int(match.group(1))) and candidate.is_file():
            candidate.unlink(missing_ok=True)


def prepare_output_files(paths: Iterable[Optional[Path]]) -> None:
    """Before training rather than after it (a typo in --plot should not cost a finished run): check that
    the files a run will write (None: not written) can be written, create their folders, and remove the
    temp files a killed run left beside them."""
    outputs = [Path(path) for path in paths if path is not None]
    for path in outputs:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name")
        if writes_through(path):  # it must be writable itself
            if not os.access(path, os.W_OK):
                raise PermissionError(f"cannot write to {path}")
            continue
        folder = _target(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"cannot write to {folder}")
        remove_stale_temp_files(path)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    # Serialized in memory first: a full disk then fails in a plain file write with the OS's own reason,
    # not inside torch's zip writer ("unexpected pos ..."). A checkpoint of this model is about 1 MB.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_output(path, buffer.getvalue())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_byte_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _check_fields(path: Path, state: dict) -> None:
    """The type and range of every field, so that a damaged or hand-edited checkpoint fails here, in one
    line, instead of deep inside the run."""
    def malformed(what: str):
        raise CheckpointError(f"{path} is malformed: {what}; delete it or pass another path")

    epochs = state["epochs_done"]
    if type(epochs) is not int or epochs < 0:
        malformed(f"epochs_done is {epochs!r:.60}, expected an integer >= 0")
    options = state["options"]
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        malformed("options is not a table of option names")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        malformed("model is not a state dict of named tensors")
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        malformed("optimizer is not an optimizer state dict (state, param_groups)")
    rng = state["rng"]
    if not (isinstance(rng, dict) and _is_byte_tensor(rng.get("cpu")) and isinstance(rng.get("cuda"), list)
            and all(_is_byte_tensor(t) for t in rng["cuda"])):
        malformed("rng is not a table of random generator states (cpu: a uint8 tensor, cuda: a list of them)")
    if rng["cpu"].shape != torch.get_rng_state().shape:
        malformed(f"the CPU random generator state has {rng['cpu'].numel()} bytes, "
                  f"expected {torch.get_rng_state().numel()}")
    history = state["history"]
    if not isinstance(history, list) or len(history) != epochs:
        length = len(history) if isinstance(history, list) else type(history).__name__
        malformed(f"history has {length} entries for {epochs} epochs done")
    for number, entry in enumerate(history, 1):
        if not (isinstance(entry, dict) and type(entry.get("epoch")) is int and entry["epoch"] == number
                and all(isinstance(k, str) and _is_number(v) for k, v in entry.items())):
            malformed(f"history entry {number} is {entry!r:.80}, expected the numbers of epoch {number}")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with weights_only=True (no code runs) and check its fields; CheckpointError when
    it can't be read or is malformed."""
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
        raise CheckpointError(f"{path} is checkpoint version {state.get('version')!r:.40}; "
                              f"this mnist_fast reads version {CHECKPOINT_VERSION}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it has no {', '.join(missing)}")
    _check_fields(path, state)
    return state


def run_options(args, world_size: int) -> dict:
    options = {name: getattr(args, name) for name in RUN_DEFINING_OPTIONS if name != "world_size"}
    options["world_size"] = world_size
    if args.schedule != "constant":
        options["epochs"] = args.epochs
    return options


def _check_model_state(path: Path, saved: dict, model: nn.Module) -> None:
    """Refuse a state dict whose names, shapes or dtypes differ from the model's, before anything is loaded."""
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    found = {name: (tuple(t.shape), t.dtype) for name, t in saved.items()}
    if found == expected:
        return
    problems = [f"missing {name}" for name in expected.keys() - found.keys()]
    problems += [f"unexpected {name}" for name in found.keys() - expected.keys()]
    for name in sorted(expected.keys() & found.keys()):
        (shape, dtype), (saved_shape, saved_dtype) = expected[name], found[name]
        if saved_shape != shape:
            problems.append(f"{name}: shape {saved_shape} in the checkpoint, {shape} in the model")
        elif saved_dtype != dtype:
            problems.append(f"{name}: {saved_dtype} in the checkpoint, {dtype} in the model")
    raise CheckpointError(f"{path} holds a different model: " + "; ".join(sorted(problems)))


# Optimizer settings that say how the update is computed, not what it computes (and lr, set every epoch).
_IMPLEMENTATION_KEYS = {"params", "lr", "initial_lr", "foreach", "fused", "differentiable", "capturable"}


def _check_optimizer_state(path: Path, saved: dict, optimizer, model: nn.Module) -> None:
    """Refuse optimizer state that torch would load but the next step would choke on (or silently misuse):
    other settings, other parameter counts, buffers of the wrong shape."""
    def unfit(what: str):
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({what})")

    fresh_groups = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if len(groups) != len(fresh_groups):
        unfit(f"{len(groups)} parameter groups, this run has {len(fresh_groups)}")
    saved_ids = []
    for group, fresh in zip(groups, fresh_groups):
        if len(group["params"]) != len(fresh["params"]):
            unfit(f"{len(group['params'])} parameters, this run has {len(fresh['params'])}")
        differs = [f"{key} {group[key]!r:.40} (this run: {fresh[key]!r})" for key in fresh
                   if key not in _IMPLEMENTATION_KEYS and key in group and group[key] != fresh[key]]
        if differs:
            unfit(", ".join(differs))
        saved_ids += group["params"]
    # torch pairs the i-th saved parameter id with the optimizer's i-th parameter: model.parameters() here.
    parameters = dict(zip(saved_ids, model.parameters()))
    for key, entry in saved["state"].items():
        if key not in parameters or not isinstance(entry, dict):
            unfit(f"state for parameter {key!r:.40}, which the saved groups do not list")
        shape = tuple(parameters[key].shape)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if tuple(value.shape) != shape:
                    unfit(f"{name} of parameter {key} has shape {tuple(value.shape)}, the parameter {shape}")
            elif name == "step" and not ((_is_number(value) or isinstance(value, torch.Tensor))
                                         and math.isfinite(float(value)) and float(value) >= 0):
                unfit(f"step of parameter {key} is {value!r:.40}")
            elif not isinstance(value, torch.Tensor) and value is not None and name != "step":
                unfit(f"{name} of parameter {key} is {value!r:.40}, expected a tensor")


def restore_checkpoint(path: Path, state: dict, options: dict, model: nn.Module, optimizer) -> None:
    """Load model, optimizer and RNG states; all checks come first, so a mismatch loads nothing."""
    saved_options = state["options"]
    saved = {name: saved_options.get(name, _ADDED_OPTIONS.get(name)) for name in options}
    differences = [f"--{name.replace('_', '-')} {value} (checkpoint: {saved[name]})"
                   for name, value in options.items() if saved[name] != value]
    if differences:
        hint = " (the cosine schedule depends on --epochs: only --schedule constant runs can be extended)" \
            if options.get("epochs") != saved_options.get("epochs") else ""
        raise CheckpointError(f"{path} was written by a run with other options; resuming needs the same ones. "
                              f"Differs: {', '.join(differences)}{hint}")
    if isinstance(model, MNISTNet):  # a checkpoint written before MNISTNet had the lesson's keys
        model.rename_earlier_keys(state["model"])
    _check_model_state(path, state["model"], model)
    _check_optimizer_state(path, state["optimizer"], optimizer, model)
    try:
        optimizer.load_state_dict(state["optimizer"])  # checks its groups before changing anything
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from e
    model.load_state_dict(state["model"])
    torch.set_rng_state(state["rng"]["cpu"])
    if torch.cuda.is_available():  # as many devices as both machines have (set_rng_state_all fails on more)
        for device, cuda_state in enumerate(state["rng"]["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


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
