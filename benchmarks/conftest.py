"""pytest-benchmark suite: fused mnist_fast vs stock PyTorch (and both under torch.compile).

    pytest benchmarks --benchmark-only                         # eager: ours vs stock, float32 + bfloat16
    pytest benchmarks --benchmark-only --bench-compile         # + torch.compile rows (batch 64 and 1024)
    pytest benchmarks --benchmark-only --bench-batch-sizes 64 --bench-dtypes float32 -k cross_entropy

Not part of the normal test run: pyproject's testpaths is tests/, and `pytest tests` never looks
here. Each benchmark group compares implementations of one case; the case builders live in
benchmarks/cases.py, shared with the report (python -m benchmarks.report), and the clock is
benchmarks/timing.py's (--bench-clock; on a GPU a synchronizing one).
"""
import pytest
import torch

from benchmarks import timing

ALL_BATCH_SIZES = "1,64,256,1024,4096"
# benchmarks/timing.py's clocks, as pytest-benchmark's --benchmark-timer takes them (module.attr)
_TIMERS = {name: f"{fn.__module__}.{fn.__name__}"
           for name, fn in {**timing.HOST_CLOCKS, "cuda": timing.cuda_synced_clock}.items()}


def pytest_addoption(parser):
    group = parser.getgroup("mnist_fast benchmarks")
    group.addoption("--bench-batch-sizes", default=ALL_BATCH_SIZES, help="comma-separated batch sizes")
    group.addoption("--bench-dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    group.addoption("--bench-compile", action="store_true",
                    help="add ours/stock under torch.compile (compiling is slow on 2 cores: a few sizes only)")
    group.addoption("--bench-compile-batch-sizes", default="64,1024", help="batch sizes of the compiled cases")
    group.addoption("--bench-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    group.addoption("--bench-epoch-samples", type=int, default=60000, help="samples per epoch benchmark")
    group.addoption("--bench-clock", choices=tuple(_TIMERS), default=None,
                    help="default: pytest-benchmark's --benchmark-timer; wall: perf_counter; thread: CPU time of the calling thread (use with --bench-threads 1); "
                         "cuda: perf_counter after torch.cuda.synchronize()")


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()]


def pytest_configure(config):
    # pytest-benchmark reads its timer in its own pytest_configure, which runs after this one (trylast)
    clock = config.getoption("--bench-clock", default=None)
    if clock is not None and hasattr(config.option, "benchmark_timer"):
        config.option.benchmark_timer = _TIMERS[clock]
    threads = config.getoption("--bench-threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    """Parametrizes the (impl, batch) and dtype arguments of the benchmarks from the options:
    compiled implementations only at --bench-compile-batch-sizes, and only with --bench-compile."""
    cfg = metafunc.config
    explicit = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        explicit.update(n.strip() for n in (names.split(",") if isinstance(names, str) else names))
    if "impl" in explicit:
        return
    sizes = _ints(cfg.getoption("--bench-batch-sizes"))
    if "impl" in metafunc.fixturenames and "batch" in metafunc.fixturenames:
        impls = list(getattr(metafunc.function, "impls", ("ours", "stock")))
        cases = [(i, b) for b in sizes for i in impls]
        if cfg.getoption("--bench-compile"):
            compile_sizes = _ints(cfg.getoption("--bench-compile-batch-sizes"))
            cases += [(i, b) for b in sizes if b in compile_sizes for i in ("ours_compiled", "stock_compiled")]
        metafunc.parametrize(("impl", "batch"), cases, ids=[f"{i}-b{b}" for i, b in cases])
    elif "impl" in metafunc.fixturenames:
        impls = list(getattr(metafunc.function, "impls", ("ours", "stock")))
        metafunc.parametrize("impl", impls)
    elif "batch" in metafunc.fixturenames and "batch" not in explicit:
        metafunc.parametrize("batch", sizes, ids=[f"b{b}" for b in sizes])
    if "dtype" in metafunc.fixturenames and "dtype" not in explicit:
        dtypes = [d for d in cfg.getoption("--bench-dtypes").split(",") if d]
        metafunc.parametrize("dtype", dtypes)


@pytest.fixture
def epoch_samples(request):
    return request.config.getoption("--bench-epoch-samples")
