"""FusedTrainer(optimizer='adam'/'adamw') and the adam_update op: the same training as torch.optim.Adam/AdamW."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from mnist_fast.nn import fuse
from mnist_fast.trainer import FusedTrainer

from helpers import TOL


def stock_mlp(sizes=(784, 32, 16, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_batches(batch_sizes, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g))
            for n in batch_sizes]


def stock_run(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x.flatten(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def fused_run(trainer, batches):
    return torch.stack([trainer.step(x, y)[0] for x, y in batches])


def tol(dtype):
    # float32: the fused step's gradients differ from stock's in rounding (GEMM blocking, sums), and
    # Adam's m / sqrt(v) turns a gradient's relative error into the same relative error of a whole
    # step (~lr); after a few steps at lr 1e-2 that is up to ~1e-6 absolute. The update itself is
    # checked on identical gradients in test_update_matches_stock_on_the_same_gradients.
    return TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def assert_close_params(a, b, dtype):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol(dtype), msg=lambda m: f"{name}: {m}")


CONFIGS = [
    ("adam", dict(lr=1e-3)),
    ("adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.3, 0.5), eps=1e-3)),  # 1 - beta1 > 0.5: lerp's other formula
    ("adamw", dict(lr=1e-2)),                              # AdamW's default weight decay, 1e-2
    ("adamw", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))),
]
STOCK = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@pytest.mark.parametrize("optimizer, config", CONFIGS, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_stock_adam_after_several_steps(optimizer, config, dtype):
    torch.manual_seed(0)
    ref = stock_mlp().to(dtype)
    model = fuse(copy.deepcopy(ref))
    batches = make_batches([32, 32, 17, 32, 32, 5, 32], dtype)
    ref_losses = stock_run(ref, STOCK[optimizer](ref.parameters(), **config), batches)
    trainer = FusedTrainer(model, optimizer=optimizer, **config)
    losses = fused_run(trainer, batches)
    torch.testing.assert_close(losses, ref_losses, **tol(dtype))
    assert_close_params(model, ref, dtype)
    assert not torch.equal(next(model.parameters()), next(stock_mlp().to(dtype).parameters()))


@pytest.mark.parametrize("optimizer, config", CONFIGS, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_matches_stock_on_the_same_gradients(optimizer, config, dtype):
    # The op alone, given the gradients stock sees: the arithmetic of torch.optim's single-tensor path.
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, 5, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)]
    ref = [p.clone().requires_grad_() for p in params]
    stock = STOCK[optimizer](ref, foreach=False, **config)
    defaults = stock.defaults
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=g, dtype=dtype) * 10.0 ** (step - 3) for p in params]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        stock.step()
        torch.ops.mnist_fast.adam_update(params, grads, m, v, step, defaults["lr"], *defaults["betas"],
                                         defaults["eps"], defaults["weight_decay"], optimizer == "adamw")
    # Bit for bit: the kernel takes torch's roundings (its FMAs, its MKL sqrt); tests/test_adam_update.py
    # checks denormal states too.
    for p, r in zip(params, ref):
        assert torch.equal(p, r.detach())
    for k, p in enumerate(ref):
        assert torch.equal(m[k], stock.state[p]["exp_avg"])
        assert torch.equal(v[k], stock.state[p]["exp_avg_sq"])


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_state_dict_is_stock_format_both_ways(optimizer):
    dtype = torch.float64
    torch.manual_seed(0)
    ref = stock_mlp().to(dtype)
    model = fuse(copy.deepcopy(ref))
    batches = make_batches([16] * 6, dtype)
    config = dict(lr=1e-2, weight_decay=1e-2)
    trainer = FusedTrainer(model, optimizer=optimizer, **config)
    fused_run(trainer, batches[:3])
    # FusedTrainer -> stock: the stock optimizer continues the same run.
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q)
    stock = STOCK[optimizer](ref.parameters(), **config)
    stock.load_state_dict(copy.deepcopy(trainer.state_dict()))
    assert stock.state_dict()["param_groups"] == trainer.state_dict()["param_groups"]
    stock_run(ref, stock, batches[3:])
    fused_run(trainer, batches[3:])
    assert_close_params(model, ref, dtype)
    # stock -> FusedTrainer, into a fresh trainer with other options: everything comes from the state.
    resumed = fuse(copy.deepcopy(ref))
    again = FusedTrainer(resumed, lr=0.5, optimizer=optimizer, weight_decay=0.0)
    again.load_state_dict(copy.deepcopy(stock.state_dict()))
    assert again.lr == 1e-2 and again.weight_decay == 1e-2
    stock_run(ref, stock, batches[:2])
    fused_run(again, batches[:2])
    assert_close_params(resumed, ref, dtype)
    assert float(stock.state_dict()["state"][0]["step"]) == float(again.state_dict()["state"][0]["step"]) == 8


def test_bad_options_and_states_are_refused():
    model = stock_mlp()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FusedTrainer(model, optimizer="rmsprop")
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0"):
        FusedTrainer(model, optimizer="adam", betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        FusedTrainer(model, optimizer="adam", betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        FusedTrainer(model, optimizer="adamw", eps=-1.0)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedTrainer(model, lr=-1.0, optimizer="adam")
    with pytest.raises(ValueError, match="SGD options"):
        FusedTrainer(model, momentum=0.9, optimizer="adam")
    trainer = FusedTrainer(model, optimizer="adam")
    with pytest.raises(IndexError, match=r"Target 10 is out of bounds for 10 classes \(sample 5, step 1\)"):
        trainer.fit_epoch(torch.randn(8, 784), torch.tensor([0, 1, 2, 3, 4, 10, 6, 7]), 4, order=torch.arange(8))
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="needs an Adam state_dict"):
        trainer.load_state_dict(sgd_state)
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="decoupled_weight_decay differs"):
        trainer.load_state_dict(adamw_state)
    amsgrad = torch.optim.Adam(model.parameters(), amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        trainer.load_state_dict(amsgrad)
    # A bad batch leaves no state behind.
    with pytest.raises(IndexError):
        trainer.step(torch.randn(4, 784), torch.tensor([0, 1, 2, 10]))
    assert trainer.state_dict()["state"] == {}


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fit_epoch_is_the_step_loop(optimizer):
    images, labels = make_batches([100], torch.float32)[0]
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    a = stock_mlp()
    b = copy.deepcopy(a)
    looped, fitted = FusedTrainer(a, optimizer=optimizer, lr=1e-2), FusedTrainer(b, optimizer=optimizer, lr=1e-2)
    losses = torch.stack([looped.step(images[order[i:i + 32]], labels[order[i:i + 32]])[0] for i in range(0, 100, 32)])
    calls = []
    fit_losses, correct = fitted.fit_epoch(images, labels, 32, order=order, lr_schedule=[1e-2] * 4, chunk=3,
                                           on_chunk=lambda n, l, c: calls.append((n, l.shape[0])))
    assert torch.equal(fit_losses, losses) and correct.shape == (4,) and calls == [(96, 3), (4, 1)]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert float(fitted.state_dict()["state"][0]["step"]) == 4


def test_op_checks_and_opcheck():
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    op = torch.ops.mnist_fast.adam_update
    with pytest.raises(ValueError, match="one gradient per parameter"):
        op(params, grads[:1], m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="exp_avg_sq 1 to be contiguous of shape"):
        op(params, grads, m, [v[0], torch.zeros(5, dtype=torch.float64)], 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(TypeError, match="exp_avg 0 of its parameter's dtype"):
        op(params, grads, [m[0].float(), m[1]], v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="step counts from 1"):
        op(params, grads, m, v, 0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    opcheck(op.default, (params, grads, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, True))
    opcheck(op.default, (params, grads, m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 1e-2, False))


@pytest.mark.parametrize("optimizer, options", [("adam", {}), ("adam", dict(weight_decay=1e-2, betas=(0.5, 0.9))),
                                                ("adamw", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_epoch_runs_the_epoch_op_as_the_step_loop(optimizer, options, dtype, monkeypatch):
    from mnist_fast import _epoch
    calls = []
    op = _epoch._train_epoch_adam
    monkeypatch.setattr(_epoch, "_train_epoch_adam", lambda *args: calls.append(1) or op(*args))
    images, labels = torch.randn(150, 784, dtype=dtype), torch.randint(0, 10, (150,))
    torch.manual_seed(0)
    a = stock_mlp().to(dtype)
    b = copy.deepcopy(a)
    looped = FusedTrainer(a, optimizer=optimizer, lr=1e-2, **options)
    fitted = FusedTrainer(b, optimizer=optimizer, lr=1e-2, **options)
    for epoch in range(2):  # the second from the state the first left
        order = torch.randperm(150, generator=torch.Generator().manual_seed(epoch))
        lrs = [1e-2 / (1 + s) for s in range(5)]
        losses = []
        for s, i in enumerate(range(0, 150, 32)):
            looped.lr = lrs[s]
            losses.append(looped.step(images[order[i:i + 32]], labels[order[i:i + 32]])[0])
        fit_losses, _ = fitted.fit_epoch(images, labels, 32, order=order, lr_schedule=lrs, chunk=2 + epoch)
        assert torch.equal(fit_losses, torch.stack(losses))
    assert len(calls) == 3 + 2
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    ours, ref = fitted.state_dict()["state"], looped.state_dict()["state"]
    for k in ref:
        assert float(ours[k]["step"]) == float(ref[k]["step"]) == 10
        assert torch.equal(ours[k]["exp_avg"], ref[k]["exp_avg"]) and torch.equal(ours[k]["exp_avg_sq"],
                                                                                  ref[k]["exp_avg_sq"])


def test_adam_epoch_with_a_bad_target_leaves_no_state():
    trainer = FusedTrainer(stock_mlp(), optimizer="adam")
    before = copy.deepcopy(trainer.state_dict())
    for chunk in (None, 1):
        with pytest.raises(IndexError, match="Target 10 is out of bounds"):
            trainer.fit_epoch(torch.randn(8, 784), torch.tensor([0, 1, 2, 3, 4, 5, 6, 10]), 4,
                              order=torch.arange(8), chunk=chunk)
    assert trainer.state_dict() == before and trainer.state == {}


def test_adam_state_at_different_step_counts_takes_the_step_loop():
    # a layer frozen for a step lags one step behind: fit_epoch is then the loop of steps, as stock Adam
    images, labels = torch.randn(64, 784), torch.randint(0, 10, (64,))
    torch.manual_seed(0)
    a = stock_mlp()
    b = copy.deepcopy(a)
    trainers = [FusedTrainer(m, optimizer="adam", lr=1e-2) for m in (a, b)]
    for model, trainer in zip((a, b), trainers):
        model[0].weight.requires_grad_(False)
        trainer.step(images[:32], labels[:32])
        model[0].weight.requires_grad_(True)
    order = torch.arange(64)
    ref = torch.stack([trainers[0].step(images[i:i + 16], labels[i:i + 16])[0] for i in range(0, 64, 16)])
    losses, _ = trainers[1].fit_epoch(images, labels, 16, order=order)
    assert torch.equal(losses, ref)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_adam_epoch_op_checks_and_opcheck():
    params = [p.detach().double() for p in stock_mlp().parameters()]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    x, y = torch.randn(9, 784, dtype=torch.float64), torch.randint(0, 10, (9,))
    lr = torch.full((3,), 1e-3, dtype=torch.float64)
    op = torch.ops.mnist_fast.train_epoch_adam
    with pytest.raises(ValueError, match="step .* must be >= 0"):
        op(x, y, torch.arange(9), 4, lr, params, m, v, -1, 0.9, 0.999, 1e-8, 0.0, False, -100, 0.0)
    with pytest.raises(ValueError, match="exp_avg_sq 1 to be contiguous of shape"):
        op(x, y, torch.arange(9), 4, lr, params, m, [v[0], torch.zeros(3, dtype=torch.float64)] + v[2:], 0, 0.9,
           0.999, 1e-8, 0.0, False, -100, 0.0)
    assert all(not t.any() for t in m + v)
    opcheck(op.default, (x, y, torch.randperm(9), 4, lr, params, m, v, 2, 0.9, 0.999, 1e-8, 1e-2, True, -100, 0.1))
