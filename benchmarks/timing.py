"""The one timing harness of the benchmarks: the report, bench_train_step.py, scripts/gpu_bench.py and
the pytest-benchmark suite (through its --benchmark-timer) all time with these clocks.

Clocks: 'wall' (time.perf_counter), 'thread' (CPU time of the calling thread, which leaves out the
time the process waits for a core on a busy machine; complete only with one torch thread) and
'cuda' (CUDA events around each block of calls: GPU time, no host sync inside the block).
"""
import gc
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["CLOCKS", "HOST_CLOCKS", "time_interleaved", "summary", "machine_info", "fmt_time", "cuda_synced_clock"]

CLOCKS = ("wall", "thread", "cuda")
HOST_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def cuda_synced_clock() -> float:
    """perf_counter after the GPU is done: the clock for harnesses that can only read a time
    (pytest-benchmark's timer); CUDA events need a start and an end around the calls."""
    torch.cuda.synchronize()
    return time.perf_counter()


def _block(fn: Callable[[], None], calls: int, clock: str) -> float:
    """Seconds taken by `calls` calls of fn, on `clock`."""
    if clock == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    timer = HOST_CLOCKS[clock]
    t0 = timer()
    for _ in range(calls):
        fn()
    return timer() - t0


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int = 15, block_s: float = 0.01,
                     warmup: int = 3, clock: str = "wall", calls: Optional[int] = None) -> Dict[str, List[float]]:
    """Seconds per call of each function: warm-up, then `repeats` rounds in which every function
    runs one block of calls (`calls` of them, or enough for about block_s), in A B C order,
    reversed every other round so that drift hits all alike. Garbage collection is off while the
    rounds run, as in timeit."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected one of {CLOCKS}")
    names = list(fns)
    numbers = {}
    for name in names:  # warm-up; the last warm-up call sizes the blocks
        for _ in range(max(1, warmup)):
            dt = _block(fns[name], 1, clock)
        numbers[name] = calls or max(1, min(100000, int(block_s / max(dt, 1e-9))))
    samples: Dict[str, List[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                samples[name].append(_block(fns[name], numbers[name], clock) / numbers[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def summary(samples: List[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "p25_s": q[0], "p75_s": q[2], "samples_s": samples}


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def machine_info() -> dict:
    """What a timing depends on: CPU (and the ATen CPU capability the kernels ran with), threads,
    versions, GPU, load."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import mnist_fast

    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mnist_fast_cpu_capability": mnist_fast._C.cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "mnist_fast_version": mnist_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "blas": "mkldnn" if torch.backends.mkldnn.is_available() else "",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
