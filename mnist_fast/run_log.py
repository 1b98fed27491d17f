"""The per-epoch records of mnist_fast.train, on disk after every epoch: `--metrics FILE` (JSON Lines)
and `--tensorboard DIR` (TensorBoard event files, when the tensorboard package is installed).

The metrics file holds one JSON object per line:
    {"run": {"dataset": "mnist", "options": {...}}}                      the run, first
    {"epoch": 1, "lr": 0.01, "train_loss": 0.41, "val_loss": ..., ...}   one line per finished epoch
    {"final": {"epochs": 10, "test_loss": 0.07, "test_accuracy": 0.978}}  last, when the run ends
A run stopped by Ctrl-C or SIGTERM keeps the lines of its finished epochs; a resumed run rewrites the
file from its checkpoint's history, so it never holds an epoch twice. Read it with
`[json.loads(line) for line in open(path)]`, or `pandas.read_json(path, lines=True)`.
A regular file is replaced atomically after every epoch; a FIFO or /dev/stdout gets the new lines only.
"""
import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import OutputError, write_output, writes_through

__all__ = ["MetricsLog", "TensorBoardLog", "tensorboard_available"]

# TensorBoard's tag of each per-epoch number: one chart per quantity, the splits as its curves.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
                    "val_accuracy": "accuracy/val", "test_accuracy": "accuracy/test", "lr": "lr",
                    "epoch_time_s": "time/epoch_s", "samples_per_s": "time/samples_per_s"}


class MetricsLog:
    """--metrics: the run's header, then its epochs (history: those a resumed run already has)."""

    def __init__(self, path: Path, header: dict, history: List[dict]):
        self.path = Path(path)
        self.lines = [json.dumps({"run": header})] + [json.dumps(record) for record in history]
        # One stream for the whole run where the file is written in place: a FIFO's reader sees one stream.
        self.stream = None
        if writes_through(self.path):
            try:
                self.stream = open(self.path, "a")
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e
        self._write(self.lines)

    def add(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        self._write(self.lines[-1:])

    def _write(self, new_lines: List[str]) -> None:
        if self.stream is None:
            write_output(self.path, "".join(line + "\n" for line in self.lines).encode())
            return
        try:
            self.stream.write("".join(line + "\n" for line in new_lines))
            self.stream.flush()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def _summary_writer(log_dir: str, purge_step: Optional[int]):
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


class TensorBoardLog:
    """--tensorboard: each epoch's numbers as scalars at step = epoch. A resumed run first drops the events
    a killed run wrote after its checkpoint (purge_step), so that no epoch appears twice."""

    def __init__(self, log_dir: Path, epochs_done: int):
        self.writer = _summary_writer(str(log_dir), epochs_done + 1 if epochs_done else None)

    def add(self, record: Dict[str, float]) -> None:
        for key, value in record.items():
            if key in TENSORBOARD_TAGS:
                self.writer.add_scalar(TENSORBOARD_TAGS[key], value, record["epoch"])
        self.writer.flush()  # on disk now: a killed run keeps its epochs

    def close(self) -> None:
        self.writer.close()
