import os
import tempfile

# A fresh inductor cache per run: the FX graph cache does not key on our ops' fake kernels, so a
# cache written by an older build of mnist_fast (another saved-stats shape) would replay stale graphs.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mnist_fast_inductor_"))

import pytest
import torch

import mnist_fast  # noqa: F401  (loads the ops)

from helpers import DEVICES, write_banded_dataset


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not mnist_fast.cuda_compiled():
        pytest.fail("a CUDA device is present but this build of mnist_fast has no CUDA kernels")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def flush_denormal():
    """torch.set_flush_denormal for the test (skipped where the CPU has no such mode), off after."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    yield torch.set_flush_denormal
    torch.set_flush_denormal(False)


# ---- the training script (test_train.py, test_cli_*.py) ----

@pytest.fixture
def data_dir(tmp_path):
    return write_banded_dataset(tmp_path / "mnist")


@pytest.fixture
def run(data_dir):
    """run(*options) -> exit status of mnist_fast.train.main() on the small data set."""
    from mnist_fast.train import main

    def run_main(*options):
        return main(["--data-dir", str(data_dir), "--no-download", "--batch-size", "32", *options])
    return run_main
