"""mnist_fast.functional.cross_entropy against F.cross_entropy: gradcheck, parity, bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from mnist_fast import functional as MF
from helpers import TOL

op = torch.ops.mnist_fast
IGNORE = -100


def index_target(shape, classes, device, ignore_some):
    t = torch.randint(0, classes, shape, device=device)
    if ignore_some and t.numel() > 1:
        t.view(-1)[::3] = IGNORE
    return t


def prob_target(shape, dtype, device):
    return torch.softmax(torch.randn(shape, dtype=dtype, device=device), dim=1 if len(shape) > 1 else 0)


# (input shape, class dimension size) of each layout F.cross_entropy accepts.
LAYOUTS = {"(N,C)": (6, 5), "(C,)": (5,), "(N,C,d)": (3, 5, 4)}


def target_shape(shape):
    return shape[:1] + shape[2:] if len(shape) > 1 else ()


OPTION_GRID = list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.25]))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction,weighted,smoothing", OPTION_GRID)
@pytest.mark.parametrize("ignore_some", [False, True])
def test_gradcheck_class_indices(device, layout, reduction, weighted, smoothing, ignore_some):
    shape = LAYOUTS[layout]
    classes = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    t = index_target(target_shape(shape), classes, device, ignore_some)
    w = torch.rand(classes, dtype=torch.float64, device=device) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing, ignore_index=IGNORE)
    torch.testing.assert_close(MF.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw), **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda x: MF.cross_entropy(x, t, **kw), (x,))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction,weighted,smoothing", OPTION_GRID)
def test_gradcheck_probabilities(device, layout, reduction, weighted, smoothing):
    shape = LAYOUTS[layout]
    classes = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    t = prob_target(shape, torch.float64, device).requires_grad_()
    w = torch.rand(classes, dtype=torch.float64, device=device) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(MF.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw), **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda x, t: MF.cross_entropy(x, t, **kw), (x, t))


def check_parity(x, t, dtype, **kw):
    """Loss and input gradient equal stock's, for a leaf x of dtype."""
    ours = MF.cross_entropy(x, t, **kw)
    ref = F.cross_entropy(x, t, **kw)
    if dtype == torch.float16 and not ref.isfinite().all():
        # Stock sums the float16 smoothing terms in float16 and may overflow where the float64
        # result is finite; we accumulate in float32, so compare with float64 rounded to float16.
        exact = F.cross_entropy(x.double(), t.double() if t.is_floating_point() else t,
                                **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
        if exact.isfinite().all():
            ref = exact.to(dtype)
    torch.testing.assert_close(ours, ref, **TOL[dtype], equal_nan=True)
    g = torch.rand_like(ref)
    grad_ours, = torch.autograd.grad(ours, x, g)
    grad_ref, = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_ours, grad_ref, **TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,classes", [(64, 10), (1, 10), (0, 10), (1024, 10), (64, 1000), (3, 1)])
@pytest.mark.parametrize("reduction,weighted,smoothing", [("mean", False, 0.0), ("none", True, 0.1),
                                                          ("sum", False, 0.3), ("mean", True, 0.2)])
def test_parity(device, dtype, rows, classes, reduction, weighted, smoothing):
    x = (3 * torch.randn(rows, classes, device=device)).to(dtype).requires_grad_()
    t = index_target((rows,), classes, device, ignore_some=True)
    w = (torch.rand(classes, device=device) + 0.5).to(dtype) if weighted else None
    check_parity(x, t, dtype, weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parity_probabilities(device, dtype, reduction):
    x = torch.randn(33, 7, device=device).to(dtype).requires_grad_()
    t = prob_target((33, 7), torch.float32, device).to(dtype)
    check_parity(x, t, dtype, reduction=reduction, label_smoothing=0.1)


def test_probabilities_of_another_dtype_promote_like_stock(device):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    t = prob_target((4, 3), torch.float64, device)
    ours, ref = MF.cross_entropy(x, t), F.cross_entropy(x, t)
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref)


def test_uint8_targets(device):
    x = torch.randn(8, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (8,), device=device, dtype=torch.uint8)
    check_parity(x, t, torch.float32)


def test_non_contiguous_input_and_stride_zero_grad(device):
    base = torch.randn(10, 40, device=device)
    x = base.t()[::2].detach().requires_grad_()  # (20, 10), non-contiguous
    assert not x.is_contiguous()
    t = index_target((20,), 10, device, ignore_some=True)
    # reduction='none' then .sum(): the backward receives an expanded grad of stride 0.
    MF.cross_entropy(x, t, reduction="none").sum().backward()
    ours = x.grad.clone()
    x.grad = None
    F.cross_entropy(x, t, reduction="none").sum().backward()
    torch.testing.assert_close(ours, x.grad)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extreme_logits(device, smoothing):
    x = torch.tensor([[1e4, -1e4, 0.0], [-float("inf"), 1.0, 2.0], [80.0, 80.0, -80.0], [1000.5, 1000.25, 999.0],
                      [-3e4, -3e4 + 0.5, -3e4 - 2]], device=device, requires_grad=True)
    t = torch.tensor([0, 2, 1, 1, 2], device=device)
    check_parity(x, t, torch.float32, label_smoothing=smoothing, reduction="none")


def test_nan_logits_give_nan_like_stock(device):
    x = torch.tensor([[float("nan"), 1.0], [0.5, 1.0]], device=device, requires_grad=True)
    t = torch.tensor([1, 0], device=device)
    check_parity(x, t, torch.float32, reduction="none")


@pytest.mark.parametrize("weighted", [False, True])
def test_all_rows_ignored_is_nan_like_stock(device, weighted):
    x = torch.randn(3, 4, device=device, requires_grad=True)
    t = torch.full((3,), IGNORE, device=device)
    w = torch.rand(4, device=device) if weighted else None
    check_parity(x, t, torch.float32, weight=w, label_smoothing=0.1)
    assert MF.cross_entropy(x, t).isnan()


def test_custom_ignore_index(device):
    x = torch.randn(6, 4, device=device, requires_grad=True)
    t = torch.tensor([0, 3, 3, 1, 2, 3], device=device)
    check_parity(x, t, torch.float32, ignore_index=3, label_smoothing=0.2)


def test_legacy_size_average_and_reduce(device):
    x = torch.randn(5, 3, device=device, requires_grad=True)
    t = torch.randint(0, 3, (5,), device=device)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        check_parity(x, t, torch.float32, size_average=False)
        check_parity(x, t, torch.float32, reduce=False)


def test_reduced_loss_is_identical_for_any_thread_count():
    # Rows are summed in fixed blocks, whatever the number of threads: bitwise equal results.
    x = torch.randn(5000, 10, requires_grad=True)
    t = torch.randint(0, 10, (5000,))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = MF.cross_entropy(x, t, label_smoothing=0.1)
            results.append((loss, *torch.autograd.grad(loss, x)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_log_softmax_nll_is_cross_entropy():
    assert MF.log_softmax_nll is MF.cross_entropy


def test_opcheck(device):
    x = torch.randn(7, 5, device=device, requires_grad=True)
    t = index_target((7,), 5, device, ignore_some=True)
    w = torch.rand(5, device=device)
    p = prob_target((7, 5), torch.float32, device).requires_grad_()
    for args in [(x, t, w, 1, IGNORE, 0.1), (x, t, None, 0, IGNORE, 0.0), (x, p, w, 2, IGNORE, 0.2)]:
        opcheck(op.cross_entropy_forward.default, args)
    opcheck(op.cross_entropy.default, (x, t, w, 1, IGNORE, 0.1))
    xd = x.detach()
    loss, lse = op.cross_entropy_forward(xd, t, w, 0, IGNORE, 0.1)
    opcheck(op._cross_entropy_backward.default, (torch.rand_like(loss), xd, t, w, lse, 0, IGNORE, 0.1, [True, False]))


# ---- the CPU one-pass path: forward and the input's gradient together (_cross_entropy_forward_backward) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,classes", [(64, 10), (13, 10), (9, 1), (37, 32), (21, 33), (5, 1000)])
@pytest.mark.parametrize("reduction,weighted,smoothing", OPTION_GRID)
@pytest.mark.parametrize("probabilities", [False, True])
def test_one_pass_gradient_is_the_backward_ops(dtype, rows, classes, reduction, weighted, smoothing, probabilities):
    """The one-pass op gives the forward op's loss and stats bit for bit, and the backward op's
    gradient for an incoming grad of ones, for short rows (vectorized across rows, reusing the
    forward's exps) and long rows alike."""
    x = torch.randn(rows, classes, dtype=dtype) * 3
    t = prob_target((rows, classes), dtype, "cpu") if probabilities else index_target((rows,), classes, "cpu", True)
    w = torch.rand(classes, dtype=dtype) + 0.5 if weighted else None
    code = {"none": 0, "mean": 1, "sum": 2}[reduction]
    loss, stats, grad = op._cross_entropy_forward_backward(x, t, w, code, IGNORE, smoothing)
    ref_loss, ref_stats = op.cross_entropy_forward(x, t, w, code, IGNORE, smoothing)
    (ref_grad, _) = op._cross_entropy_backward(torch.ones_like(ref_loss), x, t, w, ref_stats, code, IGNORE,
                                               smoothing, [True, False])
    assert torch.equal(loss, ref_loss) and torch.equal(stats, ref_stats)
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_pass_gradient_is_scaled_by_the_incoming_grad(reduction):
    """The saved gradient is for an incoming grad of 1: any other (a scaled loss, per-row grads, a
    retained graph run twice) is applied at backward, as stock's gradient."""
    x = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    t = index_target((9,), 10, "cpu", ignore_some=True)
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=torch.rand(10, dtype=torch.float64) + 0.5)
    v = torch.randn(9, dtype=torch.float64) if reduction == "none" else torch.tensor(2.5, dtype=torch.float64)
    ours = MF.cross_entropy(x, t, **kw)
    ref = F.cross_entropy(x, t, **kw)
    for _ in range(2):  # retained, then freed: both backward passes scale the saved gradient afresh
        (g,) = torch.autograd.grad(ours, x, v, retain_graph=True)
        torch.testing.assert_close(g, torch.autograd.grad(ref, x, v, retain_graph=True)[0])
    if reduction != "none":  # loss.backward()'s grad of 1 hands the saved gradient on, once
        ours.backward()
        torch.testing.assert_close(x.grad, torch.autograd.grad(ref, x)[0])
    # With the graph retained, what backward hands on is a copy: a hook that scribbles on it in place
    # leaves the next backward's gradient intact.
    z = x.detach().requires_grad_()
    loss = MF.cross_entropy(z, t, **kw).sum()
    handle = z.register_hook(lambda g: g.zero_())
    loss.backward(retain_graph=True)
    handle.remove()
    (g,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(g, torch.autograd.grad(F.cross_entropy(x, t, **kw).sum(), x)[0])


def test_one_pass_path_saves_less_than_stock():
    """Only the unit gradient is saved (the input's size), not the logits and the row stats: less
    than stock's log-softmax output and target."""
    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(64, 10, requires_grad=True)
        y = torch.randint(0, 10, (64,))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x * 1.0, y)  # logits that are not a leaf, as a model's output
        return sum(seen.values())
    assert saved_bytes(MF.cross_entropy) < saved_bytes(F.cross_entropy)


def test_opcheck_one_pass():
    x = torch.randn(7, 5)
    t = index_target((7,), 5, "cpu", ignore_some=True)
    p = prob_target((7, 5), torch.float32, "cpu")
    w = torch.rand(5)
    for args in [(x, t, w, 1, IGNORE, 0.1), (x, t, None, 0, IGNORE, 0.0), (x, p, w, 2, IGNORE, 0.2)]:
        opcheck(op._cross_entropy_forward_backward.default, args)


def test_double_backward_raises_clearly(device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 3], device=device)
    with pytest.raises(RuntimeError, match="double backward of cross_entropy is not supported"):
        torch.autograd.gradgradcheck(lambda x: MF.cross_entropy(x, t), (x,))


def test_weight_gradient_is_refused_clearly(device):
    x = torch.randn(3, 4, device=device, requires_grad=True)
    w = torch.rand(4, device=device, requires_grad=True)
    loss = MF.cross_entropy(x, torch.tensor([0, 1, 3], device=device), weight=w)
    with pytest.raises(RuntimeError, match="gradient with respect to weight is not implemented"):
        loss.backward()


# ---- bad input: the cases are in bad_input_cases.py (one table, run by test_bad_inputs.py) ----


# A NaN or inf weight for a class that no row targets (1 / bincount(labels) with a class missing
# from the batch): stock's gradient stays finite without smoothing and is NaN/inf exactly where
# its log_softmax backward makes it so with smoothing (issue 12, item 2). Class 4 is never a target;
# "dominant" makes it every row's largest logit, where (m - x) is 0 and 0 * inf would be NaN.
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [IGNORE, 1])
@pytest.mark.parametrize("dominant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_weight_of_an_untargeted_class_matches_stock(device, bad, reduction, smoothing, ignore_index,
                                                                dominant, dtype):
    x = torch.randn(6, 5, dtype=dtype, device=device)
    if dominant:
        x[:, 4] += 10
    x.requires_grad_()
    t = torch.tensor([0, 1, 2, 1, 3, 0], device=device)
    w = (torch.rand(5, device=device) + 0.5).to(dtype)
    w[4] = bad
    check_parity(x, t, dtype, weight=w, reduction=reduction, label_smoothing=smoothing, ignore_index=ignore_index)


# Logits so large that m + log(s) rounds to m even in float64 (issue 12, item 6): the gradient of
# three equal logits is [-2/3, 1/3, 1/3] at any scale.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e13, 1e17, 1e30])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_huge_logits_keep_the_log_of_the_sum(device, dtype, scale, smoothing):
    x = (torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.5, 0.25], [-1.0, -1.0, -1.0]], dtype=torch.float64)
         * scale).to(dtype).to(device).requires_grad_()
    t = torch.tensor([0, 2, 1, 1], device=device)
    check_parity(x, t, dtype, reduction="none", label_smoothing=smoothing)
    MF.cross_entropy(x[:1], t[:1]).backward()
    torch.testing.assert_close(x.grad[0].double().cpu(), torch.tensor([-2 / 3, 1 / 3, 1 / 3], dtype=torch.float64),
                               **TOL[dtype])
    p = prob_target((4, 3), dtype, device)
    check_parity(x, p, dtype, reduction="sum", label_smoothing=smoothing)


# No rows and a class count whose per-class buffers would not fit in memory (issue 12, item 10):
# stock returns NaN (mean), 0 (sum) or an empty loss without touching the classes.
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_empty_batch_with_a_huge_class_count_is_like_stock(device, reduction, probabilities, smoothing):
    classes = 2 ** 40
    x = torch.empty(0, classes, device=device, requires_grad=True)
    t = torch.empty(0, classes, device=device) if probabilities else torch.empty(0, dtype=torch.long, device=device)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ours, ref = MF.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    grad, = torch.autograd.grad(ours.sum(), x)
    assert grad.shape == x.shape


def test_backward_node_follows_autograd_rules():
    """The loss's grad_fn is a plain autograd node: it checks its saved tensors' versions, frees
    them after backward unless retain_graph, and gives no grad to what does not ask for one."""
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    loss = MF.cross_entropy(x, y)
    assert loss.grad_fn.name() == "CrossEntropyBackward"
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()  # retained: a second backward adds the same gradient again
    torch.testing.assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="freed|second time"):
        loss.backward()
    # Only the input needs a grad: the gradient is computed in the forward and the logits are not
    # saved, so an in-place change of them afterwards leaves the gradient that of the forward's
    # values (as stock, whose log_softmax saves its output, not its input).
    z = x.detach().clone().requires_grad_()
    w = z * 1.0
    loss = MF.cross_entropy(w, y)
    with torch.no_grad():
        w.add_(1)
    loss.backward()
    torch.testing.assert_close(z.grad, torch.autograd.grad(F.cross_entropy(x, y), x)[0])
    # The two-op path (here bfloat16) saves the logits: an in-place change of them is caught.
    w = (z * 1.0).bfloat16()
    loss = MF.cross_entropy(w, y)
    with torch.no_grad():
        w.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # probability targets that require grad get theirs; grad() of the input alone leaves them alone
    t = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1).requires_grad_()
    loss = MF.cross_entropy(x, t)
    (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(gx, torch.autograd.grad(F.cross_entropy(x, t), x)[0])
    assert t.grad is None
    loss.backward()
    torch.testing.assert_close(t.grad, torch.autograd.grad(F.cross_entropy(x, t), t)[0])
