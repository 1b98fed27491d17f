"""Benchmark report: the fused mnist_fast ops against stock PyTorch, in one process.

    python -m benchmarks.report                       # full report (float32 + bfloat16, torch.compile rows)
    python -m benchmarks.report --quick               # a few seconds: batch 1 and 64, no compile
    python -m benchmarks.report --out-json bench.json --out-png bench.png --threads 2
    python -m benchmarks.report --capability avx2     # the ATen kernels of one CPU capability

Every comparison runs its implementations interleaved in one process (benchmarks/timing.py:
warm-up first, then A B A B ... blocks, the order reversed every other repeat so drift hits both
alike) and reports medians. The table shows stock/ours as the speedup: above 1 the fused op is
faster, below 1 it is slower and the table says so. The cases (benchmarks/cases.py) also back the
pytest-benchmark suite, so the suite and the report time the same code.
"""
import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/report.py): import from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cases import (CLASS_COUNTS, DTYPES, LAYER_SHAPES, make_cross_entropy, make_epoch,  # noqa: E402
                              make_gemms, make_linear_relu, make_pipeline_epoch, make_step_gemms, make_train_step,
                              peak_step_bytes, saved_activation_bytes)
from benchmarks import user_loop  # noqa: E402
from benchmarks.timing import fmt_time, machine_info, summary, time_interleaved  # noqa: E402

# The issues' targets (one thread; speedup = stock / ours, under the same CPU capability).
CE_TARGETS = {(64, 10): 1.3, (1024, 10): 2.5, (64, 1000): 1.3, (1024, 1000): 1.5}  # float32
CE_TARGET_LOW_PRECISION = 1.0  # bfloat16: not slower at any shape
LINEAR_RELU_TARGET = {64: 1.0, 1024: 1.0}  # fwd+bwd, every layer shape
LINEAR_RELU_GEMM_LIMIT = 1.15  # fused fwd+bwd at 64x784->128 within 1.15x of its three GEMMs
TRAIN_STEP_TARGET = {64: 1.25}  # and >= 1.0 at every batch size
FUSED_STEP_EPOCH_TARGET = {64: 2.5, 512: 1.3}  # FusedTrainer epoch vs stock eager
CAPABILITIES = ("default", "avx2", "avx512")


class Report:
    def __init__(self, args):
        self.args = args
        self.rows: List[dict] = []

    def compare(self, bench: str, shape: str, dtype: str, fns: Dict[str, Callable], target: Optional[str] = None,
                batch: Optional[int] = None, extra: Optional[dict] = None, repeats: Optional[int] = None,
                warmup: int = 3):
        """Time fns (keys 'ours', 'stock', and optional others) interleaved; add one table row."""
        samples = time_interleaved(fns, repeats=repeats or self.args.repeats, block_s=self.args.block_ms / 1e3,
                                   warmup=warmup, clock=self.args.clock)
        stats = {name: summary(s) for name, s in samples.items()}
        ours, stock = stats["ours"]["median_s"], stats["stock"]["median_s"]
        # Per-round ratios pair blocks that ran next to each other: their spread shows the noise.
        ratios = sorted(b / a for a, b in zip(samples["ours"], samples["stock"]))
        lo, hi = ratios[int(0.1 * (len(ratios) - 1))], ratios[int(math.ceil(0.9 * (len(ratios) - 1)))]
        row = {"bench": bench, "shape": shape, "dtype": dtype, "batch": batch, "impls": stats,
               "speedup": stock / ours, "speedup_p10": lo, "speedup_p90": hi, "target": target, **(extra or {})}
        self.rows.append(row)
        if not self.args.silent:
            print(f"  {bench:28s} {shape:22s} {dtype:9s} ours {fmt_time(ours):>10s}  stock {fmt_time(stock):>10s}"
                  f"  {stock / ours:5.2f}x", file=sys.stderr, flush=True)
        return row


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _paren_spread(row: dict) -> str:
    return f" (p10–p90 {_spread(row)})" if "speedup_p10" in row else ""


def _spread(row: dict) -> str:
    if "speedup_p10" not in row:
        return ""
    return f"{row['speedup_p10']:.2f}–{row['speedup_p90']:.2f}"


def _verdict(row: dict) -> str:
    s = row["speedup"]
    parts = []
    if "target_min" in row:
        need = row["target_min"]
        parts.append(f"target ≥ {need:g}×: {'met' if s >= need else 'MISSED'}")
    if "gemm_ratio_limit" in row:
        lim = row["gemm_ratio_limit"]
        r = row["ours_over_gemms"]
        parts.append(f"ours/GEMMs {r:.2f} (stock {row['stock_over_gemms']:.2f}), target ≤ {lim:g}: "
                     f"{'met' if r <= lim else 'MISSED'}")
    if s < 0.97:
        parts.append(f"**fused SLOWER ({s:.2f}×)**")
    elif s < 1.03:
        parts.append("tie (±3%)")
    return "; ".join(parts)


def measure_floors(args) -> dict:
    """What per-op fusion cannot remove: a minimal loss.backward() through the autograd engine
    (sum of a [64, 10] leaf) and the three GEMMs of a 64x784->128 Linear forward+backward."""
    leaf = torch.randn(64, 10, requires_grad=True)

    def engine():
        leaf.grad = None
        leaf.sum().backward()

    samples = time_interleaved({"engine": engine, "gemms": make_gemms(64, 784, 128)}, repeats=args.repeats,
                               block_s=args.block_ms / 1e3, clock=args.clock)
    gemms = statistics.median(samples["gemms"])
    return {"engine_floor_s": statistics.median(samples["engine"]), "gemms_64x784x128_s": gemms,
            "gemm_gflops_64x784x128": 3 * 2 * 64 * 784 * 128 / gemms / 1e9}


def run_report(args) -> dict:
    dtypes = args.dtypes
    bs = args.batch_sizes
    rep = Report(args)
    compile_ok = not args.no_compile
    say = (lambda *a: None) if args.silent else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.epochs_only:
        say("# whole epochs on real MNIST (benchmarks/epoch.py, a child process per thread count and batch size)")
        return {"machine": machine_info(), "config": dict(vars(args)), "floors": {}, "rows": [], "memory": [],
                "epochs": measure_epochs(args, say)}

    say("# floors: the autograd engine and the GEMMs")
    floors = measure_floors(args)
    say(f"  sum().backward() of a [64, 10] leaf: {fmt_time(floors['engine_floor_s'])}; three GEMMs of a "
        f"64x784->128 Linear fwd+bwd: {fmt_time(floors['gemms_64x784x128_s'])} "
        f"({floors['gemm_gflops_64x784x128']:.0f} GFLOP/s)")

    say("# cross-entropy, forward+backward (loss.backward() included) and forward (no_grad)")
    for dtype in dtypes:
        for classes in CLASS_COUNTS:
            for n in bs:
                target = CE_TARGETS.get((n, classes)) if dtype == "float32" else CE_TARGET_LOW_PRECISION
                rep.compare("cross_entropy fwd+bwd", f"[{n}, {classes}]", dtype,
                            {"ours": make_cross_entropy("ours", n, classes, dtype),
                             "stock": make_cross_entropy("stock", n, classes, dtype)},
                            target=f"≥ {target}×" if target else None, batch=n,
                            extra={"op": "ce", "classes": classes, "pass": "fwd+bwd",
                                   **({"target_min": target} if target else {})})
            for n in bs:
                rep.compare("cross_entropy fwd", f"[{n}, {classes}]", dtype,
                            {"ours": make_cross_entropy("ours", n, classes, dtype, backward=False),
                             "stock": make_cross_entropy("stock", n, classes, dtype, backward=False)},
                            batch=n, extra={"op": "ce", "classes": classes, "pass": "fwd"})

    say("# Linear+ReLU, forward+backward (all three grads) and forward (no_grad)")
    for dtype in dtypes:
        for fin, fout in LAYER_SHAPES:
            for n in bs:
                fns = {"ours": make_linear_relu("ours", n, fin, fout, dtype),
                       "stock": make_linear_relu("stock", n, fin, fout, dtype),
                       "gemms": make_gemms(n, fin, fout, dtype)}
                need = LINEAR_RELU_TARGET.get(n) if dtype == "float32" else None
                row = rep.compare("linear_relu fwd+bwd", f"{n}x{fin}->{fout}", dtype, fns, batch=n,
                                  target=f"≥ {need}×" if need else None,
                                  extra={"op": "linear_relu", "layer": f"{fin}->{fout}", "pass": "fwd+bwd",
                                         **({"target_min": need} if need else {})})
                g = row["impls"]["gemms"]["median_s"]
                row["ours_over_gemms"] = row["impls"]["ours"]["median_s"] / g
                row["stock_over_gemms"] = row["impls"]["stock"]["median_s"] / g
                if (n, fin, fout, dtype) == (64, 784, 128, "float32"):
                    row["gemm_ratio_limit"] = LINEAR_RELU_GEMM_LIMIT
                    row["target"] = f"≤ {LINEAR_RELU_GEMM_LIMIT}× GEMMs"
            for n in bs:
                rep.compare("linear_relu fwd", f"{n}x{fin}->{fout}", dtype,
                            {"ours": make_linear_relu("ours", n, fin, fout, dtype, backward=False),
                             "stock": make_linear_relu("stock", n, fin, fout, dtype, backward=False)},
                            batch=n, extra={"op": "linear_relu", "layer": f"{fin}->{fout}", "pass": "fwd"})

    say("# MNISTNet SGD train step")
    for dtype in dtypes:
        for n in bs:
            target = TRAIN_STEP_TARGET.get(n, 1.0) if dtype == "float32" else None
            row = rep.compare("train step (eager)", f"batch {n}", dtype,
                              {"ours": make_train_step("ours", n, dtype), "stock": make_train_step("stock", n, dtype),
                               "gemms": make_step_gemms(n, dtype)},
                              target=f"≥ {target}×" if target else None, batch=n,
                              extra={"op": "train_step", "pass": "eager",
                                     **({"target_min": target} if target else {})})
            g = row["impls"]["gemms"]["median_s"]
            row["ours_over_gemms"] = row["impls"]["ours"]["median_s"] / g
            row["stock_over_gemms"] = row["impls"]["stock"]["median_s"] / g

    if compile_ok:
        say("# torch.compile (model+loss compiled; a fresh compile per case, slow on 2 cores)")
        for n in args.compile_batch_sizes:
            rep.compare("train step (compiled)", f"batch {n}", "float32",
                        {"ours": make_train_step("ours_compiled", n), "stock": make_train_step("stock_compiled", n),
                         "stock_eager": make_train_step("stock", n)},
                        batch=n, extra={"op": "train_step", "pass": "compiled"})
            rep.compare("cross_entropy fwd+bwd (compiled)", f"[{n}, 10]", "float32",
                        {"ours": make_cross_entropy("ours_compiled", n, 10),
                         "stock": make_cross_entropy("stock_compiled", n, 10)},
                        batch=n, extra={"op": "ce", "classes": 10, "pass": "compiled"})

    say("# FusedTrainer: forward, loss, backward and SGD update as one op")
    for n in bs:
        row = rep.compare("train step (FusedTrainer)", f"batch {n}", "float32",
                          {"ours": make_train_step("fused_step", n), "stock": make_train_step("stock", n),
                           "gemms": make_step_gemms(n)},
                          batch=n, extra={"op": "fused_step"})
        g = row["impls"]["gemms"]["median_s"]
        row["ours_over_gemms"] = row["impls"]["ours"]["median_s"] / g
        row["stock_over_gemms"] = row["impls"]["stock"]["median_s"] / g

    say("# the user's own loop: model(x), loss, zero_grad, backward, torch.optim.SGD step; stock vs fuse()")
    for n in args.user_loop_batch_sizes:
        for name in user_loop.CASES:
            stock_step, fused_step, fused_model = user_loop.make_steps(name, n)
            need = user_loop.target_speedup(name, n)
            rep.compare("user loop, fuse()", f"{name}, batch {n}", "float32", {"ours": fused_step, "stock": stock_step},
                        target=f"≥ {need}×", batch=n, warmup=20,
                        extra={"op": "user_loop", "case": name, "fused_model": fused_model, "target_min": need})

    say("# epochs")
    rep.compare("epoch, tensors in memory", f"{args.epoch_samples} samples, batch 64", "float32",
                {"ours": make_epoch("ours", args.epoch_samples), "stock": make_epoch("stock", args.epoch_samples)},
                repeats=args.epoch_repeats, warmup=1, extra={"op": "epoch"})
    for n in sorted(FUSED_STEP_EPOCH_TARGET):
        need = FUSED_STEP_EPOCH_TARGET[n]
        rep.compare("epoch, FusedTrainer", f"{args.epoch_samples} samples, batch {n}", "float32",
                    {"ours": make_epoch("fused_step", args.epoch_samples, batch=n),
                     "stock": make_epoch("stock", args.epoch_samples, batch=n)},
                    repeats=args.epoch_repeats, warmup=1, target=f"≥ {need}×", batch=n,
                    extra={"op": "fused_step_epoch", "target_min": need})
    if args.pipeline_samples > 0:
        if importlib.util.find_spec("torchvision") is None:
            say("  (torchvision not installed: DataLoader pipeline skipped)")
        else:
            rep.compare("epoch, DataLoader+transforms", f"{args.pipeline_samples} samples, batch 64", "float32",
                        {"ours": make_pipeline_epoch("ours", args.pipeline_samples),
                         "stock": make_pipeline_epoch("stock", args.pipeline_samples)},
                        repeats=min(3, args.epoch_repeats), warmup=1, extra={"op": "pipeline"})

    if args.epoch_threads:
        say("# whole epochs on real MNIST (benchmarks/epoch.py, a child process per thread count and batch size)")
        result_epochs = measure_epochs(args, say)
    else:
        result_epochs = []

    say("# memory of a train step")
    memory = []
    for n in bs:
        ours, stock = saved_activation_bytes("ours", n), saved_activation_bytes("stock", n)
        memory.append({"batch": n, "saved_ours": ours, "saved_stock": stock,
                       "peak_ours": peak_step_bytes("ours", n), "peak_stock": peak_step_bytes("stock", n)})
    return {"machine": machine_info(), "config": {k: v for k, v in vars(args).items()}, "floors": floors,
            "rows": rep.rows, "memory": memory, "epochs": result_epochs}


# benchmarks/epoch.py's contenders, by the names it prints.
EPOCH_OURS, EPOCH_STOCK, EPOCH_JAX, EPOCH_CEILING = "fit_epoch", "stock eager", "JAX lax.scan", "compute ceiling"
# benchmarks/epoch.py's floating-point modes for the torch contenders (JAX's is always XLA's: flushed).
DENORMAL_MODES = {"ieee": "torch with IEEE denormals (its default)", "flush": "torch with denormals flushed (as XLA)"}
EPOCH_TARGETS = {"vs_jax_1": 1.25, "vs_jax_2": 1.25, "scaling_2": 1.6, "vs_stock_large": 1.3}


def measure_epochs(args, say) -> List[dict]:
    """Epoch times (medians of interleaved rounds) of every contender of benchmarks/epoch.py, for each
    thread count and batch size, each in a child process: the thread count is per process, and a
    2-thread run must be free to use every core (the report itself may be pinned to one). A 1-thread
    child is pinned to one core: unpinned, the process clock would also count the other contenders'
    helper threads (XLA's) running on the second core."""
    import tempfile

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "epoch.py")
    out = []
    for threads, batch, denormals in [(t, b, d) for d in args.epoch_denormals for t in args.epoch_threads
                                      for b in args.epoch_batches]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "epoch.json")
            cmd = [sys.executable, script, "--threads", str(threads), "--batch", str(batch),
                   "--rounds", str(args.epoch_rounds), "--samples", str(args.epoch_samples), "--out-json", path,
                   # one thread: process CPU time (steady on a shared machine); more: wall time
                   "--clock", "process" if threads == 1 else "wall"]
            if args.jax_python:
                cmd += ["--jax-python", args.jax_python]
            if args.no_compile:
                cmd.append("--no-compile")
            if denormals == "flush":
                cmd.append("--flush-denormal")
            cpus = set(range(os.cpu_count() or 1)) if threads > 1 else {min(os.sched_getaffinity(0))}
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                           preexec_fn=lambda: os.sched_setaffinity(0, cpus))
            with open(path) as f:
                data = json.load(f)
        medians = {name: statistics.median(t) for name, t in data["times_s"].items()}
        ran = "flush" if data["config"]["flush_denormal"] else "ieee"  # (what the child says it ran)
        out.append({"threads": threads, "batch": batch, "denormals": ran, "steps": data["steps"],
                    "data": data["data"], "clock": data["config"]["clock"], "median_s": medians})
        say(f"  {threads} thread(s), batch {batch}, denormals {denormals}: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in medians.items()))
    return out


def _ratio(r: float) -> str:
    """r to two decimals, rounded down: a ratio just under its target never prints as the target."""
    return f"{math.floor(r * 100 + 1e-9) / 100:.2f}x"


def epoch_targets(epochs: List[dict]) -> List[dict]:
    """Issue 14's targets from the epoch runs, for each denormal mode measured."""
    out = []
    by = {(e.get("denormals", "ieee"), e["threads"], e["batch"]): e["median_s"] for e in epochs}
    for (denormals, threads, batch), m in sorted(by.items()):
        ours = m.get(EPOCH_OURS)
        if ours is None:
            continue
        mode = f", {DENORMAL_MODES[denormals]}"
        jax = m.get(EPOCH_JAX)
        if batch == 64 and threads in (1, 2) and jax:
            need = EPOCH_TARGETS[f"vs_jax_{threads}"]
            out.append({"target": f"fit_epoch, batch 64, {threads} thread(s) >= {need:g}x faster than JAX{mode}",
                        "value": f"{_ratio(jax / ours)} ({ours:.3f} s vs {jax:.3f} s)", "met": jax / ours >= need})
        one_thread = by.get((denormals, 1, 64), {})
        if batch == 64 and threads == 2 and EPOCH_OURS in one_thread:
            one = one_thread[EPOCH_OURS]
            need = EPOCH_TARGETS["scaling_2"]
            # What the machine's two cores gave during these runs: large GEMMs, 1 thread / 2 threads.
            ceiling = m.get(EPOCH_CEILING), one_thread.get(EPOCH_CEILING)
            machine = f"; the compute ceiling scaled {ceiling[1] / ceiling[0]:.2f}x" if all(ceiling) else ""
            out.append({"target": f"fit_epoch, batch 64: 2 threads >= {need:g}x faster than 1 thread{mode}",
                        "value": f"{_ratio(one / ours)} ({ours:.3f} s vs {one:.3f} s{machine})", "met": one / ours >= need})
        if batch > 64:
            stock = m.get(EPOCH_STOCK)
            if stock:
                need = EPOCH_TARGETS["vs_stock_large"]
                out.append({"target": f"fit_epoch, batch {batch}, {threads} thread(s) >= {need:g}x stock eager{mode}",
                            "value": _ratio(stock / ours), "met": stock / ours >= need})
            if jax:
                out.append({"target": f"fit_epoch, batch {batch}, {threads} thread(s) not slower than JAX{mode}",
                            "value": _ratio(jax / ours), "met": jax / ours >= 1.0})
    return out


def targets(result: dict) -> List[dict]:
    """The issue's float32 targets, each with the measured value and met/missed."""
    out = []
    for r in result["rows"]:
        if "target_min" in r and r["bench"] in ("cross_entropy fwd+bwd", "linear_relu fwd+bwd", "user loop, fuse()"):
            out.append({"target": f"{r['bench']} {r['shape']} {r['dtype']} >= {r['target_min']:g}x stock",
                        "value": f"{r['speedup']:.2f}x{_paren_spread(r)}", "met": r["speedup"] >= r["target_min"]})
    rows = [r for r in result["rows"] if r["dtype"] == "float32"]
    for r in rows:
        if "gemm_ratio_limit" in r:
            out.append({"target": f"Linear+ReLU fwd+bwd {r['shape']} <= {r['gemm_ratio_limit']:g}x its three GEMMs",
                        "value": f"{r['ours_over_gemms']:.2f}x (stock {r['stock_over_gemms']:.2f}x)",
                        "met": r["ours_over_gemms"] <= r["gemm_ratio_limit"]})
    steps = [r for r in rows if r["bench"] == "train step (eager)"]
    for r in steps:
        if r["batch"] in TRAIN_STEP_TARGET:
            need = TRAIN_STEP_TARGET[r["batch"]]
            out.append({"target": f"MNISTNet train step batch {r['batch']} >= {need:g}x stock eager",
                        "value": f"{r['speedup']:.2f}x{_paren_spread(r)}", "met": r["speedup"] >= need})
    if steps:
        worst = min(steps, key=lambda r: r["speedup"])
        out.append({"target": "MNISTNet train step not slower than stock at any batch size",
                    "value": f"lowest {worst['speedup']:.2f}x{_paren_spread(worst)} at batch {worst['batch']}",
                    "met": worst["speedup"] >= 1.0})
    for r in rows:
        if r["bench"] == "epoch, FusedTrainer" and "target_min" in r:
            out.append({"target": f"FusedTrainer epoch, batch {r['batch']} >= {r['target_min']:g}x stock eager",
                        "value": f"{r['speedup']:.2f}x{_paren_spread(r)}", "met": r["speedup"] >= r["target_min"]})
    out += epoch_targets(result.get("epochs") or [])
    mem = result.get("memory") or []
    if mem:
        ratios = [r["saved_ours"]["activations"] / r["saved_stock"]["activations"] for r in mem]
        out.append({"target": "a train step saves less activation memory than stock",
                    "value": "ours/stock " + ", ".join(f"{x:.4f}" for x in ratios), "met": all(x < 1 for x in ratios)})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    machine = (f"mnist_fast vs stock PyTorch {m['torch_version']} on {m['cpu_model']} "
               f"({m['torch_threads']} thread(s), {m['cpu_count']} CPUs, CPU capability: ATen's kernels "
               f"{m.get('cpu_capability', 'not recorded')}, mnist_fast's {m.get('mnist_fast_cpu_capability', 'not recorded')})")
    if result["config"].get("epochs_only"):
        how = (f"whole epochs only: {result['config']['epoch_rounds']} interleaved rounds per child process, "
               f"the thread count and clock of each row below")
    else:
        how = (f"medians of {result['config']['repeats']} interleaved repeats, {result['config']['clock']} clock; "
               f"speedup = stock / ours of the medians; p10–p90: spread of the per-round ratios (each round "
               f"times ours and stock back to back)")
    lines = [f"{machine}, {how}. Command: `{result['command']}`", ""]
    f = result.get("floors")
    if f:
        lines += [f"Floors in this run: `leaf.sum().backward()` of a [64, 10] leaf (the autograd engine) "
                  f"{fmt_time(f['engine_floor_s'])}; the three GEMMs of a 64x784->128 Linear forward+backward "
                  f"{fmt_time(f['gemms_64x784x128_s'])} ({f['gemm_gflops_64x784x128']:.0f} GFLOP/s).", ""]
    summary = targets(result)
    if summary:
        lines += ["Targets (float32):", "", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'met' if t['met'] else '**missed**'} |" for t in summary]
        lines += [""]
    if result["rows"]:
        lines += ["All comparisons:", "",
                  "| benchmark | shape | dtype | ours | stock | speedup | p10–p90 | notes |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        notes = _verdict(row)
        if "stock_eager" in row["impls"]:
            eager = row["impls"]["stock_eager"]["median_s"]
            notes = "; ".join(filter(None, [notes, f"stock eager {fmt_time(eager)}, "
                                                   f"ours compiled vs stock eager "
                                                   f"{eager / row['impls']['ours']['median_s']:.2f}×"]))
        if "gemms" in row["impls"] and "gemm_ratio_limit" not in row:
            notes = "; ".join(filter(None, [notes, f"GEMMs alone {fmt_time(row['impls']['gemms']['median_s'])}: "
                                                   f"ours/GEMMs {row['ours_over_gemms']:.2f}, "
                                                   f"stock/GEMMs {row['stock_over_gemms']:.2f}"]))
        lines.append(f"| {row['bench']} | {row['shape']} | {row['dtype']} | "
                     f"{fmt_time(row['impls']['ours']['median_s'])} | {fmt_time(row['impls']['stock']['median_s'])} | "
                     f"{row['speedup']:.2f}× | {_spread(row)} | {notes} |")
    if result.get("epochs"):
        lines += ["", "Whole epochs (`benchmarks/epoch.py`, a child process each; 1 thread: process CPU time, "
                  "more: wall time), medians in seconds; in parentheses: stock eager / contender:", ""]
        names = list(dict.fromkeys(k for e in result["epochs"] for k in e["median_s"]))
        lines += ["| threads | batch | torch's denormals | " + " | ".join(names) + " |",
                  "|---:|---:|---|" + "---:|" * len(names)]
        for e in result["epochs"]:
            stock = e["median_s"].get(EPOCH_STOCK)
            cells = []
            for k in names:
                v = e["median_s"].get(k)
                cells.append("" if v is None else f"{v:.3f}" + (f" ({stock / v:.2f}×)" if stock else ""))
            lines.append(f"| {e['threads']} | {e['batch']} | {e.get('denormals', 'ieee')} | " + " | ".join(cells) + " |")
    if result.get("memory"):
        lines += ["", "Memory of one float32 train step: bytes saved for backward (saved-tensor hooks, each "
                  "storage once, parameters left out) and peak bytes allocated during forward+backward, grads included (torch.profiler).",
                  "", "| batch | saved ours | saved stock | ours/stock | peak ours | peak stock | ours/stock |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["memory"]:
            so, ss = r["saved_ours"]["activations"], r["saved_stock"]["activations"]
            lines.append(f"| {r['batch']} | {_fmt_bytes(so)} | {_fmt_bytes(ss)} | {so / ss:.3f}"
                         f"{' (MORE)' if so > ss else ''} | {_fmt_bytes(r['peak_ours'])} | "
                         f"{_fmt_bytes(r['peak_stock'])} | {r['peak_ours'] / max(1, r['peak_stock']):.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[str, List[tuple]] = {}
    for row in result["rows"]:
        if row.get("batch") is None or row.get("pass") == "fwd" or "compiled" in row["bench"]:
            continue
        label = f"{row['bench']} {row.get('layer', '')}{'C=' + str(row['classes']) if 'classes' in row else ''}"
        label = f"{label.strip()} ({row['dtype']})"
        series.setdefault(label, []).append((row["batch"], row["speedup"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if "float32" in label else "--", label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhspan(0, 1.0, color="red", alpha=0.06, label="below 1: fused slower")
    ax.set_xscale("log", base=2)
    sizes = sorted({b for pts in series.values() for b, _ in pts})
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup (stock time / fused time)")
    m = result["machine"]
    ax.set_title(f"mnist_fast vs stock PyTorch {m['torch_version']}, {m['cpu_model']}, "
                 f"{m['torch_threads']} thread(s), {result['config']['clock']} clock", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated (default 1,64,256,1024,4096)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per comparison (default 15)")
    p.add_argument("--block-ms", type=float, default=None, help="time per timed block of calls (default 20)")
    p.add_argument("--dtypes", type=lambda s: [d for d in s.split(",") if d], default=None,
                   help="comma-separated from float32,bfloat16 (default both)")
    p.add_argument("--compile-batch-sizes", type=_ints, default=None, help="torch.compile rows (default 64,1024)")
    p.add_argument("--user-loop-batch-sizes", type=_ints, default=None,
                   help="the user's-loop rows (benchmarks/user_loop.py; default 64,1024)")
    p.add_argument("--epoch-samples", type=int, default=None, help="samples of the in-memory epoch (default 60000)")
    p.add_argument("--pipeline-samples", type=int, default=None,
                   help="samples of the DataLoader+transforms epoch (default 60000; 0 skips it)")
    p.add_argument("--epoch-repeats", type=int, default=None,
                   help="rounds for the in-memory epoch row (default 7; the DataLoader epoch gets 3)")
    p.add_argument("--epochs-only", action="store_true", help="only the whole-epoch rows (benchmarks/epoch.py)")
    p.add_argument("--epoch-threads", type=_ints, default=None,
                   help="thread counts of the whole-epoch rows (benchmarks/epoch.py; default 1,2; '' skips them)")
    p.add_argument("--epoch-batches", type=_ints, default=None, help="their batch sizes (default 64,512,1024)")
    p.add_argument("--epoch-rounds", type=int, default=None, help="their interleaved rounds (default 5)")
    p.add_argument("--epoch-denormals", type=lambda v: [m for m in v.split(",") if m], default=None,
                   help="their torch contenders' denormal modes, from ieee,flush (default both; JAX always "
                        "flushes: see benchmarks/epoch.py)")
    p.add_argument("--jax-python", default=None,
                   help="a Python with jax installed, for the JAX row of the epochs (default: this one, if it has jax)")
    p.add_argument("--out-json", default=None, help="write the results as JSON here")
    p.add_argument("--out-png", default=None, help="write a speedup-vs-batch-size plot here")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: batch 1 and 64, 3 repeats, float32, small epochs, no compile")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--capability", choices=CAPABILITIES, default=None,
                   help="run with ATen's kernels for this CPU capability (ATEN_CPU_CAPABILITY, set in a child "
                        "process: it must be set before torch loads); default: the best this CPU has")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: perf_counter; thread: CPU time of the calling thread, steadier on a busy "
                        "machine (use with --threads 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="measure nothing: print the table of a saved --out-json run (and plot it with --out-png)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "batch_sizes": [1, 64] if quick else [1, 64, 256, 1024, 4096],
        "repeats": 3 if quick else 15,
        "block_ms": 2.0 if quick else 20.0,
        "dtypes": ["float32"] if quick else ["float32", "bfloat16"],
        "compile_batch_sizes": [64, 1024],
        "user_loop_batch_sizes": [64] if quick else [64, 1024],
        "epoch_threads": [] if quick else [1, 2],
        "epoch_batches": [64, 512, 1024],
        "epoch_rounds": 5,
        "epoch_denormals": ["ieee"] if quick else ["ieee", "flush"],
        "epoch_samples": 2048 if quick else 60000,
        "pipeline_samples": 256 if quick else 60000,
        "epoch_repeats": 1 if quick else 7,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if quick:
        args.no_compile = True
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected some of {','.join(DTYPES)}")
    for m in args.epoch_denormals:
        if m not in DENORMAL_MODES:
            p.error(f"unknown denormal mode {m!r}; expected some of {','.join(DENORMAL_MODES)}")
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread counts the calling thread only: use it with --threads 1")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def _rerun_with_capability(capability: str, argv: Sequence[str]) -> int:
    """Run this report again in a child process whose ATEN_CPU_CAPABILITY is `capability`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, "-m", "benchmarks.report", *argv], env=env, cwd=root).returncode


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.capability and not args.render:
        if os.environ.get("ATEN_CPU_CAPABILITY") != args.capability:
            code = _rerun_with_capability(args.capability, argv)
            if code:
                raise SystemExit(code)
            return {"child_returncode": code}
        running = torch.backends.cpu.get_cpu_capability().lower()
        if running != args.capability:  # ATen falls back to the best the CPU has
            raise SystemExit(f"--capability {args.capability}: this CPU runs ATen's {running} kernels at most")
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        print(markdown(result))
        if args.out_png:
            plot(result, args.out_png)
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    importlib.import_module("torch._dynamo")  # torch.optim imports it on first use: do it before timing

    gc.collect()
    gc.freeze()  # the long-lived objects of the imports: later collections skip them
    result = run_report(args)
    result["wall_s"] = time.time() - started
    result["command"] = "python -m benchmarks.report " + " ".join(argv)
    result["targets"] = targets(result)
    table = markdown(result)
    print(table)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.out_png:
        plot(result, args.out_png)
    return result


if __name__ == "__main__":
    main()
