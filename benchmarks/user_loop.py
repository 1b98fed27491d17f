"""The user's own training loop, stock against one `mnist_fast.fuse()` line (issue 15).

    python benchmarks/user_loop.py --threads 1 [--batch 64 1024] [--rounds 15] [--json out.json]

Each case is a model form from the lesson with its loss; the loop is what a user writes:

    out = model(x); loss = criterion(out, y); opt.zero_grad(); loss.backward(); opt.step()

with torch.optim.SGD(lr=0.01, momentum=0.9) (default settings otherwise). The fused side is the
same code after `model, criterion = mnist_fast.fuse(model), mnist_fast.fuse(criterion)`.
Stock and fused alternate in rounds of a fixed number of steps (interleaved, so a shared machine's
load hits both alike); the step time of a round is its mean, and the report gives the median over
rounds of the wall time and of this thread's CPU time (time.thread_time, which does not count
time the thread waited for a core). Pin a 1-thread run to one core: `taskset -c 0 python ...`.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist_fast  # noqa: E402
from benchmarks.lesson_models import Classifier  # noqa: E402


def _lesson(log_softmax):
    layers = [nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers, *([nn.LogSoftmax(dim=1)] if log_softmax else []))


# name -> (model, criterion, target speed-up at batch 64)
CASES = {
    "Sequential logits + CrossEntropyLoss": (lambda: _lesson(False), nn.CrossEntropyLoss, 1.3),
    "Sequential+LogSoftmax + NLLLoss": (lambda: _lesson(True), nn.NLLLoss, 1.3),
    "Classifier (F.relu, F.log_softmax) + NLLLoss": (Classifier, nn.NLLLoss, 1.2),
}


def _loop(model, criterion, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = {"k": 0}

    def step():
        x, y = batches[state["k"] % len(batches)]
        state["k"] += 1
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _round(step, steps):
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def make_steps(name, batch):
    """(stock step, fused step, name of the fused model's class): one training step each of the case's
    model and loss, stock and after the one fuse() line, on the same 4 batches in turn."""
    make_model, make_loss, _ = CASES[name]
    torch.manual_seed(0)
    stock_model, stock_loss = make_model(), make_loss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every form here must fuse completely
        fused_model, fused_loss = mnist_fast.fuse(copy.deepcopy(stock_model)), mnist_fast.fuse(make_loss())
    batches = [(torch.randn(batch, 784), torch.randint(0, 10, (batch,))) for _ in range(4)]
    return (_loop(stock_model, stock_loss, batches), _loop(fused_model, fused_loss, batches),
            type(fused_model).__name__)


def target_speedup(name, batch):
    return CASES[name][2] if batch == 64 else 1.0


def measure(name, batch, rounds, steps, warmup):
    stock_step, fused_step, fused_model = make_steps(name, batch)
    target = target_speedup(name, batch)
    loops = {"stock": stock_step, "fused": fused_step}
    for step in loops.values():
        for _ in range(warmup):
            step()
    times = {k: ([], []) for k in loops}
    for r in range(rounds):
        order = ("stock", "fused") if r % 2 == 0 else ("fused", "stock")
        for k in order:
            wall, cpu = _round(loops[k], steps)
            times[k][0].append(wall)
            times[k][1].append(cpu)
    med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}
    return {
        "case": name, "batch": batch, "target_speedup": target,
        "stock_us": med["stock"][0] * 1e6, "fused_us": med["fused"][0] * 1e6,
        "stock_cpu_us": med["stock"][1] * 1e6, "fused_cpu_us": med["fused"][1] * 1e6,
        "speedup": med["stock"][0] / med["fused"][0], "speedup_cpu": med["stock"][1] / med["fused"][1],
        "fused_model": fused_model,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per contender")
    parser.add_argument("--steps", type=int, default=0, help="steps per round (default: about 50 ms of work)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="only these cases (repeatable)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    conditions = (f"torch {torch.__version__}, {args.threads} thread(s), CPU capability "
                  f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
                  f"affinity {sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
    print(f"# user loop: stock vs mnist_fast.fuse(), torch.optim.SGD(momentum=0.9); {conditions}")
    print("| case | batch | stock µs/step (wall, CPU) | fused µs/step (wall, CPU) | speed-up (wall) "
          "| speed-up (thread CPU) | target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batch:
        steps = args.steps or max(2, int(60 * 64 / batch))
        for name in args.case or CASES:
            row = measure(name, batch, args.rounds, steps, warmup=3 * steps)
            rows.append(row)
            target = f">= {row['target_speedup']:.1f}x" if batch == 64 else "not slower"
            print(f"| {name} | {batch} | {row['stock_us']:.0f}, {row['stock_cpu_us']:.0f} "
                  f"| {row['fused_us']:.0f}, {row['fused_cpu_us']:.0f} | {row['speedup']:.2f}x "
                  f"| {row['speedup_cpu']:.2f}x | {target} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
