"""What the tests share: devices, tolerances, the stock reference MLP, parity asserts and the
small data set of the training-script tests.

Imported as a module (`from helpers import TOL`), not through conftest. Also importable by the
scripts that run tests' cases in a child process (bad_input_cases.py) and on a GPU machine.
"""
import math

import pytest
import torch

from mnist_fast import data
from mnist_fast.models import stock_mlp  # noqa: F401  (the one stock reference of the lesson's MLP)

CUDA = torch.cuda.is_available()

# Every correctness test runs on each device; CUDA cases are skipped, visibly, without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")),
]

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Tolerances for parity with stock PyTorch in the same dtype: bfloat16/float16 round at every step
# on both sides.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
DTYPES = list(TOL)
# A whole training step (forward, loss, backward, update) against stock's: float32 rounds the same
# operations in another order (GEMM blocking, sums) and the parameters carry it from step to step.
STEP_TOL = {torch.float64: TOL[torch.float64], torch.float32: dict(rtol=1e-5, atol=1e-6)}
# Against an exact float64 reference over random (hypothesis) shapes and values: looser in float32,
# where a long row's sum rounds differently from the reference's.
EXACT_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def assert_close(actual, expected, dtype, what: str = ""):
    """Parity within TOL[dtype], NaN where stock has NaN."""
    torch.testing.assert_close(actual, expected, **TOL[dtype], equal_nan=True,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def assert_same_params(a, b, **tol):
    """Two models' state dicts: the same keys, and values within tol."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **tol, msg=lambda m: f"{k}: {m}")


def lesson_sequential(log_softmax=False):
    """The lesson's model, as its code writes it (MNISTNet's state_dict loads into it, and back)."""
    layers = [torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
              torch.nn.Linear(64, 10)]
    return torch.nn.Sequential(*layers, *([torch.nn.LogSoftmax(dim=1)] if log_softmax else []))


def child_env(**extra) -> dict:
    """os.environ plus extra, for a child Python process that is to import the mnist_fast this process
    imported: the checkout with its in-place build, or the installed copy (after `pip install .`), never
    the source folder beside it. The folder holding that package goes first on PYTHONPATH, unless it is
    a site-packages folder, which the child finds anyway. A child started with -m or -c puts its working
    folder ahead of PYTHONPATH: start those outside the checkout (cwd=tmp_path)."""
    import os
    import site

    import mnist_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(mnist_fast.__file__)))
    env = dict(os.environ, **extra)
    site_dirs = {os.path.realpath(d) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if os.path.realpath(root) not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def tests_the_checkout() -> bool:
    """Whether the mnist_fast under test is this checkout's (its in-place build), not an installed copy.
    The checkout's tools (benchmarks/report.py --capability, scripts/gpu_check.sh) run the checkout's."""
    import pathlib

    import mnist_fast

    return pathlib.Path(mnist_fast.__file__).resolve().parents[1] == pathlib.Path(__file__).resolve().parents[1]


def write_banded_dataset(folder, n_train=320, n_test=80, seed=0):
    """A small learnable MNIST-format data set in folder (class k = a bright band at row 2k + 4), on
    which a training run takes well under a second."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 96, (n, 28, 28), generator=g)
        rows = 2 * labels + 4
        images[torch.arange(n), rows] = 255
        images[torch.arange(n), rows + 1] = 255
        images_name, labels_name = data.FILES[split]
        data.write_idx(folder / images_name, images.to(torch.uint8))
        data.write_idx(folder / labels_name, labels.to(torch.uint8))
    return folder


def assert_resume_refused(run, checkpoint, capsys, change, message):
    """Resuming a 2-epoch run's checkpoint with the options `change` fails cleanly: exit status 1,
    `message` and no traceback on stderr, the checkpoint left as it was. run: the `run` fixture."""
    assert run("--epochs", "2", "--checkpoint", str(checkpoint)) == 0
    before = checkpoint.read_bytes()
    capsys.readouterr()
    assert run("--epochs", "2", *change, "--checkpoint", str(checkpoint), "--resume") == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert checkpoint.read_bytes() == before


def sgd_update_mismatches(sizes, rows, momentum, dampening=0.0, weight_decay=0.0, lr=0.01, nesterov=False,
                          first_step=False, cancel=False, seed=0):
    """train_step_sgd's update against torch.optim.SGD's (foreach=False), given the step's own
    gradients (the train_step_grads op), from momentum buffers that are partly denormal (a mix of
    small magnitudes, where k * momentum rounds to a tie, and random ones; none on a first step,
    where both start from the gradient) and three dead units in the first layer (gradients exactly
    0): the names of the float32 parameters and buffers whose bits differ (none when the update
    rounds as stock's does). cancel (momentum 0.5, no dampening or decay): a tenth of the buffers
    are -2 * their gradient, so that the new buffer is exactly 0 beside a large gradient."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params += [torch.randn(fan_out, fan_in, generator=gen) * fan_in ** -0.5, torch.randn(fan_out, generator=gen) * 0.1]
    # dead units: relu(-1 + a tiny dot product) = 0 on every row; their weights span 2^-140..2^-40,
    # both sides of the smallest magnitude the exact shortcut leaves unchanged (2^-60)
    scale = torch.pow(2.0, -torch.randint(40, 141, (3, sizes[0]), generator=gen).double()).float()
    params[0][:3], params[1][:3] = torch.randn(3, sizes[0], generator=gen) * scale, -1.0
    x, t = torch.randn(rows, sizes[0], generator=gen), torch.randint(0, sizes[-1], (rows,), generator=gen)
    buffers = []
    for p in params:
        magnitude = torch.randint(1, 2 ** 23, p.shape, generator=gen, dtype=torch.int32)
        magnitude[torch.rand(p.shape, generator=gen) < 0.2] = 3  # 3 * 0.5 = 1.5: a tie
        sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, 0, -2 ** 31).to(torch.int32)
        denormal = (magnitude | sign).view(torch.float32)
        buffers.append(torch.where(torch.rand(p.shape, generator=gen) < 0.4, denormal,
                                   torch.randn(p.shape, generator=gen) * 0.01))
    ops = torch.ops.mnist_fast
    workspace = ops.train_step_workspace(x, params)
    ops.train_step_grads(x, t, params, workspace, -100, 0.0)
    if cancel:
        assert momentum == 0.5 and dampening == 0 and weight_decay == 0
        for b, g in zip(buffers, workspace[-len(params):]):
            b.copy_(torch.where(torch.rand(b.shape, generator=gen) < 0.1, -2 * g, b))
    stock = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(stock, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                          nesterov=nesterov, foreach=False)
    for p, g, b in zip(stock, workspace[-len(params):], buffers):
        p.grad = g.clone()
        if momentum and not first_step:
            opt.state[p]["momentum_buffer"] = b.clone()
    opt.step()
    ours, our_buffers = [p.clone() for p in params], [b.clone() for b in buffers] if momentum else []
    ops.train_step_sgd(x, t, ours, our_buffers, ops.train_step_workspace(x, ours), lr, momentum, dampening,
                       weight_decay, nesterov, first_step, -100, 0.0)
    names = [f"{'W' if k % 2 == 0 else 'b'}{k // 2}" for k in range(len(params))]
    mismatches = []
    for name, a, b in zip(names, ours, stock):
        if not torch.equal(a.view(torch.int32), b.detach().view(torch.int32)):
            mismatches.append(name)
    for name, a, p in zip(names, our_buffers, stock):
        if not torch.equal(a.view(torch.int32), opt.state[p]["momentum_buffer"].view(torch.int32)):
            mismatches.append(name + " buffer")
    return mismatches


def adam_update_mismatches(optimizer, config, dtype=torch.float32, shape=(37, 111), steps=4, seed=0):
    """The adam_update op against torch.optim.Adam / AdamW (foreach=False) on the same gradients,
    from a state that has run 3 steps and is partly denormal: a third of the elements belong to
    dead units (gradient exactly 0 on every step) whose exp_avg is denormal (random magnitudes and
    odd ones, which a lerp weight of 1/2 turns into exact ties) or tiny, with exp_avg_sq denormal,
    tiny, 0 or inf and parameters spanning 2^-140..2^-20 (both sides of the smallest one the exact
    shortcut leaves unchanged, 2^-40); a tenth of the dead units get gradients again. Returns the names of the tensors whose bits differ after
    each step ('step 4: param'), none when the update rounds as stock's does."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(low, high, size):
        return low + (high - low) * torch.rand(size, generator=gen)

    n = math.prod(shape)
    dead = torch.rand(n, generator=gen) < 1 / 3
    param = torch.randn(n, generator=gen)
    param = torch.where(dead, param * torch.pow(2.0, -torch.randint(20, 141, (n,), generator=gen).double()).float(), param)
    magnitude = torch.randint(1, 2 ** 23, (n,), generator=gen, dtype=torch.int32)
    magnitude[torch.rand(n, generator=gen) < 0.3] = 2 * torch.randint(0, 50, (1,), generator=gen).item() + 1
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, 0, -2 ** 31).to(torch.int32)
    denormal = (magnitude | sign).view(torch.float32)
    exp_avg = torch.where(torch.rand(n, generator=gen) < 0.7, denormal, torch.randn(n, generator=gen) * 2.0 ** -110)
    exp_avg = torch.where(dead, exp_avg, torch.randn(n, generator=gen) * 1e-2)
    choice = torch.rand(n, generator=gen)
    exp_avg_sq = torch.where(choice < 0.4, torch.randint(1, 2 ** 23, (n,), generator=gen, dtype=torch.int32)
                             .view(torch.float32), uniform(0, 1e-6, n))
    exp_avg_sq = torch.where((choice > 0.9) & (choice < 0.95), torch.zeros(n), exp_avg_sq)
    exp_avg_sq = torch.where(choice >= 0.95, torch.full((n,), math.inf), exp_avg_sq)
    exp_avg_sq = torch.where(dead, exp_avg_sq, uniform(0, 1e-4, n))
    state = [t.reshape(shape).to(dtype) for t in (param, exp_avg, exp_avg_sq)]
    param, exp_avg, exp_avg_sq = state

    ref = param.clone().requires_grad_()
    stock = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]([ref], foreach=False, **config)
    stock.state[ref] = {"step": torch.tensor(3.0), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    group = stock.param_groups[0]
    mismatches = []
    revived = dead & (torch.rand(n, generator=gen) < 0.1)  # tiny moments, and a gradient again
    for step in range(4, 4 + steps):
        grad = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < 0.8) * (~dead | revived)
        grad = grad.reshape(shape).to(dtype)
        ref.grad = grad.clone()
        stock.step()
        torch.ops.mnist_fast.adam_update([param], [grad], [exp_avg], [exp_avg_sq], step, group["lr"], *group["betas"],
                                         group["eps"], group["weight_decay"], optimizer == "adamw")
        bits = torch.int32 if dtype == torch.float32 else torch.int64
        for name, ours, theirs in (("param", param, ref.detach()), ("exp_avg", exp_avg, stock.state[ref]["exp_avg"]),
                                   ("exp_avg_sq", exp_avg_sq, stock.state[ref]["exp_avg_sq"])):
            if not torch.equal(ours.view(bits), theirs.view(bits)):
                mismatches.append(f"step {step}: {name}")
    return mismatches
