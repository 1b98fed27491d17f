"""Every CPU kernel against stock PyTorch under the capability in use (run by test_cpu_capability.py
in a child process with ATEN_CPU_CAPABILITY set): python tests/cpu_capability_parity.py EXPECTED, with the
mnist_fast to test importable (the test passes its own on PYTHONPATH; in the checkout: PYTHONPATH=.).

Exits non-zero, naming the first mismatch, if a result differs or the kernels in use are not EXPECTED.
"""
import copy
import itertools
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # helpers
from helpers import STEP_TOL, TOL, adam_update_mismatches, sgd_update_mismatches  # noqa: E402
import mnist_fast  # noqa: E402
from mnist_fast import _C, functional as MF  # noqa: E402
from mnist_fast.nn import fuse  # noqa: E402
from mnist_fast.trainer import FusedTrainer  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# Short rows (one per vector lane) up to 32 classes, long rows (along the row) beyond; row counts
# around the lane counts 4/8/16 and the 64-row blocks.
SHAPES = [(0, 10), (1, 1), (1, 10), (7, 3), (17, 10), (16, 16), (33, 31), (9, 32), (5, 33), (64, 10), (70, 10),
          (3, 1000), (2, 1001)]
OPTIONS = [dict(), dict(reduction="sum", label_smoothing=0.2), dict(reduction="none", weighted=True),
           dict(reduction="mean", weighted=True, label_smoothing=0.1, ignore=True),
           dict(reduction="none", ignore=True, label_smoothing=0.3), dict(probabilities=True, reduction="sum"),
           dict(probabilities=True, weighted=True, label_smoothing=0.1, reduction="none")]


def close(ours, ref, dtype, what):
    try:
        torch.testing.assert_close(ours, ref, **TOL[dtype], equal_nan=True)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def cross_entropy_cases():
    for dtype, (rows, classes), opt in itertools.product(DTYPES, SHAPES, OPTIONS):
        opt = dict(opt)
        what = f"cross_entropy {dtype} [{rows},{classes}] {opt}"
        x = (3 * torch.randn(rows, classes)).to(dtype).requires_grad_()
        if opt.pop("probabilities", False):
            t = torch.softmax(torch.randn(rows, classes), 1).to(dtype).requires_grad_()
        else:
            t = torch.randint(0, classes, (rows,))
            if opt.pop("ignore", False):
                t[::3] = -100
        if opt.pop("weighted", False):
            opt["weight"] = (torch.rand(classes) + 0.5).to(dtype)
        ours, ref = MF.cross_entropy(x, t, **opt), F.cross_entropy(x, t, **opt)
        close(ours, ref, dtype, what + " loss")
        g = torch.rand_like(ref)
        inputs = (x, t) if t.requires_grad else (x,)
        for a, b, name in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g), "xt"):
            close(a, b, dtype, f"{what} grad {name}")


def linear_relu_cases():
    for dtype, (rows, fin, fout), bias, expanded in itertools.product(
            DTYPES, [(0, 5, 3), (1, 7, 9), (17, 33, 65), (64, 784, 128), (3, 4, 130)], [True, False], [False, True]):
        what = f"linear_relu {dtype} [{rows},{fin}->{fout}] bias={bias} expanded_grad={expanded}"
        x = torch.randn(rows, fin).to(dtype).requires_grad_()
        w = torch.randn(fout, fin).to(dtype).requires_grad_()
        b = torch.randn(fout).to(dtype).requires_grad_() if bias else None
        ours, ref = MF.linear_relu(x, w, b), torch.relu(F.linear(x, w, b))
        close(ours, ref, dtype, what)
        params = [p for p in (x, w, b) if p is not None]
        g = torch.ones(()).expand_as(ref) if expanded else torch.randn_like(ref)
        for a, c in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
            close(a, c, dtype, what + " grad")


def log_softmax_cases():
    """fused_mlp's final log-softmax, forward and backward: one layer from a single input feature,
    whose bias puts -inf in the first class of every row, and a NaN row."""
    for dtype, (rows, features) in itertools.product(DTYPES, SHAPES):
        what = f"fused_mlp log_softmax {dtype} [{rows},{features}]"
        x = torch.randn(rows, 1).to(dtype)
        if rows > 2:
            x[2] = float("nan")
        w, b = (torch.randn(features, 1) * 8).to(dtype), torch.randn(features).to(dtype)
        if features > 1:
            b[0] = float("-inf")
        for t in (x, w, b):
            t.requires_grad_()
        ours, ref = MF.fused_mlp(x, [w], [b], log_softmax=True), F.log_softmax(F.linear(x, w, b), dim=1)
        close(ours, ref, dtype, what)
        g = torch.randn_like(ref)
        # (the grads of w and b: x's, a sum over the classes of terms that sum to about 0, would
        # mostly measure the cancellation)
        for a, c in zip(torch.autograd.grad(ours, (w, b), g), torch.autograd.grad(ref, (w, b), g)):
            close(a, c, dtype, what + " grad")


def train_step_cases():
    configs = [dict(lr=0.05), dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
               dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.9, dampening=0.3)]
    for dtype, config, smoothing in itertools.product([torch.float64, torch.float32], configs, [0.0, 0.1]):
        what = f"train step {dtype} {config} label_smoothing={smoothing}"
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 10)).to(dtype)
        model = fuse(copy.deepcopy(ref))
        opt = torch.optim.SGD(ref.parameters(), **config)
        trainer = FusedTrainer(model, label_smoothing=smoothing, **config)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
        for n in (16, 7, 16):
            x, y = torch.randn(n, 20, dtype=dtype), torch.randint(0, 10, (n,))
            y[::5] = -100
            loss = loss_fn(ref(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ours, _ = trainer.step(x, y)
            tol = STEP_TOL[dtype]
            torch.testing.assert_close(ours, loss.detach(), **tol, msg=lambda m: f"{what} loss: {m}")
        for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} {k}: {m}")


def sgd_update_cases():
    # bit for bit as torch.optim.SGD, denormal momentum buffers included (test_sgd_update.py)
    for sizes, rows, config in [((40, 32, 10), 16, dict(momentum=0.9)), ((37, 19, 5), 7, dict(momentum=0.5, lr=0.1)),
                                ((37, 19, 5), 7, dict(momentum=0.9, dampening=0.3, weight_decay=1e-3)),
                                ((37, 19, 5), 7, dict(momentum=0.5, nesterov=True, cancel=True)),
                                ((37, 19, 5), 7, dict(momentum=0.9, nesterov=True, first_step=True)),
                                ((37, 19, 5), 7, dict(momentum=0.0, weight_decay=1e-2))]:
        mismatches = sgd_update_mismatches(sizes, rows, **config)
        assert not mismatches, f"sgd update {sizes} {config}: the bits of {mismatches} differ from torch.optim.SGD's"
    for optimizer, config in [("adam", dict(lr=1e-3)), ("adam", dict(lr=1e-3, betas=(0.5, 0.9))),
                              ("adam", dict(lr=1e-2, weight_decay=1e-2)), ("adamw", dict(lr=1e-2))]:
        for dtype in (torch.float32, torch.float64):
            mismatches = adam_update_mismatches(optimizer, config, dtype=dtype, shape=(4099,))
            assert not mismatches, f"{optimizer} update {config} {dtype}: {mismatches} differ from torch.optim's"


def pixel_epoch_cases():
    # uint8 images through their pixel map (the vector gathers of map_bytes): the epoch of the mapped images
    for dtype, features in itertools.product([torch.float32, torch.float64], [20, 37]):
        g = torch.Generator().manual_seed(1)
        pixels = torch.randint(0, 256, (50, features), generator=g, dtype=torch.uint8)
        labels, table = torch.randint(0, 10, (50,), generator=g), torch.randn(256, generator=g, dtype=dtype)
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 10)).to(dtype)
        model = copy.deepcopy(ref)
        order = torch.randperm(50, generator=g)
        expected, _ = FusedTrainer(ref, lr=0.1, momentum=0.9).fit_epoch(table[pixels.long()], labels, 16, order=order)
        ours, _ = FusedTrainer(model, lr=0.1, momentum=0.9).fit_epoch(pixels, labels, 16, order=order,
                                                                       pixel_values=table)
        assert torch.equal(ours, expected), f"uint8 epoch {dtype} {features} features: losses differ"
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters())), \
            f"uint8 epoch {dtype} {features} features: parameters differ"


def main(expected):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    in_use = _C.cpu_capability()
    assert in_use == expected, f"kernels in use: {in_use}, expected {expected}"
    cross_entropy_cases()
    linear_relu_cases()
    log_softmax_cases()
    train_step_cases()
    sgd_update_cases()
    pixel_epoch_cases()
    print(f"cpu kernels '{in_use}': cross_entropy, linear_relu, log_softmax, train step, SGD update and uint8 epoch match stock")


if __name__ == "__main__":
    main(sys.argv[1])
