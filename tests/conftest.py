import pytest
import torch

import mnist_fast  # noqa: F401  (loads the ops)

CUDA = torch.cuda.is_available()

# Every correctness test runs on each device; CUDA cases are skipped, visibly, without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not mnist_fast.cuda_compiled():
        pytest.fail("a CUDA device is present but this build of mnist_fast has no CUDA kernels")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


LOW_PRECISION = (torch.bfloat16, torch.float16)


# Tolerances for parity with stock PyTorch: bfloat16/float16 round at every step on both sides.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
