"""GPU timings of the fused ops against stock PyTorch, and a short workload for compute-sanitizer.

    python3 scripts/gpu_bench.py bench [--batches 64,1024,8192] [--device cuda]
    python3 scripts/gpu_bench.py workload [--device cuda]
    python3 scripts/gpu_bench.py parity [--device cuda]

bench: forward+backward of each op, fused (mnist_fast) and stock (torch.nn.functional), and of a
whole MNISTNet training step, at each batch size, interleaved (benchmarks/timing.py). On CUDA each
sample times a run of calls between two CUDA events; the median over samples is reported, in
microseconds per call. The table is printed last. With --device cpu (the dry run of
scripts/gpu_check.sh) it times with time.perf_counter and few samples: that checks the harness,
not the speed.

workload: a few fused training steps of MNISTNet plus one call of every kernel variant (small and
large class counts, weights, label smoothing, ignore_index, probability targets, empty batch), for
compute-sanitizer to watch. Exits 0 when everything ran.

parity: a short comparison with stock (outputs and gradients, four dtypes), for a GPU machine
without pytest; tests/test_cuda.py is the full check.

Run from the repository root (the in-place build of mnist_fast is imported from there).
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mnist_fast  # noqa: E402
from benchmarks.timing import time_interleaved  # noqa: E402
from mnist_fast import functional as MF  # noqa: E402
from mnist_fast.models import stock_mlp  # noqa: E402


def median_us(fns, device, samples, calls, warmup):
    """Median microseconds per call of each function, interleaved (benchmarks/timing.py): CUDA
    events around each block of calls on a GPU, perf_counter on the CPU."""
    clock = "cuda" if device.type == "cuda" else "wall"
    times = time_interleaved(fns, repeats=samples, warmup=warmup, clock=clock, calls=calls)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def _linear_case(batch, device, dtype):
    x = torch.randn(batch, 784, device=device, dtype=dtype, requires_grad=True)
    lin = torch.nn.Linear(784, 128).to(device=device, dtype=dtype)
    w, b = lin.weight, lin.bias

    def fused():
        MF.linear_relu(x, w, b).sum().backward()

    def stock():
        torch.relu(F.linear(x, w, b)).sum().backward()

    return fused, stock


def _loss_case(batch, device, dtype):
    logits = torch.randn(batch, 10, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 10, (batch,), device=device)

    def fused():
        MF.cross_entropy(logits, target).backward()

    def stock():
        F.cross_entropy(logits, target).backward()

    return fused, stock


def _train_case(batch, device, dtype):
    torch.manual_seed(0)
    fused_net = mnist_fast.models.MNISTNet().to(device=device, dtype=dtype)
    stock_net = stock_mlp().to(device=device, dtype=dtype)
    x = torch.randn(batch, 784, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)
    fused_opt = torch.optim.SGD(fused_net.parameters(), lr=1e-3)
    stock_opt = torch.optim.SGD(stock_net.parameters(), lr=1e-3)

    def step(net, opt, loss_fn):
        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
        return run

    return step(fused_net, fused_opt, MF.cross_entropy), step(stock_net, stock_opt, F.cross_entropy)


CASES = {
    "linear_relu 784->128 fwd+bwd": _linear_case,
    "cross_entropy C=10 fwd+bwd": _loss_case,
    "MNISTNet train step": _train_case,
}


def bench(args):
    device = torch.device(args.device)
    dry = device.type != "cuda"
    samples, calls, warmup = (3, 2, 1) if dry else (args.samples, args.calls, 10)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name, make in CASES.items():
        for batch in batches:
            fused, stock = make(batch, device, torch.float32)
            t = median_us({"stock": stock, "fused": fused}, device, samples, calls, warmup)
            rows.append((name, batch, t["stock"], t["fused"]))
    what = torch.cuda.get_device_name(device) if not dry else "CPU (dry run: harness check, not a timing)"
    print(f"\nfused vs stock on {what}, float32, median of {samples} samples of {calls} calls, us per call")
    header = f"{'op':<30} {'batch':>6} {'stock us':>10} {'fused us':>10} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for name, batch, t_stock, t_fused in rows:
        print(f"{name:<30} {batch:>6} {t_stock:>10.1f} {t_fused:>10.1f} {t_stock / t_fused:>7.2f}x")
    return 0


# ---- sanitizer workload ----

def workload(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = mnist_fast.models.MNISTNet().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(64, 784, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    for _ in range(2):
        opt.zero_grad()
        loss = MF.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    # Every kernel variant once: warp groups (C = 3, 10, 100) and block per row (C = 3000), a
    # multi-block grid, weights, smoothing, ignored rows, probability targets, uint8 targets.
    for dtype in (torch.float32, torch.float16):
        for rows, classes in ((5, 3), (300, 10), (40, 100), (7, 3000), (0, 10)):
            logits = torch.randn(rows, classes, device=device, dtype=dtype, requires_grad=True)
            target = torch.randint(0, classes, (rows,), device=device)
            small_target = target.to(torch.uint8) if classes <= 255 else target
            ignoring = target.clone()
            ignoring[:1] = -100
            weight = torch.rand(classes, device=device, dtype=dtype)
            probs = torch.softmax(torch.randn(rows, classes, device=device), 1).to(dtype).requires_grad_()
            for reduction in ("none", "mean", "sum"):
                MF.cross_entropy(logits, ignoring, weight=weight, reduction=reduction,
                                 label_smoothing=0.1).sum().backward()
                MF.cross_entropy(logits, small_target, reduction=reduction).sum().backward()
                MF.cross_entropy(logits, probs, weight=weight, reduction=reduction,
                                 label_smoothing=0.2).sum().backward()
        for shape in ((0, 16), (1, 16), (300, 16), (2, 3, 16)):
            inp = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
            lin = torch.nn.Linear(16, 40).to(device=device, dtype=dtype)
            MF.linear_relu(inp, lin.weight, lin.bias).sum().backward()
            MF.linear_relu(inp, lin.weight, None).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"workload ran on {device}: loss {loss.item():.4f}")
    return 0


# ---- parity without pytest ----

def _cast(kwargs, like):
    return {k: v.to(like.dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def parity(args):
    """A short parity check against stock, for machines without pytest (tests/test_cuda.py is the
    full one). Returns the number of mismatches."""
    device = torch.device(args.device)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
    failures = 0

    def compare(what, fused_fn, stock_fn, inputs, dtype, mask_by_output=False):
        nonlocal failures
        # Stock runs in float32 for bf16/fp16 inputs: in half precision it can overflow where the fused
        # ops, which accumulate in float32, do not.
        ref = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

        def leaves(dt):
            return [t.detach().to(dt if t.is_floating_point() else t.dtype).requires_grad_(t.is_floating_point())
                    if t is not None else None for t in inputs]

        f_in, s_in = leaves(dtype), leaves(ref)
        f_out = fused_fn(*f_in)
        s_out = stock_fn(*s_in)
        if mask_by_output:  # the ReLU mask of the fused output (see tests/test_cuda.py)
            s_out = s_out * (f_out.detach() > 0)
        grad = torch.randn_like(f_out)
        wanted = [i for i, t in enumerate(f_in) if t is not None and t.requires_grad]
        f_grads = torch.autograd.grad(f_out, [f_in[i] for i in wanted], grad)
        s_grads = torch.autograd.grad(s_out, [s_in[i] for i in wanted], grad.to(ref))
        try:
            torch.testing.assert_close(f_out, s_out.to(dtype), **tol[dtype], equal_nan=True)
            for a, b in zip(f_grads, s_grads):
                torch.testing.assert_close(a, b.to(dtype), **tol[dtype], equal_nan=True)
        except AssertionError as e:
            failures += 1
            print(f"MISMATCH {what}: {str(e).splitlines()[0]}")

    for dtype in tol:
        for rows, k, n in ((64, 784, 128), (300, 40, 100), (0, 8, 5)):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
            b = torch.randn(n, device=device, dtype=dtype)
            compare(f"linear_relu {dtype} {rows}x{k}->{n}", MF.linear_relu, lambda *a: torch.relu(F.linear(*a)),
                    [x, w, b], dtype, mask_by_output=True)
        for rows, classes in ((64, 10), (2000, 10), (7, 3000), (0, 10)):
            x = torch.randn(rows, classes, device=device, dtype=dtype) * 3
            t = torch.randint(0, classes, (rows,), device=device)
            t[::5] = -100
            w = torch.rand(classes, device=device, dtype=dtype) + 0.5
            p = torch.softmax(torch.randn(rows, classes, device=device), 1).to(dtype)
            for reduction in ("none", "mean", "sum"):
                for kw in (dict(), dict(weight=w, label_smoothing=0.1)):
                    compare(f"cross_entropy {dtype} {rows}x{classes} {reduction} {sorted(kw)}",
                            lambda x, t: MF.cross_entropy(x, t, reduction=reduction, **kw),
                            lambda x, t: F.cross_entropy(x, t, reduction=reduction, **_cast(kw, x)), [x, t], dtype)
                    compare(f"cross_entropy probabilities {dtype} {rows}x{classes} {reduction} {sorted(kw)}",
                            lambda x, p: MF.cross_entropy(x, p, reduction=reduction, **kw),
                            lambda x, p: F.cross_entropy(x, p, reduction=reduction, **_cast(kw, x)), [x, p], dtype)
    print(f"parity on {device}: {failures} mismatch(es)")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time fused vs stock")
    b.add_argument("--batches", default="64,1024,8192", help="comma-separated batch sizes")
    b.add_argument("--device", default="cuda")
    b.add_argument("--samples", type=int, default=25, help="samples per median")
    b.add_argument("--calls", type=int, default=20, help="calls per sample")
    w = sub.add_parser("workload", help="a short fused workload for compute-sanitizer")
    w.add_argument("--device", default="cuda")
    p = sub.add_parser("parity", help="a short parity check against stock, without pytest")
    p.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return {"bench": bench, "workload": workload, "parity": parity}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
