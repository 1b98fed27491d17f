"""mnist_fast.functional.linear_relu against torch.relu(F.linear(...)): gradcheck, parity, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from mnist_fast import functional as MF
from helpers import LOW_PRECISION, TOL

op = torch.ops.mnist_fast


def stock(x, w, b=None):
    return torch.relu(F.linear(x, w, b))


def make(shape, out_features, dtype, device, bias=True, requires_grad=True):
    if dtype in LOW_PRECISION:
        # Small multiples of 1/2: every product and sum is exact in bfloat16/float16, so the fused
        # and stock results (ReLU masks included) must agree although they round at other steps.
        def rand(*size):
            return torch.randint(-2, 3, size, device=device).to(dtype) / 2
    else:
        def rand(*size):
            return torch.randn(*size, dtype=dtype, device=device)
    x = rand(*shape)
    w = rand(out_features, shape[-1]) / (1 if dtype in LOW_PRECISION else shape[-1] ** 0.5)
    b = rand(out_features) if bias else None
    tensors = [t for t in (x, w, b) if t is not None]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, w, b


@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 3, 7), (1, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, shape, bias):
    x, w, b = make(shape, 4, torch.float64, device, bias)
    args = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(MF.linear_relu, args)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_gradcheck_partial_requires_grad(device, needs):
    x, w, b = make((6, 5), 3, torch.float64, device, requires_grad=False)
    for t, n in zip((x, w, b), needs):
        t.requires_grad_(n)
    assert torch.autograd.gradcheck(MF.linear_relu, (x, w, b))


def check_parity(x, w, b, dtype):
    """Forward and all gradients of the fused op equal the stock composition."""
    leaves = [t for t in (x, w, b) if t is not None]
    ours = MF.linear_relu(x, w, b)
    ref = stock(x, w, b)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    g = torch.randint_like(ref, -2, 3) if dtype in LOW_PRECISION else torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(ours, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, r, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(64, 784), (1, 128), (0, 64), (3, 4, 33), (130,)])
def test_parity(device, dtype, shape):
    x, w, b = make(shape, 65, dtype, device)
    check_parity(x, w, b, dtype)


def test_parity_without_bias(device):
    x, w, _ = make((16, 20), 9, torch.float32, device, bias=False)
    check_parity(x, w, None, torch.float32)


def test_non_contiguous_input_and_weight(device):
    base = torch.randn(40, 30, device=device)
    x = base.t()[:, ::2].requires_grad_()  # (30, 20), non-contiguous
    w = torch.randn(20, 16, device=device).t().requires_grad_()  # (16, 20), transposed
    b = torch.randn(32, device=device)[::2].requires_grad_()  # stride 2
    assert not x.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    check_parity(x, w, b, torch.float32)


def test_stride_zero_grad_from_sum(device):
    # out.sum().backward() hands backward an expanded grad with stride 0 (this crashed apex).
    x, w, b = make((8, 12), 6, torch.float32, device)
    MF.linear_relu(x, w, b).sum().backward()
    ours = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    stock(x, w, b).sum().backward()
    for a, t in zip(ours, (x, w, b)):
        torch.testing.assert_close(a, t.grad)


def test_backward_op_with_stride_zero_grad(device):
    x, w, b = make((4, 3), 5, torch.float32, device, requires_grad=False)
    y = op.linear_relu(x, w, b)
    g = torch.ones(1, 1, device=device).expand(4, 5)
    assert g.stride() == (0, 0)
    gx, gw, gb = op._linear_relu_backward(g, x, w, y, [True, True, True])
    mask = (y > 0).float()
    torch.testing.assert_close(gx, mask @ w)
    torch.testing.assert_close(gw, mask.t() @ x)
    torch.testing.assert_close(gb, mask.sum(0))


def test_backward_op_skips_unrequested_grads(device):
    x, w, b = make((4, 3), 5, torch.float32, device, requires_grad=False)
    y = op.linear_relu(x, w, b)
    gx, gw, gb = op._linear_relu_backward(torch.ones_like(y), x, w, y, [False, True, False])
    assert gx is None and gb is None and gw.shape == w.shape


def test_nan_and_inf_like_stock(device):
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), -1.0], [-float("inf"), 2.0]], device=device)
    w = torch.eye(2, device=device)
    b = torch.zeros(2, device=device)
    torch.testing.assert_close(MF.linear_relu(x, w, b), stock(x, w, b), equal_nan=True)


def test_results_do_not_depend_on_thread_count():
    x, w, b = make((512, 300), 200, torch.float32, "cpu")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = MF.linear_relu(x, w, b)
            results.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))
    finally:
        torch.set_num_threads(threads)
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)  # GEMM blocking may differ by a rounding


def test_opcheck(device):
    x, w, b = make((6, 5), 3, torch.float32, device)
    opcheck(op.linear_relu.default, (x, w, b))
    opcheck(op.linear_relu.default, (x, w, None))
    y = op.linear_relu(x.detach(), w.detach(), b.detach())
    opcheck(op._linear_relu_backward.default, (torch.randn_like(y), x.detach(), w.detach(), y, [True, True, True]))


def test_double_backward_raises_clearly(device):
    x, w, b = make((3, 4), 2, torch.float64, device)
    with pytest.raises(RuntimeError, match="double backward of linear_relu is not supported"):
        torch.autograd.gradgradcheck(MF.linear_relu, (x, w, b))


# ---- bad input: the cases are in bad_input_cases.py (one table, run by test_bad_inputs.py) ----

def test_mixed_devices_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to mix devices")
    with pytest.raises(RuntimeError, match="same device"):
        MF.linear_relu(torch.randn(3, 5), torch.randn(4, 5, device="cuda"))


def test_backward_node_checks_its_saved_output():
    """linear_relu saves its own output for backward (the ReLU mask): changing it in place
    afterwards is caught, as for torch.relu; retain_graph keeps it for a second backward."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = MF.linear_relu(x, w, None)
    assert out.grad_fn.name() == "LinearReLUBackward"
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    torch.testing.assert_close(w.grad, 2 * torch.autograd.grad(torch.relu(x @ w.t()).sum(), w)[0])
    out = MF.linear_relu(x, w, None)
    with torch.no_grad():
        out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
