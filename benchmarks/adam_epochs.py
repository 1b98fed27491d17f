"""Adam epochs: FusedTrainer.fit_epoch(optimizer="adam"|"adamw") against the stock loop with
torch.optim.Adam/AdamW, on real MNIST, in one process: epoch by epoch in turn, then the same epoch
from one saved state with IEEE and with flushed denormals. Process CPU time; pin it:

    taskset -c 0 python benchmarks/adam_epochs.py [--optimizer adam|adamw] [--epochs 4]

The denormal count is the number of exp_avg entries below float32's normal range: the moments of
dead ReLU units decay into it, and arithmetic on denormals is what makes a stock Adam epoch slow.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist_fast  # noqa: E402
from mnist_fast import data, models  # noqa: E402
from mnist_fast.trainer import FusedTrainer  # noqa: E402

BATCH, LR = 64, 1e-3


def denormal_exp_avg(state) -> int:
    return sum(((st["exp_avg"] != 0) & (st["exp_avg"].abs() < torch.finfo(st["exp_avg"].dtype).tiny)).sum().item()
               for st in state.values())


class Pair:
    """The stock model + optimizer and the fused model + FusedTrainer, from the same initial weights."""

    def __init__(self, optimizer: str):
        torch.manual_seed(0)
        self.fused = models.MNISTNet()
        self.stock = mnist_fast.unfuse(copy.deepcopy(self.fused))
        stock_opt = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        self.opt = stock_opt(self.stock.parameters(), lr=LR)
        self.trainer = FusedTrainer(self.fused, lr=LR, optimizer=optimizer)
        self.criterion = torch.nn.CrossEntropyLoss()

    def stock_epoch(self, images, labels, order) -> float:
        start = time.process_time()
        for s in range(0, len(order), BATCH):
            idx = order[s:s + BATCH]
            loss = self.criterion(self.stock(images[idx].flatten(1)), labels[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return time.process_time() - start

    def fused_epoch(self, images, labels, order) -> float:
        start = time.process_time()
        self.trainer.fit_epoch(images, labels, BATCH, order=order)
        return time.process_time() - start

    def save(self):
        return copy.deepcopy((self.stock.state_dict(), self.opt.state_dict(),
                              self.fused.state_dict(), self.trainer.state_dict()))

    def load(self, saved):
        self.stock.load_state_dict(saved[0])
        self.opt.load_state_dict(saved[1])
        self.fused.load_state_dict(saved[2])
        self.trainer.load_state_dict(saved[3])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=("adam", "adamw"), default="adam")
    parser.add_argument("--epochs", type=int, default=4, help="epochs in turn before the IEEE/flushed comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ds = data.load_dataset("mnist", download=False)
    images = data.normalize(ds.train.images) if ds.train.images.dtype == torch.uint8 else ds.train.images
    labels = ds.train.labels
    pair = Pair(args.optimizer)
    print(f"# {args.optimizer} lr {LR:g}, batch {BATCH}, 1 thread, {torch.backends.cpu.get_cpu_capability()}, "
          "process CPU time")
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        ts, tf = pair.stock_epoch(images, labels, order), pair.fused_epoch(images, labels, order)
        print(f"epoch {epoch} IEEE: stock loop {ts:.3f} s, fit_epoch {tf:.3f} s ({ts / tf:.2f}x); denormal "
              f"exp_avg entries: stock {denormal_exp_avg(pair.opt.state)}, fused {denormal_exp_avg(pair.trainer.state)}",
              flush=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(99))
    saved = pair.save()
    for flush in (False, True, False, True):
        pair.load(saved)
        torch.set_flush_denormal(flush)
        try:
            ts, tf = pair.stock_epoch(images, labels, order), pair.fused_epoch(images, labels, order)
        finally:
            torch.set_flush_denormal(False)
        print(f"from epoch-{args.epochs} state, {'flushed' if flush else 'IEEE   '}: stock loop {ts:.3f} s, "
              f"fit_epoch {tf:.3f} s ({ts / tf:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
