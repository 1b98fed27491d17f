"""Per-op benchmarks: Linear+ReLU at the MNIST layer shapes and cross-entropy at C=10 and C=1000,
forward (no_grad) and forward+backward, ours vs stock (vs both compiled with --bench-compile).
The group of a benchmark is one case; its members are the implementations."""
import pytest

from benchmarks import cases
from benchmarks.cases import warm


@pytest.mark.parametrize("features", cases.LAYER_SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_linear_relu(benchmark, impl, batch, dtype, features, backward):
    fin, fout = features
    run = warm(cases.make_linear_relu(impl, batch, fin, fout, dtype, backward=backward))
    benchmark.group = f"linear_relu {'fwd+bwd' if backward else 'fwd'} {batch}x{fin}->{fout} {dtype}"
    benchmark(run)


@pytest.mark.parametrize("features", cases.LAYER_SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_linear_gemms(benchmark, batch, dtype, features):
    """The three GEMMs of a Linear forward+backward alone, in the fwd+bwd group: the floor."""
    fin, fout = features
    run = warm(cases.make_gemms(batch, fin, fout, dtype))
    benchmark.group = f"linear_relu fwd+bwd {batch}x{fin}->{fout} {dtype}"
    benchmark.extra_info["impl"] = "three GEMMs alone"
    benchmark(run)


def _ce_impls(fn):
    fn.impls = ("ours", "stock", "stock_nll")
    return fn


@_ce_impls
@pytest.mark.parametrize("classes", cases.CLASS_COUNTS, ids=lambda c: f"C{c}")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_cross_entropy(benchmark, impl, batch, dtype, classes, backward):
    run = warm(cases.make_cross_entropy(impl, batch, classes, dtype, backward=backward))
    benchmark.group = f"cross_entropy {'fwd+bwd' if backward else 'fwd'} [{batch}, {classes}] {dtype}"
    benchmark(run)
