"""Property-based tests (hypothesis): every op against a float64 PyTorch reference over random
shapes (0, 1, odd sizes, sizes that are not multiples of the vector width), memory layouts
(transposed, sliced, stride 0), every option, and extreme values (huge logits, -inf, NaN).

Runs derandomized by default so CI is reproducible; HYPOTHESIS_PROFILE=explore searches further.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_fast import functional as MF
from helpers import DEVICES, EXACT_TOL as TOL

settings.register_profile("default", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

LAYOUTS = ["contiguous", "transposed", "sliced", "stride0"]


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same 2-d values in another memory layout."""
    rows, cols = values.shape
    if layout == "transposed":
        return values.t().contiguous().t()
    if layout == "sliced":
        wide = torch.zeros(rows, 2 * cols + 1, dtype=values.dtype)
        wide[:, 1::2] = values
        return wide[:, 1::2]
    if layout == "stride0" and rows > 0:
        return values[:1].expand(rows, cols)
    return values.contiguous()


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def linear_cases(draw):
    rows = draw(st.integers(0, 9))
    in_f = draw(st.integers(1, 37))
    out_f = draw(st.integers(1, 37))
    return dict(rows=rows, in_f=in_f, out_f=out_f, bias=draw(st.booleans()),
                x_layout=draw(st.sampled_from(LAYOUTS)), w_layout=draw(st.sampled_from(LAYOUTS[:3])),
                grad_layout=draw(st.sampled_from(LAYOUTS)), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e3])), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("device", DEVICES)
@given(case=linear_cases())
def test_linear_relu_matches_float64_reference(device, case):
    g = seeded(case["seed"])
    dtype = case["dtype"]
    x = laid_out(torch.randn(case["rows"], case["in_f"], generator=g, dtype=dtype) * case["scale"], case["x_layout"])
    w = laid_out(torch.randn(case["out_f"], case["in_f"], generator=g, dtype=dtype), case["w_layout"])
    b = torch.randn(case["out_f"], generator=g, dtype=dtype) if case["bias"] else None
    x, w, b = (t.to(device) if t is not None else None for t in (x, w, b))
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y = MF.linear_relu(x, w, b)
    ref = torch.relu(F.linear(*exact_leaves)) if b is not None else torch.relu(F.linear(*exact_leaves))
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    grad = laid_out(torch.randn(ref.shape, generator=g, dtype=dtype), case["grad_layout"]).to(device)
    for ours, exact in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(ref, exact_leaves, grad.double())):
        # GEMM results are compared relative to their size (sums of in_f or rows products).
        torch.testing.assert_close(ours.double(), exact, rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * max(1.0, exact.abs().max().item() if exact.numel() else 1))


EXTREMES = ["none", "huge", "neg_inf", "nan"]


@st.composite
def cross_entropy_cases(draw):
    return dict(rows=draw(st.integers(0, 9)), classes=draw(st.integers(1, 40)),
                probabilities=draw(st.booleans()), weighted=draw(st.booleans()),
                reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                smoothing=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])), ignore=draw(st.booleans()),
                layout=draw(st.sampled_from(LAYOUTS)), extreme=draw(st.sampled_from(EXTREMES)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("device", DEVICES)
@given(case=cross_entropy_cases())
def test_cross_entropy_matches_float64_reference(device, case):
    g = seeded(case["seed"])
    rows, classes, dtype = case["rows"], case["classes"], case["dtype"]
    x = 4 * torch.randn(rows, classes, generator=g, dtype=dtype)
    if rows and case["extreme"] == "huge":
        x[0] = x[0] * 1000 + 2e3
    elif rows and case["extreme"] == "neg_inf":
        x[0, 0] = -float("inf")
    elif rows and case["extreme"] == "nan":
        x[-1, -1] = float("nan")
    x = laid_out(x, case["layout"]).to(device).requires_grad_()
    if case["probabilities"]:
        t = torch.softmax(torch.randn(rows, classes, generator=g, dtype=dtype), dim=1)
    else:
        t = torch.randint(0, classes, (rows,), generator=g)
        if case["ignore"] and rows:
            t[::2] = -100
    w = torch.rand(classes, generator=g, dtype=dtype) + 0.1 if case["weighted"] else None
    t, w = t.to(device), w.to(device) if w is not None else None
    kw = dict(weight=w, reduction=case["reduction"], label_smoothing=case["smoothing"])

    loss = MF.cross_entropy(x, t, **kw)
    xd = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xd, t.double() if case["probabilities"] else t,
                          **{**kw, "weight": w.double() if w is not None else None})
    torch.testing.assert_close(loss.double(), ref, **TOL[dtype], equal_nan=True)
    grad_out = torch.rand(ref.shape, generator=g, dtype=torch.float64)
    ours, = torch.autograd.grad(loss, x, grad_out.to(device, dtype))
    exact, = torch.autograd.grad(ref, xd, grad_out)
    torch.testing.assert_close(ours.double(), exact, **TOL[dtype], equal_nan=True)
