"""The eager fast path (mnist_fast._C) releases the GIL while an op runs, as torch's own ops do.

A second Python thread counts while the main thread runs a long op; the count is compared with the
count during a sleep of the same length. Holding the GIL for the op leaves the counter at about 0
(it runs only between calls, about one 5 ms switch interval per call, hence calls of a few hundred
ms); releasing it lets the counter run at a good part of its idle rate
even on a busy two-core machine. Intra-op threads are limited to 1 so the op leaves a core free.
"""
import threading
import time

import pytest
import torch

import mnist_fast
from mnist_fast import _C


class Counter:
    def __init__(self):
        self.count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop:
            self.count += 1

    def __enter__(self):
        self._thread.start()
        while self.count == 0:  # running
            time.sleep(0.001)
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def _counts_during(call, min_seconds=0.6):
    """Counter increments during repeated calls (at least min_seconds), then during a sleep as long."""
    call()  # warm up (allocations, first-call lookups)
    with Counter() as counter:
        start, t0 = counter.count, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds:
            call()
        elapsed = time.perf_counter() - t0
        during_op = counter.count - start
        start = counter.count
        time.sleep(elapsed)
        during_sleep = counter.count - start
    return during_op, during_sleep


def _big_linear_relu():
    x, w, b = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.randn(2048)
    return lambda: _C.linear_relu(x, w, b)


def _big_cross_entropy():
    x, t = torch.randn(8192, 8192), torch.randint(0, 8192, (8192,))
    return lambda: _C.cross_entropy(x, t, None, 1, -100, 0.1)


def _big_train_step():
    x, t = torch.randn(1024, 2048), torch.randint(0, 10, (1024,))
    params = [torch.randn(2048, 2048) * 0.01, torch.zeros(2048), torch.randn(10, 2048) * 0.01, torch.zeros(10)]
    ws = torch.ops.mnist_fast.train_step_workspace(x, params)
    return lambda: _C.train_step_sgd(x, t, params, [], ws, 1e-3, 0.0, 0.0, 0.0, False, False, -100, 0.0)


@pytest.mark.parametrize("make_call", [_big_linear_relu, _big_cross_entropy, _big_train_step],
                         ids=["linear_relu", "cross_entropy", "train_step_sgd"])
def test_other_threads_run_while_an_op_runs(make_call):
    call = make_call()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        during_op, during_sleep = _counts_during(call)
    finally:
        torch.set_num_threads(threads)
    assert during_sleep > 0
    # With the GIL held the ratio is about 0.02 (measured on the shared two-core machine);
    # released, about 1 on an idle machine.
    assert during_op / during_sleep > 0.25, (during_op, during_sleep)


def test_the_gil_is_held_again_for_results_and_errors():
    # Argument conversion, the result and an exception all cross back into Python correctly.
    x = torch.randn(3, 4)
    w = torch.randn(5, 4)
    torch.testing.assert_close(_C.linear_relu(x, w), torch.relu(x @ w.T))
    with pytest.raises(ValueError, match="in_features"):
        _C.linear_relu(x, torch.randn(5, 3))
    with pytest.raises(IndexError, match="out of bounds"):
        _C.cross_entropy(x, torch.tensor([0, 1, 9]), None, 1, -100, 0.0)
    assert mnist_fast.cuda_compiled() in (True, False)
