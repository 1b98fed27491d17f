"""CUDA kernels of mnist_fast against stock PyTorch on the same GPU, and the GPU check script.

Every CUDA test is skipped, visibly, when torch.cuda.is_available() is false; the tests of
scripts/gpu_check.sh --dry-run run everywhere. A device-side assert (bad class index) poisons
the CUDA context of its process, so those tests run in a subprocess.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mnist_fast
from mnist_fast import functional as MF

from helpers import DTYPES, LOW_PRECISION, TOL, assert_close, child_env, tests_the_checkout

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAVE_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device on this machine")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _cuda_build():
    # A GPU with a build that lacks the CUDA kernels is a broken build, not a skip.
    if HAVE_CUDA:
        assert mnist_fast.cuda_compiled(), "a CUDA device is present but mnist_fast was built without CUDA"
    torch.manual_seed(0)


def _leaf(t):
    return t.detach().clone().requires_grad_(t.is_floating_point())


def _grads(out, inputs, grad=None):
    if grad is None:
        grad = torch.randn_like(out)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad)


# ---- linear_relu ----

LINEAR_SHAPES = [
    ((64, 784), 128),   # MNIST's first layer
    ((300, 40), 100),   # several row chunks, a partial column tile
    ((3, 5, 7), 33),    # batched input
    ((7,), 4),          # 1-d input
    ((1, 1), 1),
]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,out_features", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_relu_matches_stock(dtype, shape, out_features, bias):
    x = torch.randn(shape, device=CUDA, dtype=dtype)
    w = torch.randn(out_features, shape[-1], device=CUDA, dtype=dtype) / shape[-1] ** 0.5
    b = torch.randn(out_features, device=CUDA, dtype=dtype) if bias else None
    args = [x, w, b]
    fused_args = [_leaf(t) if t is not None else None for t in args]
    stock_args = [_leaf(t) if t is not None else None for t in args]
    fused = MF.linear_relu(*fused_args)
    stock = torch.relu(F.linear(*stock_args))
    assert_close(fused, stock, dtype)
    grad = torch.randn_like(stock)
    if dtype in LOW_PRECISION:
        # Stock adds the bias inside the GEMM, before rounding; a pre-activation within an ulp of 0
        # can then be masked on one side only. Check the grads against float32 math with the fused
        # output's mask instead.
        stock_args = [_leaf(t.float()) if t is not None else None for t in args]
        stock = torch.relu(F.linear(*stock_args)) * (fused.detach() > 0)
    for got, want in zip(_grads(fused, fused_args, grad), _grads(stock, stock_args, grad.to(stock.dtype))):
        assert_close(got, want.to(dtype), dtype)


@requires_cuda
@torch.no_grad()
def test_linear_relu_cuda_matches_cpu_kernel_float64():
    # The same row_math arithmetic on both backends: agreement to rounding.
    x = torch.randn(200, 30, dtype=torch.float64)
    w = torch.randn(50, 30, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64)
    g = torch.randn(200, 50, dtype=torch.float64)
    out_cpu = torch.ops.mnist_fast.linear_relu(x, w, b)
    out_gpu = torch.ops.mnist_fast.linear_relu(x.cuda(), w.cuda(), b.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)
    mask = [True, True, True]
    grads_cpu = torch.ops.mnist_fast._linear_relu_backward(g, x, w, out_cpu, mask)
    grads_gpu = torch.ops.mnist_fast._linear_relu_backward(g.cuda(), x.cuda(), w.cuda(), out_gpu, mask)
    for a, b_ in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), b_)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@torch.no_grad()
def test_linear_relu_bias_grad_deterministic_many_rows(dtype):
    # Enough rows for multi-chunk partials and, at 64 * 65535 + 5, for longer chunks than 64 rows.
    rows = 64 * 65535 + 5
    x = torch.randn(rows, 2, device=CUDA, dtype=dtype)
    w = torch.randn(3, 2, device=CUDA, dtype=dtype)
    b = torch.randn(3, device=CUDA, dtype=dtype)
    out = torch.ops.mnist_fast.linear_relu(x, w, b)
    g = torch.randn_like(out)
    first = torch.ops.mnist_fast._linear_relu_backward(g, x, w, out, [False, False, True])[2]
    second = torch.ops.mnist_fast._linear_relu_backward(g, x, w, out, [False, False, True])[2]
    assert torch.equal(first, second)
    want = (g.double() * (out > 0)).sum(0)  # magnitude ~1e3: fp32 accumulation over 4M rows
    torch.testing.assert_close(first.double(), want, rtol=2e-3 if dtype == torch.float16 else 1e-4, atol=0.05)


@requires_cuda
def test_linear_relu_stride0_grad():
    # .sum().backward() hands backward an expanded grad with stride 0 (NVIDIA/apex#1392).
    x = torch.randn(2, 9, 16, device=CUDA, requires_grad=True)
    lin = torch.nn.Linear(16, 24).to(CUDA)
    MF.linear_relu(x, lin.weight, lin.bias).sum().backward()
    fused = [x.grad, lin.weight.grad, lin.bias.grad]
    x2 = x.detach().clone().requires_grad_()
    lin2 = torch.nn.Linear(16, 24).to(CUDA)
    lin2.load_state_dict(lin.state_dict())
    torch.relu(lin2(x2)).sum().backward()
    for got, want in zip(fused, [x2.grad, lin2.weight.grad, lin2.bias.grad]):
        torch.testing.assert_close(got, want)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_relu_empty_batch(dtype):
    x = torch.randn(0, 8, device=CUDA, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 8, device=CUDA, dtype=dtype, requires_grad=True)
    b = torch.randn(5, device=CUDA, dtype=dtype, requires_grad=True)
    out = MF.linear_relu(x, w, b)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@requires_cuda
@pytest.mark.parametrize("in_features,out_features", [(0, 3), (4, 0)])
def test_linear_relu_zero_features(in_features, out_features):
    # Stock accepts both: a bias-only output, and an empty one.
    x = torch.randn(5, in_features, device=CUDA, requires_grad=True)
    w = torch.randn(out_features, in_features, device=CUDA, requires_grad=True)
    b = torch.randn(out_features, device=CUDA, requires_grad=True)
    fused = MF.linear_relu(x, w, b)
    x2, w2, b2 = (_leaf(t) for t in (x, w, b))
    stock = torch.relu(F.linear(x2, w2, b2))
    torch.testing.assert_close(fused, stock)
    fused.sum().backward()
    stock.sum().backward()
    for got, want in zip((x.grad, w.grad, b.grad), (x2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(got, want)


@requires_cuda
def test_linear_relu_gradcheck():
    x = torch.randn(6, 5, device=CUDA, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, device=CUDA, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=CUDA, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MF.linear_relu, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: MF.linear_relu(x, w), (x, w))


@requires_cuda
def test_linear_relu_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="same device"):
        MF.linear_relu(torch.randn(2, 3, device=CUDA), torch.randn(4, 3))


# ---- cross_entropy ----

# Class counts across the kernel variants: warp groups of 1, 2, 8, 32 lanes, and a block per row.
CLASSES = [1, 3, 10, 100, 1000, 1025, 5000]


def _ce_inputs(rows, classes, dtype, probabilities=False, ignore=False):
    x = torch.randn(rows, classes, device=CUDA, dtype=dtype) * 3
    if probabilities:
        t = torch.softmax(torch.randn(rows, classes, device=CUDA), 1).to(dtype)
    else:
        t = torch.randint(0, classes, (rows,), device=CUDA)
        if ignore and rows:
            t[::3] = -100
    return x, t


def _ce_check(x, t, dtype, **kw):
    # bf16/fp16 against stock in float32: stock in half precision can overflow where the fused op,
    # which accumulates in float32, does not (a weighted smoothed sum over 2000 rows exceeds 65504).
    ref = torch.float32 if dtype in LOW_PRECISION else dtype
    fx, sx = _leaf(x), _leaf(x.to(ref))
    ft, st = _leaf(t), _leaf(t.to(ref) if t.is_floating_point() else t)
    stock_kw = {k: (v.to(ref) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    fused = MF.cross_entropy(fx, ft, **kw)
    stock = F.cross_entropy(sx, st, **stock_kw)
    assert_close(fused, stock.to(dtype), dtype)
    grad = torch.randn_like(fused)
    for got, want in zip(_grads(fused, [fx, ft], grad), _grads(stock, [sx, st], grad.to(ref))):
        assert_close(got, want.to(dtype), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_index_matches_stock(dtype, classes, rows, reduction):
    x, t = _ce_inputs(rows, classes, dtype, ignore=True)
    _ce_check(x, t, dtype, reduction=reduction)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [10, 1025])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_index_options_match_stock(dtype, classes, reduction, smoothing):
    x, t = _ce_inputs(2000, classes, dtype, ignore=True)  # several blocks: partials + finish kernel
    w = torch.rand(classes, device=CUDA, dtype=dtype) + 0.5
    _ce_check(x, t, dtype, weight=w, reduction=reduction, label_smoothing=smoothing)
    t1 = torch.where(t < 0, 1, t)  # class 1 is the one ignored now
    _ce_check(x, t1, dtype, reduction=reduction, label_smoothing=smoothing, ignore_index=1)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [3, 10, 1025])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_probabilities_match_stock(dtype, classes, reduction, smoothing):
    x, t = _ce_inputs(130, classes, dtype, probabilities=True)
    w = torch.rand(classes, device=CUDA, dtype=dtype) + 0.5
    _ce_check(x, t, dtype, reduction=reduction, label_smoothing=smoothing)
    _ce_check(x, t, dtype, weight=w, reduction=reduction, label_smoothing=smoothing)


@requires_cuda
def test_cross_entropy_uint8_targets_and_nd_input():
    x = torch.randn(4, 10, 3, 2, device=CUDA)
    t = torch.randint(0, 10, (4, 3, 2), device=CUDA)
    _ce_check(x, t, torch.float32)
    torch.testing.assert_close(MF.cross_entropy(x, t.to(torch.uint8)), F.cross_entropy(x, t))


@requires_cuda
@torch.no_grad()
def test_cross_entropy_cuda_matches_cpu_kernel_float64():
    x = torch.randn(500, 10, dtype=torch.float64)
    t = torch.randint(0, 10, (500,))
    t[::7] = -100
    w = torch.rand(10, dtype=torch.float64)
    for reduction in (0, 1, 2):
        cpu = torch.ops.mnist_fast.cross_entropy_forward(x, t, w, reduction, -100, 0.1)
        gpu = torch.ops.mnist_fast.cross_entropy_forward(x.cuda(), t.cuda(), w.cuda(), reduction, -100, 0.1)
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b)
        g = torch.randn_like(cpu[0])
        gx_cpu = torch.ops.mnist_fast._cross_entropy_backward(g, x, t, w, cpu[1], reduction, -100, 0.1,
                                                             [True, False])[0]
        gx_gpu = torch.ops.mnist_fast._cross_entropy_backward(g.cuda(), x.cuda(), t.cuda(), w.cuda(), gpu[1],
                                                             reduction, -100, 0.1, [True, False])[0]
        torch.testing.assert_close(gx_gpu.cpu(), gx_cpu)


@requires_cuda
@pytest.mark.parametrize("classes", [10, 3000])
def test_cross_entropy_reduction_deterministic(classes):
    x, t = _ce_inputs(5000, classes, torch.float32)
    first = MF.cross_entropy(x, t, label_smoothing=0.1)
    for _ in range(3):
        assert torch.equal(MF.cross_entropy(x, t, label_smoothing=0.1), first)


@requires_cuda
def test_cross_entropy_logsumexp_dtype():
    for dtype, lse_dtype in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        x, t = _ce_inputs(4, 10, dtype)
        _, lse = torch.ops.mnist_fast.cross_entropy_forward(x, t, None, 1, -100, 0.0)
        assert lse.dtype == lse_dtype
        torch.testing.assert_close(lse, torch.logsumexp(x.to(lse_dtype), 1), **TOL[dtype])


@requires_cuda
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_stride0_grad(reduction):
    x, t = _ce_inputs(33, 10, torch.float32)
    fx, sx = _leaf(x), _leaf(x)
    MF.cross_entropy(fx, t, reduction=reduction).sum().backward()
    F.cross_entropy(sx, t, reduction=reduction).sum().backward()
    torch.testing.assert_close(fx.grad, sx.grad)


@requires_cuda
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_cross_entropy_empty_batch(reduction, probabilities):
    x, t = _ce_inputs(0, 10, torch.float32, probabilities=probabilities)
    fx, sx = _leaf(x), _leaf(x)
    fused = MF.cross_entropy(fx, t, reduction=reduction)
    stock = F.cross_entropy(sx, t, reduction=reduction)
    torch.testing.assert_close(fused, stock, equal_nan=True)
    fused.sum().backward()
    assert fx.grad.shape == (0, 10)


@requires_cuda
def test_cross_entropy_all_rows_ignored_mean_is_nan():
    x = torch.randn(5, 10, device=CUDA)
    t = torch.full((5,), -100, device=CUDA)
    assert torch.isnan(MF.cross_entropy(x, t))
    assert torch.isnan(F.cross_entropy(x, t))


@requires_cuda
def test_cross_entropy_gradcheck():
    x = torch.randn(5, 4, device=CUDA, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 2], device=CUDA)
    w = torch.rand(4, device=CUDA, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda x: MF.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1), (x,))
    p = torch.softmax(torch.randn(5, 4, device=CUDA, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: MF.cross_entropy(x, p, weight=w, label_smoothing=0.2), (x, p))
    big = torch.randn(2, 1500, device=CUDA, dtype=torch.float64, requires_grad=True)  # a block per row
    assert torch.autograd.gradcheck(lambda x: MF.cross_entropy(x, torch.tensor([0, 1499], device=CUDA)), (big,))


_BAD_INDEX = textwrap.dedent("""
    import sys, torch
    from mnist_fast import functional as MF
    x = torch.randn({rows}, {classes}, device="cuda", requires_grad=True)
    t = torch.zeros({rows}, dtype=torch.long, device="cuda")
    t[{rows} // 2] = {bad}
    try:
        if {backward}:
            with torch.no_grad():
                lse = torch.logsumexp(x, 1)
                torch.ops.mnist_fast._cross_entropy_backward(
                    torch.ones((), device="cuda"), x, t, None, lse, 1, -100, 0.0, [True, False])
        else:
            MF.cross_entropy(x, t)
        torch.cuda.synchronize()
    except Exception as e:  # the CUDA error surfaces as a RuntimeError, here or at the next sync
        print("raised:", type(e).__name__, e)
        sys.exit(3)
    print("no error")
""")


@requires_cuda
@pytest.mark.parametrize("bad,classes,backward", [
    ("past_end", 10, False), (-1, 10, False), (1 << 40, 2000, False),  # warp groups, block per row
    ("past_end", 10, True), (-1, 2000, True),
])
def test_cross_entropy_bad_index_raises(bad, classes, backward, tmp_path):
    index = classes if bad == "past_end" else bad
    code = _BAD_INDEX.format(rows=64, classes=classes, bad=index, backward=backward)
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no error" not in out, out
    assert "device-side assert" in out or "raised" in out, out


# ---- scripts/gpu_check.sh, CPU side ----

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _script(*args, timeout=300):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_gpu_check_help_and_bad_arguments():
    proc = _script("--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout
    assert _script("--no-such-option").returncode == 2
    assert _script("--batches", "64,x").returncode == 2
    assert _script("--budget", "soon").returncode == 2


def _can_compile_cuda():
    from torch.utils import cpp_extension
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source checkout")
@pytest.mark.skipif(not tests_the_checkout(), reason="gpu_check.sh runs the checkout's in-place build")
@pytest.mark.skipif(not _can_compile_cuda(), reason="no CUDA toolkit or a CPU-only torch: no CUDA build to configure")
def test_gpu_check_dry_run():
    proc = _script("--dry-run", "--batches", "64")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # The build configuration includes the CUDA sources, the harness ran, the summary is last.
    assert "csrc/cuda/cross_entropy.cu" in out and "csrc/cuda/linear_relu.cu" in out, out
    assert "TORCH_CUDA_ARCH_LIST=" in out
    assert "fused vs stock on CPU" in out
    summary = proc.stdout[proc.stdout.index("== summary"):]
    for step in ("build config", "bench harness (cpu)", "sanitizer workload (cpu)", "parity harness (cpu)"):
        assert step in summary and "FAILED" not in summary, summary
