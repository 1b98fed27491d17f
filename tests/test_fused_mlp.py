"""mnist_fast.functional.fused_mlp (a whole MLP as one op) against plain PyTorch: float64
reference, gradcheck, opcheck, torch.compile, the autograd node and what it saves, bad input."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from mnist_fast import functional as MF
from helpers import LOW_PRECISION, TOL

op = torch.ops.mnist_fast


def reference(x, weights, biases, log_softmax=False):
    """The stock composition: Linear, ReLU, ..., Linear (, log_softmax over the features)."""
    for k, (w, b) in enumerate(zip(weights, biases)):
        x = F.linear(x, w, b)
        if k + 1 < len(weights):
            x = torch.relu(x)
    return F.log_softmax(x, dim=-1) if log_softmax else x


def make(sizes, dtype=torch.float64, device="cpu", bias=True, batch=(6,), requires_grad=True):
    """Input (*batch, sizes[0]) and layers sizes[l] -> sizes[l+1]; bias: bool or one bool per layer."""
    has_bias = [bias] * (len(sizes) - 1) if isinstance(bias, bool) else list(bias)
    if dtype in LOW_PRECISION:
        # Small multiples of 1/2 with small weights: exact products and sums in bfloat16/float16.
        def rand(*shape, scale=1.0):
            return (torch.randint(-2, 3, shape, device=device).to(dtype) / 2) * scale
    else:
        def rand(*shape, scale=1.0):
            return torch.randn(*shape, dtype=dtype, device=device) * scale
    x = rand(*batch, sizes[0])
    weights = [rand(o, i, scale=1.0 if dtype in LOW_PRECISION else max(i, 1) ** -0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rand(o) if hb else None for o, hb in zip(sizes[1:], has_bias)]
    for t in [x, *weights, *[b for b in biases if b is not None]]:
        t.requires_grad_(requires_grad)
    return x, weights, biases


def leaves(x, weights, biases):
    return [x, *weights, *[b for b in biases if b is not None]]


def check_parity(x, weights, biases, log_softmax, dtype, grad=None):
    ours = MF.fused_mlp(x, weights, biases, log_softmax)
    ref = reference(x, weights, biases, log_softmax)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    if grad is None:
        grad = torch.randint_like(ref, -2, 3) if dtype in LOW_PRECISION else torch.randn_like(ref)
    inputs = [t for t in leaves(x, weights, biases) if t.requires_grad]
    for a, r in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, r, **TOL[dtype])


SIZES = [(7, 5), (7, 9, 5), (12, 8, 6, 4), (784, 128, 64, 10), (9, 40)]  # (9, 40): log_softmax along the row


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("log_softmax", [False, True])
def test_parity_float64(device, sizes, log_softmax):
    check_parity(*make(sizes, device=device), log_softmax, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log_softmax", [False, True])
def test_parity_other_dtypes(device, dtype, log_softmax):
    if dtype in LOW_PRECISION and log_softmax:
        # exp/log are not exact in bfloat16: compare with the stock op in the same dtype loosely.
        x, ws, bs = make((10, 8, 6), dtype=dtype, device=device)
        torch.testing.assert_close(MF.fused_mlp(x, ws, bs, True), reference(x, ws, bs, True), rtol=2e-2, atol=3e-2)
        return
    if dtype in LOW_PRECISION:  # small enough that every value is exact in bfloat16
        check_parity(*make((6, 4, 3), dtype=dtype, device=device, batch=(8,)), log_softmax, dtype)
    else:
        check_parity(*make((10, 8, 6, 4), dtype=dtype, device=device, batch=(33,)), log_softmax, dtype)


@pytest.mark.parametrize("bias", [(True, False, True), (False, False, False), (False, True, True)], ids=str)
@pytest.mark.parametrize("log_softmax", [False, True])
def test_gradcheck(device, bias, log_softmax):
    x, ws, bs = make((5, 4, 6, 3), device=device, bias=bias)
    assert torch.autograd.gradcheck(lambda x, *p: MF.fused_mlp(x, ws, bs, log_softmax), [x, *ws, *[b for b in bs if b is not None]])


def test_gradcheck_one_layer_and_leading_dims(device):
    x, ws, bs = make((4, 3), device=device, batch=(2, 3))
    assert torch.autograd.gradcheck(lambda *t: MF.fused_mlp(x, ws, bs, True), leaves(x, ws, bs))
    x, ws, bs = make((4, 5, 3), device=device, batch=())  # a single (in_features,) sample
    assert torch.autograd.gradcheck(lambda *t: MF.fused_mlp(x, ws, bs), leaves(x, ws, bs))


@pytest.mark.parametrize("which", ["input", "first weight", "last bias", "middle bias"])
def test_gradcheck_partial_requires_grad(device, which):
    x, ws, bs = make((5, 4, 6, 3), device=device, requires_grad=False)
    target = {"input": x, "first weight": ws[0], "last bias": bs[-1], "middle bias": bs[1]}[which]
    target.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: MF.fused_mlp(x, ws, bs, True), [target])


def test_backward_skips_layers_below_the_lowest_requested_gradient():
    x, ws, bs = make((5, 4, 6, 3), requires_grad=False)
    grad = torch.randn(6, 3, dtype=torch.float64)
    out, hidden = op.fused_mlp_forward(x, ws, bs, False)
    mask = [False, False, False, False, False, True, True]  # only the last layer's weight and bias
    gi, gw, gb = op._fused_mlp_backward(grad, x, ws, hidden, None, mask)
    assert gi is None and gw[:2] == [None, None] and gb[:2] == [None, None]
    torch.testing.assert_close(gw[2], grad.t() @ hidden[1])
    torch.testing.assert_close(gb[2], grad.sum(0))
    gi, gw, gb = op._fused_mlp_backward(grad, x, ws, hidden, None, [False] * 7)
    assert gi is None and gw == [None] * 3 and gb == [None] * 3


def test_one_graph_node_saving_only_what_backward_needs():
    x, ws, bs = make((8, 6, 5, 4), requires_grad=False)
    for t in [*ws, *bs]:
        t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = MF.fused_mlp(x, ws, bs, True)
    assert out.grad_fn.name() == "FusedMLPBackward"
    # The next nodes are the leaves themselves: the network is one node.
    assert all(type(f).__name__ == "AccumulateGrad" for f, _ in out.grad_fn.next_functions if f is not None)
    # input, 3 weights, 2 hidden ReLU outputs, the log-softmax output -- no pre-activations.
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(6, 8), (6, 8), (5, 6), (4, 5), (6, 6), (6, 5), (6, 4)])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MF.fused_mlp(x, ws, bs, False)
    assert len(saved) == 6  # no output without the log-softmax


def test_no_graph_without_grad():
    x, ws, bs = make((8, 6, 4), requires_grad=False)
    assert MF.fused_mlp(x, ws, bs).grad_fn is None
    x, ws, bs = make((8, 6, 4))
    with torch.no_grad():
        out = MF.fused_mlp(x, ws, bs, True)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, reference(x, ws, bs, True))


def test_stride0_and_non_contiguous(device):
    x, ws, bs = make((8, 6, 4), device=device)
    # out.sum().backward() hands the op a stride-0 grad, with and without the log-softmax.
    for log_softmax in (False, True):
        check_parity(x, ws, bs, log_softmax, torch.float64, grad=torch.ones(1, 1, dtype=torch.float64,
                                                                            device=device).expand(6, 4))
    base = torch.randn(16, 20, dtype=torch.float64, device=device)
    xt = base.t()[:, ::2].requires_grad_()  # (20, 8)
    wt = [torch.randn(8, 6, dtype=torch.float64, device=device).t().requires_grad_(),  # (6, 8), transposed
          torch.randn(4, 12, dtype=torch.float64, device=device)[:, ::2].requires_grad_()]  # (4, 6), stride 2
    bt = [torch.randn(12, dtype=torch.float64, device=device)[::2].requires_grad_(), None]
    assert not any(t.is_contiguous() for t in (xt, *wt, bt[0]))
    check_parity(xt, wt, bt, True, torch.float64)


def test_empty_batch_and_empty_layers(device):
    x, ws, bs = make((8, 6, 4), device=device, batch=(0,))
    check_parity(x, ws, bs, True, torch.float64)
    x, ws, bs = make((0, 6, 4), device=device)  # no input features
    check_parity(x, ws, bs, False, torch.float64)


def test_opcheck():
    x, ws, bs = make((7, 5, 6, 3), dtype=torch.float32, bias=(True, False, True))
    for log_softmax in (False, True):
        opcheck(op.fused_mlp_forward, (x, ws, bs, log_softmax))
        out, hidden = op.fused_mlp_forward(x, ws, bs, log_softmax)
        grad = torch.randn_like(out)
        for mask in ([True] * 3 + [False, True, True, True], [False, True, False, False, False, True, True]):
            args = (grad, x.detach(), [w.detach() for w in ws], hidden, out.detach() if log_softmax else None, mask)
            opcheck(op._fused_mlp_backward, args)


def test_torch_compile_fullgraph_forward_and_backward():
    x, ws, bs = make((9, 7, 5, 3), dtype=torch.float32, bias=(True, False, True))

    def loss(x, ws, bs):
        return (MF.fused_mlp(x, ws, bs, True) * torch.arange(3.0)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, ws, bs), loss(x, ws, bs)
    torch.testing.assert_close(got, want)
    params = leaves(x, ws, bs)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b)


def test_forward_mode_ad_raises_clearly():
    x, ws, bs = make((5, 4, 3), requires_grad=False)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda x: MF.fused_mlp(x, ws, bs), (x,), (torch.ones_like(x),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        MF.fused_mlp(x, [fwAD.make_dual(ws[0], torch.ones_like(ws[0])), ws[1]], bs)


def test_double_backward_raises_clearly():
    x, ws, bs = make((5, 4, 3))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(MF.fused_mlp(x, ws, bs).sum(), x, create_graph=True)


def stock_and_ours_raise_alike(x, weights, biases, log_softmax=False):
    try:
        reference(x, weights, biases, log_softmax)
        stock_error = None
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        stock_error = e
    if stock_error is None:
        torch.testing.assert_close(MF.fused_mlp(x, weights, biases, log_softmax),
                                   reference(x, weights, biases, log_softmax))
    else:
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            MF.fused_mlp(x, weights, biases, log_softmax)
        assert "mnist_fast" in str(info.value)
        return str(info.value)


r = torch.randn


@pytest.mark.parametrize("case,match", [
    (lambda: (r(3, 5), [r(4, 6), r(2, 4)], [None, None]), "layer 0 expects 6 input features but the input has 5"),
    (lambda: (r(3, 5), [r(4, 5), r(2, 3)], [None, None]), "layer 1 expects 3 input features but the previous"),
    (lambda: (r(3, 5), [r(4, 5), r(2, 4)], [r(3), None]), r"expected bias 0 of shape \(4,\)"),
    (lambda: (r(3, 5), [r(4, 5), r(2, 4, dtype=torch.float64)], [None, None]), "same dtype as input"),
    (lambda: (torch.tensor(1.0), [r(4, 1)], [None]), "0-d"),
])
def test_bad_inputs_raise_where_stock_raises(case, match):
    message = stock_and_ours_raise_alike(*case())
    assert message is not None and re.search(match, message), message


@pytest.mark.parametrize("case,match", [
    (lambda: (torch.ones(3, 5, dtype=torch.long), [torch.ones(4, 5, dtype=torch.long)], [None]), "float32, float64"),
    (lambda: (r(3, 5), [r(5)], [None]), "weight 0 of shape"),
])
def test_deviations_stock_accepts_raise_clearly(case, match):
    """Integer tensors and 1-d weights, which stock F.linear takes, are rejected as linear_relu does."""
    with pytest.raises((TypeError, ValueError), match=match):
        MF.fused_mlp(*case())


def test_bad_structure_and_backward_arguments():
    with pytest.raises(ValueError, match="at least one layer"):
        MF.fused_mlp(r(3, 5), [])
    with pytest.raises(ValueError, match="one bias entry"):
        op.fused_mlp_forward(r(3, 5), [r(4, 5)], [None, None], False)
    x, ws, bs = make((5, 4, 3), requires_grad=False)
    out, hidden = op.fused_mlp_forward(x, ws, bs, False)
    g = torch.randn_like(out)
    with pytest.raises(ValueError, match="output_mask of 5"):
        op._fused_mlp_backward(g, x, ws, hidden, None, [True, True])
    with pytest.raises(ValueError, match="1 hidden activations"):
        op._fused_mlp_backward(g, x, ws, [], None, [True] * 5)
    with pytest.raises(ValueError, match="hidden activation 0 of shape"):
        op._fused_mlp_backward(g, x, ws, [hidden[0][:3]], None, [True] * 5)
    with pytest.raises(ValueError, match="grad_output of shape"):
        op._fused_mlp_backward(g[:2], x, ws, hidden, None, [True] * 5)


def test_device_mismatch_raises():
    x, ws, bs = make((5, 4, 3), dtype=torch.float32, requires_grad=False)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        MF.fused_mlp(x, [ws[0], ws[1].to("meta")], bs)


def test_stock_accepted_shapes_agree():
    stock_and_ours_raise_alike(r(1, 5).expand(6, 5), [r(4, 5), r(3, 4)], [r(4), r(3)])  # stride-0 input
    stock_and_ours_raise_alike(r(0, 2, 5), [r(4, 5), r(3, 4)], [None, r(3)], True)
    stock_and_ours_raise_alike(r(3, 5), [r(0, 5), r(3, 0)], [r(0), r(3)])  # zero-width hidden layer
