"""FusedTrainer and the train_step_sgd op: the same training run as stock model + torch.optim.SGD."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

from mnist_fast import models
from mnist_fast.models import MNISTNet
from mnist_fast.nn import LinearReLU, fuse
from mnist_fast.trainer import FusedTrainer

from helpers import STEP_TOL, TOL, assert_same_params


def stock_mlp(sizes=(784, 32, 16, 10)):
    """The lesson's stock MLP (mnist_fast.models.stock_mlp), narrower by default: quick steps."""
    return models.stock_mlp(sizes)


def make_batches(batch_sizes, in_shape=(1, 28, 28), classes=10, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *in_shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g))
            for n in batch_sizes]


def stock_run(model, opt, batches, loss_fn=None):
    """The reference: losses, correct counts, then the model's parameters after the run."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    losses, correct = [], []
    for x, y in batches:
        logits = model(x.flatten(1))
        loss = loss_fn(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        correct.append(int((logits.argmax(1) == y).sum()))
    return losses, correct


def fused_run(trainer, batches):
    losses, correct = [], []
    for x, y in batches:
        loss, c = trainer.step(x, y)
        losses.append(loss)
        correct.append(c)
    return losses, correct


SGD_CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_stock_sgd_after_several_steps(config, dtype):
    torch.manual_seed(0)
    ref = stock_mlp().to(dtype)
    model = fuse(copy.deepcopy(ref))
    batches = make_batches([32, 32, 17, 32, 32, 5, 32, 32], dtype=dtype)  # with a short batch in between
    ref_losses, ref_correct = stock_run(ref, torch.optim.SGD(ref.parameters(), **config), batches)
    losses, correct = fused_run(FusedTrainer(model, **config), batches)
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **tol)
    assert correct == ref_correct
    assert_same_params(model, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 5, 64, 100])
def test_step_grads_match_autograd(rows, dtype):
    # train_step_grads (the step without its update) against autograd, every parameter's grad, from
    # one row to 100 (uneven blocks of rows); widths 50 and 20 leave partial vectors in the passes.
    torch.manual_seed(0)
    model = models.stock_mlp((784, 50, 20, 10)).to(dtype)
    params = [p.detach() for p in model.parameters()]
    x, y = make_batches([rows], in_shape=(784,), dtype=dtype)[0]
    workspace = torch.ops.mnist_fast.train_step_workspace(x, params)
    loss, correct = torch.ops.mnist_fast.train_step_grads(x, y, params, workspace, -100, 0.0)
    logits = model(x)
    ref_loss = F.cross_entropy(logits, y)
    ref_loss.backward()
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(loss, ref_loss.detach(), **tol)
    assert int(correct) == int((logits.argmax(1) == y).sum())
    for grad, p in zip(workspace[-len(params):], model.parameters()):
        torch.testing.assert_close(grad, p.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_stock_on_each_device(device, dtype):
    torch.manual_seed(0)
    ref = stock_mlp().to(device, dtype)
    model = fuse(copy.deepcopy(ref))
    batches = [(x.to(device), y.to(device)) for x, y in make_batches([32, 32, 7, 32], dtype=dtype)]
    batches[1][1][::4] = -100
    config = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    ref_losses, ref_correct = stock_run(ref, torch.optim.SGD(ref.parameters(), **config), batches, loss_fn)
    trainer = FusedTrainer(model, label_smoothing=0.1, **config)
    losses, correct = fused_run(trainer, batches)
    tol = STEP_TOL[dtype]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **tol)
    assert correct == ref_correct
    assert_same_params(model, ref, **tol)
    x, y = batches[0]
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        trainer.step(x, torch.where(torch.arange(len(y), device=device) == 3, 10, y))


def test_mnistnet_and_the_model_stays_the_source_of_truth():
    torch.manual_seed(0)
    model = MNISTNet()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    batches = make_batches([64] * 5)
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9)
    stock_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), batches)
    fused_run(trainer, batches)
    assert_same_params(model, ref, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys  # checkpoint format unchanged
    x = batches[0][0]
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)  # evaluation as usual
    # The trainer updates the model's own Parameters in place, and bumps their versions.
    w = model[0].weight
    before, version = w.detach().clone(), w._version
    trainer.step(*batches[1])
    assert not torch.equal(w, before) and w._version > version
    assert w.grad is None  # .grad is not used


@pytest.mark.parametrize("build", ["stock", "fused", "nested+flatten+identity"])
def test_accepted_stacks(build):
    torch.manual_seed(0)
    ref = stock_mlp((20, 8, 8, 4))
    if build == "stock":
        model = copy.deepcopy(ref)
    elif build == "fused":
        model = fuse(copy.deepcopy(ref))
        assert isinstance(model[0], LinearReLU)
    else:
        c = copy.deepcopy(ref)
        model = nn.Sequential(nn.Flatten(), nn.Sequential(c[0], c[1], nn.Identity()), c[2], c[3], c[4])
    batches = make_batches([8, 8, 8], in_shape=(20,), classes=4)
    stock_run(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5), batches)
    fused_run(FusedTrainer(model, lr=0.1, momentum=0.5), batches)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_single_linear_layer_is_logistic_regression():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(12, 3))
    model = copy.deepcopy(ref)
    batches = make_batches([6, 6], in_shape=(12,), classes=3, dtype=torch.float64)
    stock_run(ref.double(), torch.optim.SGD(ref.parameters(), lr=0.3), batches)
    fused_run(FusedTrainer(model.double(), lr=0.3), batches)
    assert_same_params(model, ref, **TOL[torch.float64])


def test_label_smoothing_and_ignore_index_match_stock():
    torch.manual_seed(0)
    ref = stock_mlp((30, 16, 5)).double()
    model = fuse(copy.deepcopy(ref))
    batches = make_batches([16, 16, 16], in_shape=(30,), classes=5, dtype=torch.float64)
    for _, y in batches:
        y[::3] = -100  # ignored rows
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    ref_losses, ref_correct = stock_run(ref, torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9), batches,
                                        loss_fn)
    losses, correct = fused_run(FusedTrainer(model, lr=0.2, momentum=0.9, label_smoothing=0.2), batches)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **TOL[torch.float64])
    assert correct == ref_correct
    assert_same_params(model, ref, **TOL[torch.float64])


@pytest.mark.parametrize("case", ["empty batch", "every row ignored"])
def test_degenerate_batches_match_stock(case):
    # Stock gives a NaN loss and zero gradients; weight decay and momentum still move the parameters.
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    model = copy.deepcopy(ref)
    config = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    first = make_batches([5], in_shape=(6,), classes=3)
    x, y = (torch.randn(0, 6), torch.zeros(0, dtype=torch.long)) if case == "empty batch" else \
        (torch.randn(5, 6), torch.full((5,), -100))
    ref_losses, ref_correct = stock_run(ref, torch.optim.SGD(ref.parameters(), **config), first + [(x, y)])
    losses, correct = fused_run(FusedTrainer(model, **config), first + [(x, y)])
    assert torch.isnan(losses[1]) and torch.isnan(ref_losses[1])
    assert correct == ref_correct
    assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


def test_loss_and_correct_values():
    # Hand-made logits: a single Linear layer with identity weights and zero bias.
    lin = nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
        lin.bias.zero_()
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2])
    expected = nn.functional.cross_entropy(x, y)
    loss, correct = FusedTrainer(nn.Sequential(lin), lr=0.0).step(x, y)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, expected, **TOL[torch.float64])
    assert isinstance(correct, int) and correct == 2  # rows 0 and 2 (a tie goes to the first class)
    torch.testing.assert_close(lin.weight, torch.eye(3, dtype=torch.float64))  # lr 0: nothing moves


def test_learning_rate_can_change_between_steps():
    torch.manual_seed(0)
    ref = stock_mlp((10, 6, 3))
    model = copy.deepcopy(ref)
    batches = make_batches([8] * 4, in_shape=(10,), classes=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    trainer = FusedTrainer(model, lr=0.5, momentum=0.9)
    for i, batch in enumerate(batches):
        lr = 0.5 / (i + 1)
        opt.param_groups[0]["lr"] = trainer.lr = lr
        stock_run(ref, opt, [batch])
        trainer.step(*batch)
    assert_same_params(model, ref, rtol=1e-5, atol=1e-6)


# ---- optimizer state ----

def test_state_dict_round_trip_continues_the_same_run():
    torch.manual_seed(0)
    model = fuse(stock_mlp())
    batches = make_batches([16] * 6)
    trainer = FusedTrainer(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    fused_run(trainer, batches[:3])
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optim": trainer.state_dict()})

    restored_model = fuse(stock_mlp())
    restored_model.load_state_dict(checkpoint["model"])
    restored = FusedTrainer(restored_model, lr=1.0)  # hyper-parameters come from the state
    restored.load_state_dict(checkpoint["optim"])
    assert (restored.lr, restored.momentum, restored.weight_decay) == (0.05, 0.9, 1e-3)
    fused_run(trainer, batches[3:])
    fused_run(restored, batches[3:])
    assert_same_params(restored_model, model, rtol=0, atol=0)


def test_state_dict_has_sgd_format_and_converts_both_ways():
    torch.manual_seed(0)
    ref = stock_mlp()
    model = fuse(copy.deepcopy(ref))
    batches = make_batches([16] * 6, dtype=torch.float64)
    ref.double(), model.double()
    config = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = torch.optim.SGD(ref.parameters(), **config)
    trainer = FusedTrainer(model, **config)
    assert trainer.state_dict() == opt.state_dict()  # before any step: no state, same group
    stock_run(ref, opt, batches[:2])
    fused_run(trainer, batches[:2])
    sd, ref_sd = trainer.state_dict(), opt.state_dict()
    assert sd["param_groups"] == ref_sd["param_groups"] and sd["state"].keys() == ref_sd["state"].keys()
    for k in sd["state"]:
        torch.testing.assert_close(sd["state"][k]["momentum_buffer"], ref_sd["state"][k]["momentum_buffer"],
                                   **TOL[torch.float64])

    # fused -> stock: a fresh SGD continues the fused run; stock -> fused: a fresh trainer continues stock.
    stock_from_fused = copy.deepcopy(model)
    opt2 = torch.optim.SGD(stock_from_fused.parameters(), lr=1.0)
    opt2.load_state_dict(copy.deepcopy(sd))
    fused_from_stock = fuse(copy.deepcopy(ref))
    trainer2 = FusedTrainer(fused_from_stock, lr=1.0)
    trainer2.load_state_dict(copy.deepcopy(ref_sd))
    stock_run(stock_from_fused, opt2, batches[2:])
    fused_run(trainer, batches[2:])
    stock_run(ref, opt, batches[2:])
    fused_run(trainer2, batches[2:])
    assert_same_params(stock_from_fused, model, **TOL[torch.float64])
    assert_same_params(fused_from_stock, ref, **TOL[torch.float64])


def test_load_state_dict_rejects_mismatches():
    model = fuse(stock_mlp())
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9)
    trainer.step(*make_batches([4])[0])
    sd = trainer.state_dict()
    two_groups = {"state": {}, "param_groups": [dict(sd["param_groups"][0]), dict(sd["param_groups"][0])]}
    with pytest.raises(ValueError, match="one parameter group"):
        trainer.load_state_dict(two_groups)
    other = FusedTrainer(fuse(stock_mlp((784, 8, 16, 10))), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(FusedTrainer(nn.Sequential(nn.Linear(784, 10)), lr=0.1).state_dict())
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)
    # A parameter without state (one that was frozen: torch.optim.SGD saves such states too) starts
    # its momentum afresh, as in torch.optim.SGD.
    partial = copy.deepcopy(sd)
    del partial["state"][0]
    trainer.load_state_dict(partial)
    sgd = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=1.0)
    sgd.load_state_dict(copy.deepcopy(partial))
    assert trainer.state_dict()["state"].keys() == sgd.state_dict()["state"].keys() == {1, 2, 3, 4, 5}


# ---- bad input ----

def test_bad_batches_raise_clearly_and_change_nothing():
    torch.manual_seed(0)
    model = fuse(stock_mlp())
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    x, y = make_batches([8])[0]
    with pytest.raises(ValueError, match="layer 0 expects 784 input features but the input has 783"):
        trainer.step(torch.randn(8, 783), y)
    with pytest.raises(IndexError, match="Target 10 is out of bounds for 10 classes"):
        trainer.step(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 10]))
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        trainer.step(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]))
    with pytest.raises(ValueError, match=r"expected target of shape \(8,\)"):
        trainer.step(x, y[:7])
    with pytest.raises(TypeError, match="int64"):
        trainer.step(x, y.int())
    with pytest.raises(TypeError, match="dtype"):
        trainer.step(x.double(), y)
    with pytest.raises(ValueError, match=r"shape \(N, \.\.\.\)"):
        trainer.step(torch.randn(784), y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert trainer.state_dict()["state"] == {}  # no step happened


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), "got Conv2d"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2)), "got Dropout"),
    (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "without a ReLU"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()), "must be a plain nn.Linear"),
    (fuse(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), "must be a plain nn.Linear"),
    (nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)), "has no bias"),
    (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), "got ReLU at '0'"),
    (nn.Sequential(nn.Identity()), "no Linear layer"),
    (nn.Linear(4, 2), "got Linear"),
])
def test_unsupported_models_are_rejected(model, match):
    with pytest.raises(ValueError, match=match):
        FusedTrainer(model, lr=0.1)


def test_unsupported_settings_are_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        FusedTrainer("model")
    with pytest.raises(TypeError, match="float32 or float64"):
        FusedTrainer(stock_mlp().half())
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedTrainer(stock_mlp(), lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        FusedTrainer(stock_mlp(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Invalid momentum"):
        FusedTrainer(stock_mlp(), lr=0.1, momentum=-0.5)


def test_op_rejects_mismatched_workspace_and_chain():
    op = torch.ops.mnist_fast
    w0, b0, w1, b1 = torch.randn(5, 4), torch.randn(5), torch.randn(3, 6), torch.randn(3)
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="layer 1 expects 6 input features but the previous layer gives 5"):
        op.train_step_workspace(x, [w0, b0, w1, b1])
    w1 = torch.randn(3, 5)
    ws = op.train_step_workspace(x, [w0, b0, w1, b1])
    with pytest.raises(ValueError, match="workspace tensor 0"):
        op.train_step_sgd(torch.randn(3, 4), torch.tensor([0, 1, 2]), [w0, b0, w1, b1], [], ws, 0.1, 0.0, 0.0, 0.0,
                          False, False, -100, 0.0)
    with pytest.raises(ValueError, match="no momentum buffers"):
        op.train_step_sgd(x, y, [w0, b0, w1, b1], [w0.clone()], ws, 0.1, 0.0, 0.0, 0.0, False, False, -100, 0.0)
    with pytest.raises(ValueError, match="one momentum buffer per parameter"):
        op.train_step_sgd(x, y, [w0, b0, w1, b1], [w0.clone()], ws, 0.1, 0.9, 0.0, 0.0, False, False, -100, 0.0)
    with pytest.raises(ValueError, match="bias 1"):
        op.train_step_sgd(x, y, [w0, b0, w1, torch.randn(4)], [], ws, 0.1, 0.0, 0.0, 0.0, False, False, -100, 0.0)


# ---- the op ----

def test_opcheck():
    torch.manual_seed(0)
    params = [torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64),
              torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    ws = torch.ops.mnist_fast.train_step_workspace(x, params)
    bufs = [torch.zeros_like(p) for p in params]
    opcheck(torch.ops.mnist_fast.train_step_sgd.default,
            (x, y, params, bufs, ws, 0.1, 0.9, 0.0, 1e-3, True, False, -100, 0.1))
    opcheck(torch.ops.mnist_fast.train_step_sgd.default,
            (x, y, [p.requires_grad_() for p in params], [], ws, 0.1, 0.0, 0.0, 0.0, False, False, -100, 0.0))


# ---- found in review ----

def _small_mlp():
    torch.manual_seed(0)
    return stock_mlp((12, 9, 5))


def test_frozen_parameters_are_left_as_stock_sgd_leaves_them():
    # (Frozen and unfrozen mid-run: test_trainer_optimizer.py.)
    model = _small_mlp()
    reference = copy.deepcopy(model)
    model[0].weight.requires_grad_(False)
    reference[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9, weight_decay=0.1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    for _ in range(3):
        trainer.step(x, y)
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
    assert torch.equal(model[0].weight, frozen)
    assert_same_params(model, reference, rtol=1e-5, atol=1e-6)
    assert trainer.state_dict()["state"].keys() == sgd.state_dict()["state"].keys() == {1, 2, 3}


def test_ignored_rows_are_not_counted_correct():
    model = _small_mlp()
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([100.0, 0, 0, 0, 0]))  # every row predicts class 0
    labels = torch.tensor([0, 0, 0, 1, 0])
    _, correct = FusedTrainer(model, lr=0.0, ignore_index=0).step(torch.randn(5, 12), labels)
    assert correct == 0  # the four rows labelled 0 are ignored; the fifth is wrong
    _, correct = FusedTrainer(model, lr=0.0).step(torch.randn(5, 12), labels)
    assert correct == 4


def test_a_step_under_inference_mode_does_not_break_later_steps():
    trainer = FusedTrainer(_small_mlp(), lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    with torch.inference_mode():
        trainer.step(x, y)
    trainer.step(x, y)


def test_momentum_state_follows_a_cast_model_like_sgd():
    model = _small_mlp()
    reference = copy.deepcopy(model)
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        reference.to(dtype)
        trainer.step(x.to(dtype), y)
        sgd.zero_grad()
        F.cross_entropy(reference(x.to(dtype)), y).backward()
        sgd.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_uint8_labels_and_mismatched_images():
    trainer = FusedTrainer(_small_mlp(), lr=0.1)
    x = torch.randn(6, 12)
    trainer.step(x, torch.randint(0, 5, (6,), dtype=torch.uint8))
    with pytest.raises(TypeError, match="FusedTrainer.step: expected images of the parameters' dtype"):
        trainer.step(x.double(), torch.randint(0, 5, (6,)))


@pytest.fixture
def intra_op_threads():
    """torch.set_num_threads for the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("sizes", [(784, 32, 16, 10), (20, 10), (20, 48, 40, 24, 10), (20, 8, 12, 10)],
                         ids=["mlp", "one-layer", "deep", "narrow-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_split_between_threads_matches_one_thread(intra_op_threads, sizes, dtype):
    # The CPU step splits rows and features between threads: the same math in another rounding
    # order, and always the same order for a given thread count. Batches of uneven splits included
    # (37 rows: blocks of 8; 16: the smallest that splits; 9: one thread); the first layer's
    # forward goes by features for the wide first layers, by rows for "narrow-first" and one layer.
    torch.manual_seed(0)
    base = models.stock_mlp(sizes).to(dtype)
    batches = make_batches([64, 37, 16, 9, 64], in_shape=(sizes[0],), dtype=dtype)
    batches[1][1][::5] = -100
    config = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    runs = {}
    for name, threads in [("one", 1), ("two", 2), ("two again", 2), ("three", 3)]:
        intra_op_threads(threads)
        model = fuse(copy.deepcopy(base))
        losses, correct = fused_run(FusedTrainer(model, label_smoothing=0.1, **config), batches)
        runs[name] = (torch.stack(losses), correct, [p.detach().clone() for p in model.parameters()])
    tol = STEP_TOL[dtype]
    for name in ("two", "three"):
        torch.testing.assert_close(runs[name][0], runs["one"][0], **tol)
        assert runs[name][1] == runs["one"][1]
        for p, q in zip(runs[name][2], runs["one"][2]):
            torch.testing.assert_close(p, q, **tol)
    # deterministic for a fixed thread count: bit for bit
    assert torch.equal(runs["two"][0], runs["two again"][0])
    assert all(torch.equal(p, q) for p, q in zip(runs["two"][2], runs["two again"][2]))


def test_gradients_split_between_threads_match_one_thread(intra_op_threads):
    # train_step_grads (Adam's and DDP's step) on two threads: the gradients of one.
    torch.manual_seed(0)
    params = [p.detach() for p in models.stock_mlp((784, 32, 16, 10)).parameters()]
    x, y = make_batches([64], in_shape=(784,))[0]
    grads = {}
    for threads in (1, 2):
        intra_op_threads(threads)
        workspace = torch.ops.mnist_fast.train_step_workspace(x, params)
        loss, correct = torch.ops.mnist_fast.train_step_grads(x, y, params, workspace, -100, 0.0)
        grads[threads] = (loss, correct, [w.clone() for w in workspace[-len(params):]])
    torch.testing.assert_close(grads[2][0], grads[1][0], rtol=1e-6, atol=1e-7)
    assert int(grads[2][1]) == int(grads[1][1])
    for g2, g1 in zip(grads[2][2], grads[1][2]):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 2])
def test_step_computes_in_the_callers_denormal_mode_on_every_thread(intra_op_threads, flush_denormal, threads):
    # torch.set_flush_denormal(True) (the mode JAX/XLA computes in on the CPU) holds for the whole
    # step, on each of its threads, and so does turning it off again. Inputs of 1e-39 (a float32 denormal) make the first weight's
    # grad dZ^T x denormal where denormals are computed, and exactly 0 where they are flushed; its
    # rows are split between the workers.
    torch.manual_seed(0)
    params = [p.detach() for p in models.stock_mlp((20, 32, 10)).parameters()]
    params[1].fill_(0.1)  # every hidden unit active (the input is ~0): no row of the grad is 0 for that
    x, y = torch.full((64, 20), 1e-39), torch.randint(0, 10, (64,))
    intra_op_threads(threads)

    def first_weight_grad():
        workspace = torch.ops.mnist_fast.train_step_workspace(x, params)
        torch.ops.mnist_fast.train_step_grads(x, y, params, workspace, -100, 0.0)
        return workspace[-len(params)]

    assert (first_weight_grad() != 0).any(dim=1).all()  # IEEE: every row has its denormals (the workers exist now)
    flush_denormal(True)
    assert torch.equal(first_weight_grad(), torch.zeros(32, 20))
    flush_denormal(False)
    assert (first_weight_grad() != 0).any(dim=1).all()
