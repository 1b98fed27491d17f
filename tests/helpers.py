"""What the tests share: devices, tolerances, the stock reference MLP and parity asserts.

Imported as a module (`from helpers import TOL`), not through conftest. Also importable by the
scripts that run tests' cases in a child process (bad_input_cases.py) and on a GPU machine.
"""
import pytest
import torch

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

