"""One epoch of MNIST-shaped training: the fused step (FusedTrainer) against stock eager PyTorch and
against the GEMMs alone, in one process, interleaved, medians of several epochs.

    python -m benchmarks.bench_train_step [--batch 64 512] [--samples 60000] [--repeats 5] [--momentum 0.9]

Rows (seconds per epoch over `samples` random (1, 28, 28) images, the 784-128-64-10 network):
  stock eager   nn.Sequential(Linear, ReLU, ...) + nn.CrossEntropyLoss + torch.optim.SGD (default, for-loop)
  stock fused   the same with torch.optim.SGD(fused=True) (PyTorch's one-kernel SGD update)
  fused step    mnist_fast FusedTrainer.step (forward, loss, backward, SGD in one op)
  raw op        torch.ops.mnist_fast.train_step_sgd called directly (no FusedTrainer Python)
  GEMM only     the step's 8 GEMMs alone, torch.mm(out=...) into preallocated tensors, from Python
Then a torch.profiler breakdown of the fused op at each batch size: time inside its GEMMs (aten::mm)
against the rest of the op (elementwise passes, argument checks, dispatch).
"""
import argparse
import copy
import os
import statistics
import sys

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: import from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import time_interleaved  # noqa: E402
from mnist_fast.models import LESSON_SIZES as SIZES, stock_mlp  # noqa: E402
from mnist_fast.nn import fuse  # noqa: E402
from mnist_fast.trainer import FusedTrainer  # noqa: E402


def batches(images, labels, batch):
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, images.shape[0], batch)]


def stock_epoch(model, opt, data):
    loss_fn = nn.CrossEntropyLoss()

    def run():
        for x, y in data:
            loss = loss_fn(model(x.reshape(x.shape[0], -1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run


def fused_epoch(trainer, data):
    def run():
        for x, y in data:
            trainer.step(x, y)
    return run


def raw_op_epoch(trainer, data, momentum):
    op = torch.ops.mnist_fast.train_step_sgd.default
    params = trainer._params
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    flat = [(x.reshape(x.shape[0], -1), y) for x, y in data]
    wss = {x.shape[0]: trainer._workspace(x) for x, _ in flat}

    def run():
        for x, y in flat:
            op(x, y, params, bufs, wss[x.shape[0]], 0.01, momentum, 0.0, 0.0, False, False, -100, 0.0)
    return run


def gemm_epoch(data):
    ws = [torch.randn(b, a) for a, b in zip(SIZES[:-1], SIZES[1:])]  # (out, in)
    bufs = {}
    for x, _ in data:
        n = x.shape[0]
        if n not in bufs:
            bufs[n] = ([torch.empty(n, w.shape[0]) for w in ws], [torch.empty(n, w.shape[1]) for w in ws],
                       [torch.empty_like(w) for w in ws])
    flat = [x.reshape(x.shape[0], -1) for x, _ in data]

    def run():
        for x in flat:
            z, g, gw = bufs[x.shape[0]]
            a = x
            for l, w in enumerate(ws):  # forward
                torch.mm(a, w.t(), out=z[l])
                a = z[l]
            for l in range(len(ws) - 1, -1, -1):  # backward: grad input (not of layer 0), grad weight
                if l > 0:
                    torch.mm(z[l], ws[l], out=g[l])
                torch.mm(z[l].t(), x if l == 0 else z[l - 1], out=gw[l])
    return run


def profile_breakdown(trainer, data, steps=200):
    data = data[:steps]
    for x, y in data[:20]:
        trainer.step(x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in data:
            trainer.step(x, y)
    events = {e.key: e for e in prof.key_averages()}
    op = events["mnist_fast::train_step_sgd"]
    mm = events.get("aten::mm")
    n = len(data)
    total = op.cpu_time_total / n
    mm_time = mm.cpu_time_total / n if mm else 0.0
    return total, mm_time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.samples, 1, 28, 28)
    labels = torch.randint(0, 10, (args.samples,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples, "
          f"SGD lr=0.01 momentum={args.momentum}, float32, median of {args.repeats} epochs (interleaved)")
    for batch in args.batch:
        data = batches(images, labels, batch)
        base = stock_mlp()
        stock_model = copy.deepcopy(base)
        stock_fused_model = copy.deepcopy(base)
        fused_model = fuse(copy.deepcopy(base))
        raw_model = fuse(copy.deepcopy(base))
        runs = {
            "stock eager": stock_epoch(stock_model, torch.optim.SGD(stock_model.parameters(), lr=0.01,
                                                                    momentum=args.momentum), data),
            "stock fused SGD": stock_epoch(stock_fused_model, torch.optim.SGD(
                stock_fused_model.parameters(), lr=0.01, momentum=args.momentum, fused=True), data),
            "fused step": fused_epoch(FusedTrainer(fused_model, lr=0.01, momentum=args.momentum), data),
            "raw op": raw_op_epoch(FusedTrainer(raw_model, lr=0.01, momentum=args.momentum), data, args.momentum),
            "GEMM only": gemm_epoch(data),
        }
        # one epoch per block; the warm-up epoch pays for allocations, first touch, MKL init
        times = time_interleaved(runs, repeats=args.repeats, block_s=0, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"\nbatch {batch} ({len(data)} steps/epoch); median, then best epoch (a shared machine's noise "
              f"only ever adds time)")
        print(f"  {'':16} {'s/epoch':>8} {'us/step':>8} {'vs stock':>9} {'vs GEMM':>8} | {'best s':>7} "
              f"{'vs stock':>9} {'vs GEMM':>8} | max s")
        for name, t in med.items():
            b = best[name]
            print(f"  {name:16} {t:8.3f} {t / len(data) * 1e6:8.1f} {med['stock eager'] / t:8.2f}x "
                  f"{t / med['GEMM only']:7.2f}x | {b:7.3f} {best['stock eager'] / b:8.2f}x "
                  f"{b / best['GEMM only']:7.2f}x | {max(times[name]):.3f}")
        total, mm_time = profile_breakdown(FusedTrainer(fuse(copy.deepcopy(base)), lr=0.01,
                                                        momentum=args.momentum), data)
        print(f"  profiler (fused op, us/step; profiling inflates both): op {total:.1f} = GEMMs {mm_time:.1f} "
              f"+ rest {total - mm_time:.1f}")


if __name__ == "__main__":
    main()
