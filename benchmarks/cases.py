"""The benchmark cases: fused mnist_fast against stock PyTorch, shared by the report
(benchmarks/report.py) and the pytest-benchmark suite, so both time the same code.

Each builder returns a zero-argument callable that runs one iteration; the setup (tensors,
modules, compilation on first call) happens outside the timed callable.
"""
import os
from typing import Callable, Dict

import torch
from torch import nn

from mnist_fast.data import Split, normalize
from mnist_fast.lesson_loader import LessonBatches
from mnist_fast.models import LESSON_SIZES, MNISTNet, stock_mlp
from mnist_fast.nn import CrossEntropyLoss, LinearReLU
from mnist_fast.trainer import FusedTrainer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYER_SHAPES = tuple(zip(LESSON_SIZES[:-2], LESSON_SIZES[1:-1]))  # the Linear+ReLU layers
CLASS_COUNTS = (10, 1000)
IMPLS = ("ours", "stock", "ours_compiled", "stock_compiled")


def _dtype(dtype) -> torch.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def _compile(fn):
    # A fresh compile per case: the cases share code objects, and dynamo's per-code cache limit
    # would otherwise send later cases back to eager silently.
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _split_impl(impl: str):
    if impl not in IMPLS and impl != "stock_nll":
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS + ('stock_nll',)}")
    return impl.split("_")[0], impl.endswith("_compiled")


def warm(run: Callable[[], None], times: int = 3) -> Callable[[], None]:
    """Runs a case a few times before it is timed (compiles a compiled case, fills allocator
    caches) and returns it."""
    for _ in range(times):
        run()
    return run


def make_linear_relu(impl: str, batch: int, in_features: int, out_features: int, dtype="float32",
                     backward: bool = True) -> Callable[[], None]:
    """Linear+ReLU: ours is one LinearReLU module; stock is nn.Linear then nn.ReLU (the pair that
    fuse() replaces). forward runs under no_grad; backward=True is forward + .backward(grad) with
    every grad (input, weight, bias) computed, the parameters' .grad reset first as zero_grad does."""
    kind, compiled = _split_impl(impl)
    dt = _dtype(dtype)
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(dt)
    if kind == "ours":
        fn = LinearReLU.from_linear(linear)
    else:
        relu = nn.ReLU()

        def fn(x):
            return relu(linear(x))

    if compiled:
        fn = _compile(fn)
    x = torch.randn(batch, in_features, dtype=dt, requires_grad=backward)
    if not backward:
        def run():
            with torch.no_grad():
                fn(x)
        return run
    grad = torch.randn(batch, out_features, dtype=dt)
    leaves = (x, linear.weight, linear.bias)

    def run():
        for t in leaves:
            t.grad = None
        fn(x).backward(grad)
    return run


def make_gemms(batch: int, in_features: int, out_features: int, dtype="float32") -> Callable[[], None]:
    """The three GEMMs of a Linear forward+backward alone (x W^T, g W, g^T x): the floor that a
    fused Linear+ReLU forward+backward can approach."""
    dt = _dtype(dtype)
    torch.manual_seed(0)
    x = torch.randn(batch, in_features, dtype=dt)
    w = torch.randn(out_features, in_features, dtype=dt)
    g = torch.randn(batch, out_features, dtype=dt)
    wt, gt = w.t(), g.t()

    def run():
        torch.mm(x, wt)
        torch.mm(g, w)
        torch.mm(gt, x)
    return run


def make_step_gemms(batch: int, dtype="float32") -> Callable[[], None]:
    """The eight GEMMs of one 784-128-64-10 train step alone (forward of each layer, weight grad of
    each layer, input grad of layers 2 and 3): what no per-op fusion removes from a train step."""
    dt = _dtype(dtype)
    torch.manual_seed(0)
    acts = [torch.randn(batch, f, dtype=dt) for f in LESSON_SIZES]
    weights = [torch.randn(o, i, dtype=dt) for i, o in zip(LESSON_SIZES[:-1], LESSON_SIZES[1:])]

    def run():
        for k, w in enumerate(weights):
            torch.mm(acts[k], w.t())  # forward
            torch.mm(acts[k + 1].t(), acts[k])  # weight grad
            if k > 0:
                torch.mm(acts[k + 1], w)  # input grad
    return run


def make_cross_entropy(impl: str, batch: int, classes: int, dtype="float32",
                       backward: bool = True) -> Callable[[], None]:
    """Cross-entropy of (batch, classes) logits with class-index targets, reduction 'mean'.
    ours: mnist_fast.CrossEntropyLoss; stock: nn.CrossEntropyLoss; stock_nll: LogSoftmax+NLLLoss.
    backward=True includes loss.backward() (the autograd engine) as a training step does."""
    kind, compiled = _split_impl(impl)
    dt = _dtype(dtype)
    torch.manual_seed(0)
    if kind == "ours":
        fn = CrossEntropyLoss()
    elif impl == "stock_nll":
        log_softmax, nll = nn.LogSoftmax(dim=1), nn.NLLLoss()

        def fn(logits, target):
            return nll(log_softmax(logits), target)
    else:
        fn = nn.CrossEntropyLoss()
    if compiled:
        fn = _compile(fn)
    logits = torch.randn(batch, classes, dtype=dt, requires_grad=backward)
    target = torch.randint(0, classes, (batch,))
    if not backward:
        def run():
            with torch.no_grad():
                fn(logits, target)
        return run

    def run():
        logits.grad = None
        fn(logits, target).backward()
    return run


def _train_parts(kind: str, dtype):
    """(model, loss_fn) of one implementation; one seed gives both the same initial weights."""
    torch.manual_seed(0)
    if kind == "ours":
        return MNISTNet().to(dtype), CrossEntropyLoss()
    return nn.Sequential(nn.Flatten(), *stock_mlp()).to(dtype), nn.CrossEntropyLoss()


def _step_fn(impl: str, dtype, lr: float = 0.01, momentum: float = 0.9):
    if impl == "fused_step":  # the whole step as one op: mnist_fast.FusedTrainer
        model, _ = _train_parts("ours", dtype)
        trainer = FusedTrainer(model, lr=lr, momentum=momentum)
        return trainer.step
    kind, compiled = _split_impl(impl)
    model, loss_fn = _train_parts(kind, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def forward_loss(x, y):
        return loss_fn(model(x), y)

    if compiled:
        forward_loss = _compile(forward_loss)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        forward_loss(x, y).backward()
        opt.step()
    return step


def make_train_step(impl: str, batch: int, dtype="float32") -> Callable[[], None]:
    """One SGD (momentum 0.9) step of the 784-128-64-10 MNIST network on a (batch, 1, 28, 28)
    batch: zero_grad, forward, cross-entropy, backward, optimizer step. ours: MNISTNet with
    mnist_fast.CrossEntropyLoss; stock: nn.Sequential(Flatten, Linear, ReLU, ...) with
    nn.CrossEntropyLoss. Under *_compiled, model+loss are compiled; backward and step stay eager."""
    dt = _dtype(dtype)
    step = _step_fn(impl, dt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(dt)
    y = torch.randint(0, 10, (batch,), generator=g)
    return lambda: step(x, y)


_SYNTHETIC: Dict[int, tuple] = {}


def synthetic_mnist(samples: int = 60000):
    """(images uint8 (samples, 28, 28), labels int64 (samples,)), deterministic, cached."""
    if samples not in _SYNTHETIC:
        g = torch.Generator().manual_seed(2)
        _SYNTHETIC.clear()
        _SYNTHETIC[samples] = (torch.randint(0, 256, (samples, 28, 28), dtype=torch.uint8, generator=g),
                               torch.randint(0, 10, (samples,), generator=g))
    return _SYNTHETIC[samples]


def make_epoch(impl: str, samples: int = 60000, batch: int = 64, dtype="float32") -> Callable[[], None]:
    """One epoch of train steps over `samples` synthetic MNIST-shaped samples held as one
    normalized float tensor (already shuffled: batches are consecutive slices, no DataLoader).
    impl "fused_step" trains with mnist_fast.FusedTrainer."""
    dt = _dtype(dtype)
    images, labels = synthetic_mnist(samples)
    x = normalize(images).unsqueeze(1).to(dt)
    step = _step_fn(impl, dt)

    def run():
        for i in range(0, samples, batch):
            step(x[i:i + batch], labels[i:i + batch])
    return run


def make_pipeline_epoch(impl: str, samples: int = 60000, batch: int = 64) -> Callable[[], None]:
    """The lesson's pipeline, for reference: mnist_fast.lesson_loader.LessonBatches (DataLoader(shuffle=True)
    over a torchvision-style dataset with ToTensor() + Normalize((0.5,), (0.5,))), one train step per
    batch. Needs torchvision."""
    images, labels = synthetic_mnist(samples)
    loader = LessonBatches(Split(normalize(images).unsqueeze(1), labels), batch)
    step = _step_fn(impl, torch.float32)

    def run():
        for x, y in loader:
            step(x, y)
    return run


# ----------------------------------------------------------------------------------------------
# Memory of a train step.
# ----------------------------------------------------------------------------------------------


def saved_activation_bytes(impl: str, batch: int, dtype="float32") -> Dict[str, int]:
    """Bytes that autograd keeps for backward during one forward of the train step (model and
    loss), counted with torch.autograd.graph.saved_tensors_hooks, each storage once.
    'activations' leaves out the parameters (they live anyway); 'total' includes them."""
    kind, _ = _split_impl(impl)
    dt = _dtype(dtype)
    model, loss_fn = _train_parts(kind, dt)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    x = torch.randn(batch, 1, 28, 28).to(dt)
    y = torch.randint(0, 10, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    activations = sum(n for p, n in storages.items() if p not in params)
    return {"activations": activations, "total": sum(storages.values())}


def peak_step_bytes(impl: str, batch: int, dtype="float32") -> int:
    """Peak bytes allocated by the CPU allocator during forward, loss and backward of one train
    step, starting as zero_grad(set_to_none=True) leaves it (so the new .grad buffers count, the
    same for both), from torch.profiler's memory events. The optimizer step is left out: it is
    the same code for both."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop chatter
    from torch.profiler import ProfilerActivity, profile

    kind, _ = _split_impl(impl)
    dt = _dtype(dtype)
    model, loss_fn = _train_parts(kind, dt)
    x = torch.randn(batch, 1, 28, 28).to(dt)
    y = torch.randint(0, 10, (batch,))
    loss_fn(model(x), y).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_fn(model(x), y).backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
