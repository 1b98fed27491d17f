"""Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) through the fused ops, against stock in
float64; what is not supported raises a clear error, never a silent zero tangent."""
import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import mnist_fast
from mnist_fast import functional as MF
from mnist_fast.models import MNISTNet
from mnist_fast.nn import LinearReLU

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def fw_ad(fn, primals, tangents):
    """fn(*primals) and its tangent through torch.autograd.forward_ad; a None tangent is not set."""
    with fwAD.dual_level():
        args = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(fn(*args))
        return out.primal, out.tangent


def func_jvp(fn, primals, tangents):
    """The same through torch.func.jvp (over the arguments that have a tangent)."""
    chosen = [i for i, t in enumerate(tangents) if t is not None]

    def of_chosen(*values):
        args = list(primals)
        for i, v in zip(chosen, values):
            args[i] = v
        return fn(*args)

    return torch.func.jvp(of_chosen, tuple(primals[i] for i in chosen), tuple(tangents[i] for i in chosen))


ENGINES = {"forward_ad": fw_ad, "func.jvp": func_jvp}


def assert_tangents_match(engine, ours, stock, primals, tangents):
    out, tangent = ENGINES[engine](ours, primals, tangents)
    out_ref, tangent_ref = ENGINES[engine](stock, primals, tangents)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert tangent is not None, "no tangent: forward-mode AD dropped it"
    torch.testing.assert_close(tangent, tangent_ref, **TOL)
    assert tangent.abs().sum() > 0  # a zero tangent would not tell a dropped one from a right one


def stock_linear_relu(x, w, b=None):
    return torch.relu(F.linear(x, w, b))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5), (5,)], ids=str)
def test_linear_relu_tangent_matches_stock(engine, shape):
    x, w, b = torch.randn(shape, dtype=D), torch.randn(4, 5, dtype=D), torch.randn(4, dtype=D)
    dx, dw, db = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    assert (stock_linear_relu(x, w, b) == 0).any() or shape == (5,)  # the ReLU mask matters
    # Every non-empty subset of the arguments with a tangent.
    for mask in itertools.product([True, False], repeat=3):
        if not any(mask):
            continue
        tangents = [t if m else None for t, m in zip((dx, dw, db), mask)]
        assert_tangents_match(engine, MF.linear_relu, stock_linear_relu, (x, w, b), tangents)
    assert_tangents_match(engine, MF.linear_relu, stock_linear_relu, (x, w), (dx, dw))  # no bias


def ce_cases():
    n, c = 8, 5
    t = torch.randint(0, c, (n,))
    t[1] = 2
    t_ignored = t.clone()
    t_ignored[::3] = -100
    w = torch.rand(c, dtype=D) + 0.5
    for reduction in ("none", "mean", "sum"):
        yield f"index-{reduction}", dict(target=t, reduction=reduction)
        yield f"index-options-{reduction}", dict(target=t_ignored, weight=w, reduction=reduction, label_smoothing=0.2)
        yield f"prob-{reduction}", dict(target=torch.softmax(torch.randn(n, c, dtype=D), 1), reduction=reduction,
                                        label_smoothing=0.1)


CE_CASES = dict(ce_cases())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CE_CASES)
def test_cross_entropy_tangent_matches_stock(engine, case):
    kwargs = dict(CE_CASES[case])
    target = kwargs.pop("target")
    x = torch.randn(target.shape[0], 5, dtype=D) * 3
    dx = torch.randn_like(x)

    def ours(x, target):
        return MF.cross_entropy(x, target, **kwargs)

    def stock(x, target):
        return F.cross_entropy(x, target, **kwargs)

    assert_tangents_match(engine, ours, stock, (x, target), (dx, None))
    if target.is_floating_point():  # probability targets have a tangent of their own
        dt = torch.randn_like(target)
        assert_tangents_match(engine, ours, stock, (x, target), (None, dt))
        assert_tangents_match(engine, ours, stock, (x, target), (dx, dt))


@pytest.mark.parametrize("engine", ENGINES)
def test_cross_entropy_tangent_for_other_input_shapes(engine):
    # (C,) and (N, C, d) inputs go through reshapes in the Python function.
    x1, t1 = torch.randn(5, dtype=D), torch.tensor(3)
    assert_tangents_match(engine, MF.cross_entropy, F.cross_entropy, (x1, t1), (torch.randn_like(x1), None))
    x3, t3 = torch.randn(2, 5, 3, dtype=D), torch.randint(0, 5, (2, 3))
    assert_tangents_match(engine, MF.cross_entropy, F.cross_entropy, (x3, t3), (torch.randn_like(x3), None))


def test_jvp_of_a_model_whose_parameters_require_grad():
    # The common case: torch.func.jvp of a loss with respect to the input, with grad mode on and the
    # parameters requiring grad (the primal goes through the reverse-mode path too).
    # The lesson's MLP from LinearReLU layers, one op each (MNISTNet is one fused_mlp op: see below).
    torch.manual_seed(0)
    net = torch.nn.Sequential(LinearReLU(784, 128), torch.nn.Identity(), LinearReLU(128, 64), torch.nn.Identity(),
                              torch.nn.Linear(64, 10)).double()
    stock = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10)).double()
    stock.load_state_dict(net.state_dict())
    x, y = torch.randn(16, 784, dtype=D), torch.randint(0, 10, (16,))
    v = torch.randn_like(x)
    loss, tangent = torch.func.jvp(lambda x: MF.cross_entropy(net(x), y), (x,), (v,))
    loss_ref, tangent_ref = torch.func.jvp(lambda x: F.cross_entropy(stock(x), y), (x,), (v,))
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(tangent, tangent_ref, **TOL)
    # The primal still has its reverse-mode graph.
    loss.backward()
    loss_ref.backward()
    for a, b in zip(net.parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_jvp_of_mnist_net_is_refused_and_works_unfused():
    # MNISTNet is a FusedMLP: fused_mlp has no forward-mode formula, and says what to do instead.
    net = MNISTNet().double()
    x, v = torch.randn(4, 784, dtype=D), torch.randn(4, 784, dtype=D)
    with pytest.raises(RuntimeError, match=r"forward-mode AD .* is not supported; run the stock layers for it "
                                           r"\(mnist_fast.nn.unfuse\(model\)\)"):
        torch.func.jvp(net, (x,), (v,))
    stock = mnist_fast.unfuse(net)
    out, tangent = torch.func.jvp(stock, (x,), (v,))
    torch.testing.assert_close(out, net(x), **TOL)
    torch.testing.assert_close(tangent, torch.autograd.functional.jvp(stock, x, v)[1], **TOL)  # by reverse mode


def test_forward_and_reverse_mode_at_once():
    # A dual tensor that also requires grad: the tangent, and the reverse-mode grad of the primal.
    x = torch.randn(6, 5, dtype=D, requires_grad=True)
    w, b = torch.randn(4, 5, dtype=D, requires_grad=True), torch.randn(4, dtype=D)
    t = torch.randint(0, 4, (6,))
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    results = []
    for linear_relu, ce in ((MF.linear_relu, MF.cross_entropy), (stock_linear_relu, F.cross_entropy)):
        with fwAD.dual_level():
            loss = ce(linear_relu(fwAD.make_dual(x, dx), fwAD.make_dual(w, dw), b), t)
            tangent = fwAD.unpack_dual(loss).tangent
            grads = torch.autograd.grad(fwAD.unpack_dual(loss).primal, [x, w])
        results.append((loss.detach(), tangent, grads))
    (loss, tangent, grads), (loss_ref, tangent_ref, grads_ref) = results
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(tangent, tangent_ref, **TOL)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, **TOL)


def test_jvp_tangent_is_differentiable_in_the_tangent():
    # Reverse mode through the tangent with respect to the tangent direction itself is linear algebra
    # on dx: it works (and matches stock).
    x, w, b = torch.randn(6, 5, dtype=D), torch.randn(4, 5, dtype=D), torch.randn(4, dtype=D)
    t = torch.randint(0, 4, (6,))
    grads = []
    for linear_relu, ce in ((MF.linear_relu, MF.cross_entropy), (stock_linear_relu, F.cross_entropy)):
        v = torch.randn(6, 5, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_()
        _, tangent = torch.func.jvp(lambda x: ce(linear_relu(x, w, b), t), (x,), (v,))
        grads.append(torch.autograd.grad(tangent, v)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOL)


# ---- what is not supported raises ----

def test_weight_tangent_raises():
    x, t, w = torch.randn(4, 3, dtype=D), torch.tensor([0, 1, 2, 0]), torch.rand(3, dtype=D)
    with pytest.raises(RuntimeError, match="forward-mode AD with respect to weight is not implemented"):
        fw_ad(lambda w: MF.cross_entropy(x, t, weight=w), (w,), (torch.randn_like(w),))


def test_forward_over_reverse_raises():
    # torch.func.hessian is jacfwd(jacrev(f)). PyTorch itself refuses torch.func's reverse-mode
    # transforms on a C++ autograd Function; forward mode reaching a backward op raises ours.
    x, w, b = torch.randn(3, 4, dtype=D), torch.randn(2, 4, dtype=D), torch.randn(2, dtype=D)
    t = torch.tensor([0, 1, 1])
    clear = "cannot use C\\+\\+ torch::autograd::Function with functorch|forward-mode AD through the backward of"
    with pytest.raises(RuntimeError, match=clear):
        torch.func.hessian(lambda x: MF.linear_relu(x, w, b).sum())(x)
    with pytest.raises(RuntimeError, match=clear):
        torch.func.hessian(lambda x: MF.cross_entropy(x, t))(x[:, :2].contiguous())
    # The backward ops given tangents directly.
    y = MF.linear_relu(x, w, b)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="forward-mode AD through the backward of linear_relu"):
            torch.ops.mnist_fast._linear_relu_backward(fwAD.make_dual(torch.ones_like(y), torch.ones_like(y)), x, w, y,
                                                      [True, True, True])
        lse = torch.logsumexp(x, 1)
        with pytest.raises(RuntimeError, match="forward-mode AD through the backward of cross_entropy"):
            torch.ops.mnist_fast._cross_entropy_backward(torch.ones((), dtype=D), fwAD.make_dual(x, torch.ones_like(x)),
                                                        t, None, lse, 1, -100, 0.0, [True, False])


def test_reverse_over_forward_through_cross_entropy_raises():
    # d/dx of the tangent needs the second derivative of the loss, which the fused op does not have.
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0, 1, 2, 0])
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(MF.cross_entropy(fwAD.make_dual(x, torch.randn_like(x)), t)).tangent
        with pytest.raises(RuntimeError, match="reverse-mode derivative of cross_entropy's forward-mode tangent"):
            torch.autograd.grad(tangent, x)


def test_train_step_with_a_tangent_raises():
    params = [torch.randn(4, 6, dtype=D), torch.randn(4, dtype=D), torch.randn(3, 4, dtype=D), torch.randn(3, dtype=D)]
    x, t = torch.randn(5, 6, dtype=D), torch.tensor([0, 1, 2, 2, 0])
    ws = torch.ops.mnist_fast.train_step_workspace(x, params)
    before = [p.clone() for p in params]
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="train_step_sgd: forward-mode AD .* is not supported"):
            mnist_fast._C.train_step_sgd(dual, t, params, [], ws, 0.1, 0.0, 0.0, 0.0, False, True, -100, 0.0)
    for p, q in zip(params, before):
        assert torch.equal(p, q)
