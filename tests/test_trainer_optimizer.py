"""FusedTrainer as a torch.optim.Optimizer: param_groups that lr schedulers drive, the stock state_dict
format through the Optimizer machinery, step(images, labels) without a closure, a model whose
parameters are frozen or replaced after construction; and the train_step_grads op it uses for that."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook

from mnist_fast import models
from mnist_fast.trainer import FusedTrainer

from helpers import STEP_TOL, TOL, assert_same_params

STOCK = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def mlp(sizes=(20, 12, 8, 4), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return models.stock_mlp(sizes).to(dtype)


def batches(n, rows=8, features=20, classes=4, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, features, generator=g, dtype=dtype), torch.randint(0, classes, (rows,), generator=g))
            for _ in range(n)]


def stock_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def pair(optimizer="sgd", dtype=torch.float32, **config):
    """(stock model, its stock optimizer, a copy of the model, its FusedTrainer) with the same options."""
    ref = mlp(dtype=dtype)
    model = copy.deepcopy(ref)
    opt = STOCK[optimizer](ref.parameters(), **config)
    return ref, opt, model, FusedTrainer(model, optimizer=optimizer, **config)


# ---- an Optimizer ----

def test_is_an_optimizer_with_sgds_group():
    ref, opt, model, trainer = pair(lr=0.05, momentum=0.9, weight_decay=1e-3)
    assert isinstance(trainer, torch.optim.Optimizer)
    assert len(trainer.param_groups) == 1
    group = trainer.param_groups[0]
    assert group["params"] == list(model.parameters())
    assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in opt.param_groups[0].items()
                                                                 if k != "params"}
    # trainer.lr and friends are that group's entries, both ways.
    trainer.lr = 0.01
    assert group["lr"] == 0.01
    group["momentum"] = 0.5
    assert trainer.momentum == 0.5
    with pytest.raises(AttributeError, match="has no option 'betas'"):
        trainer.betas
    adam = FusedTrainer(mlp(), optimizer="adam", lr=1e-3)
    assert adam.betas == (0.9, 0.999) and adam.eps == 1e-8
    with pytest.raises(AttributeError, match="optimizer='adam'.* has no option 'momentum'"):
        adam.momentum = 0.9
    with pytest.raises(ValueError, match="one parameter group"):
        trainer.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


@pytest.mark.parametrize("schedule", [
    lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6),
    lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=8, cycle_momentum=False),
    lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=8),  # and momentum cycling: it reads the group too
    lambda o: lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
], ids=["StepLR", "CosineAnnealingLR", "OneCycleLR", "OneCycleLR+momentum", "LambdaLR"])
def test_lr_schedulers_drive_it_as_they_drive_sgd(schedule):
    ref, opt, model, trainer = pair(lr=0.1, momentum=0.9)
    stock_schedule, fused_schedule = schedule(opt), schedule(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for x, y in batches(8):
            stock_step(ref, opt, x, y)
            trainer.step(x, y)
            stock_schedule.step()
            fused_schedule.step()
            assert trainer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
            assert trainer.momentum == opt.param_groups[0]["momentum"]
    assert_same_params(model, ref, **STEP_TOL[torch.float32])
    assert fused_schedule.get_last_lr() == stock_schedule.get_last_lr()


def test_a_scheduler_drives_adam_too():
    ref, opt, model, trainer = pair("adam", lr=1e-2)
    stock_schedule = lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    fused_schedule = lr_scheduler.StepLR(trainer, step_size=1, gamma=0.7)
    for x, y in batches(4):
        stock_step(ref, opt, x, y)
        trainer.step(x, y)
        stock_schedule.step()
        fused_schedule.step()
    assert trainer.lr == opt.param_groups[0]["lr"]
    assert_same_params(model, ref, rtol=1e-5, atol=1e-5)


def test_step_takes_the_batch_not_a_closure():
    _, _, model, trainer = pair(lr=0.1)
    before = copy.deepcopy(model.state_dict())
    for call in (lambda: trainer.step(lambda: 0.0), lambda: trainer.step(), lambda: trainer.step(closure=lambda: 0.0)):
        with pytest.raises(TypeError, match=r"step\(images, labels\) takes the batch"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_zero_grad_and_hooks_are_the_optimizers():
    ref, opt, model, trainer = pair(lr=0.1, momentum=0.9)
    (x, y), = batches(1)
    F.cross_entropy(model(x), y).backward()  # a user's own backward pass: the step ignores .grad
    trainer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    calls = []
    trainer.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    trainer.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    loss, correct = trainer.step(x, y)
    stock_step(ref, opt, x, y)
    assert calls == ["pre", "post"] and loss.shape == () and isinstance(correct, int)
    assert_same_params(model, ref, **STEP_TOL[torch.float32])
    # torch.optim's global step hooks, and the profiler's range of a step (without them step skips that wrapper).
    bare = FusedTrainer(mlp(), lr=0.1)
    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(o))
    try:
        bare.step(x, y)
    finally:
        handle.remove()
    assert calls[-1] is bare
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        bare.step(x, y)
    assert "Optimizer.step#FusedTrainer.step" in {event.name for event in profile.events()}


def test_deepcopy_continues_the_same_run():
    _, _, model, trainer = pair(lr=0.1, momentum=0.9)
    data = batches(4)
    for x, y in data[:2]:
        trainer.step(x, y)
    twin = copy.deepcopy(trainer)
    assert twin.model is not model and twin.param_groups[0]["params"] == list(twin.model.parameters())
    for x, y in data[2:]:
        trainer.step(x, y)
        twin.step(x, y)
    assert_same_params(twin.model, model, rtol=0, atol=0)


# ---- state_dict: the Optimizer machinery, the stock format ----

@pytest.mark.parametrize("optimizer, config", [("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                               ("sgd", dict(lr=0.05)),
                                               ("adam", dict(lr=1e-2, weight_decay=1e-2)),
                                               ("adamw", dict(lr=1e-2))])
def test_state_dict_goes_both_ways_with_the_stock_optimizer(optimizer, config):
    ref, opt, model, trainer = pair(optimizer, torch.float64, **config)
    data = batches(6, dtype=torch.float64)
    schedule = lr_scheduler.StepLR(trainer, step_size=1, gamma=0.9)  # adds initial_lr to the group, as for stock
    for x, y in data[:3]:
        trainer.step(x, y)
        schedule.step()
    saved = copy.deepcopy(trainer.state_dict())
    # -> stock: a fresh torch.optim optimizer continues the run.
    stock_model = copy.deepcopy(model)
    stock = STOCK[optimizer](stock_model.parameters(), lr=1.0)
    stock.load_state_dict(copy.deepcopy(saved))
    assert stock.state_dict()["param_groups"] == saved["param_groups"]
    # <- stock: a fresh trainer, other options, takes everything from a stock state_dict.
    fused_model = copy.deepcopy(model)
    fused = FusedTrainer(fused_model, lr=1.0, optimizer=optimizer)
    fused.load_state_dict(stock.state_dict())
    assert fused.state_dict()["param_groups"] == saved["param_groups"]
    for x, y in data[3:]:
        trainer.step(x, y)
        stock_step(stock_model, stock, x, y)
        fused.step(x, y)
    assert_same_params(stock_model, model, **TOL[torch.float64])
    assert_same_params(fused_model, model, **TOL[torch.float64])


def test_load_state_dict_checks_everything_before_changing_anything():
    _, _, model, trainer = pair(lr=0.1, momentum=0.9)
    trainer.step(*batches(1)[0])
    saved = copy.deepcopy(trainer.state_dict())
    for change, error, match in [
        (lambda sd: sd["param_groups"][0].update(momentum=-1.0), ValueError, "Invalid momentum value"),
        (lambda sd: sd["param_groups"][0].update(maximize=True), ValueError, "maximize=True is not supported"),
        (lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3)), ValueError, r"momentum buffer of shape \(3,\)"),
        (lambda sd: sd["param_groups"][0].update(betas=(0.9, 0.99)), ValueError, "needs an SGD state_dict"),
    ]:
        bad = copy.deepcopy(saved)
        bad["param_groups"][0]["lr"] = 7.0
        change(bad)
        with pytest.raises(error, match=match):
            trainer.load_state_dict(bad)
        assert trainer.lr == 0.1
        assert torch.equal(trainer.state_dict()["state"][0]["momentum_buffer"], saved["state"][0]["momentum_buffer"])


def test_a_group_set_to_maximize_is_refused():
    _, _, _, trainer = pair(lr=0.1)
    trainer.param_groups[0]["maximize"] = True
    with pytest.raises(ValueError, match="maximize=True is not supported"):
        trainer.step(*batches(1)[0])


# ---- following the model ----

@pytest.mark.parametrize("optimizer, config", [("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
                                               ("sgd", dict(lr=0.1)),
                                               ("adam", dict(lr=1e-2, weight_decay=1e-2))])
def test_a_frozen_parameter_is_handled_as_the_stock_optimizer_does(optimizer, config):
    # Frozen from the start, frozen halfway and unfrozen again: the same parameters, the same state.
    ref, opt, model, trainer = pair(optimizer, torch.float64, **config)
    fused_params, stock_params = list(model.parameters()), list(ref.parameters())
    fused_params[1].requires_grad_(False)
    stock_params[1].requires_grad_(False)
    for i, (x, y) in enumerate(batches(9, dtype=torch.float64)):
        if i in (3, 6):  # layer 1's weight: frozen for steps 3-5
            for p in (fused_params[2], stock_params[2]):
                p.requires_grad_(i == 6)
        if i == 6:  # and the first bias trains from step 6 on: no state until then
            fused_params[1].requires_grad_(True)
            stock_params[1].requires_grad_(True)
        frozen = [p.detach().clone() for p in fused_params if not p.requires_grad]
        stock_step(ref, opt, x, y)
        trainer.step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(frozen, [p for p in fused_params if not p.requires_grad]))
    assert_same_params(model, ref, **TOL[torch.float64])
    mine, theirs = trainer.state_dict(), opt.state_dict()
    assert mine["state"].keys() == theirs["state"].keys()
    for k in theirs["state"]:
        for name, value in theirs["state"][k].items():
            torch.testing.assert_close(mine["state"][k][name], value, **TOL[torch.float64])


def test_frozen_at_construction_trains_the_rest_and_fit_epoch_too():
    ref, opt, model, trainer = pair(lr=0.1, momentum=0.9)
    ref[0].weight.requires_grad_(False)
    model[0].weight.requires_grad_(False)
    images, labels = torch.randn(40, 20), torch.randint(0, 4, (40,))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for start in range(0, 40, 16):
        index = order[start:start + 16]
        stock_step(ref, opt, images[index], labels[index])
    losses, correct = trainer.fit_epoch(images, labels, 16, order=order, chunk=2)
    assert losses.shape == correct.shape == (3,)
    assert_same_params(model, ref, **STEP_TOL[torch.float32])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_update_after_the_grads_op_starts_under_inference_mode_too(optimizer):
    # The state a first step makes under inference_mode must be writable by the steps after it.
    ref, opt, model, trainer = pair(optimizer, lr=0.05, **({"momentum": 0.9} if optimizer == "sgd" else {}))
    model[0].bias.requires_grad_(False)  # the path through train_step_grads for SGD too
    ref[0].bias.requires_grad_(False)
    for i, (x, y) in enumerate(batches(3)):
        if i == 0:
            with torch.inference_mode():
                trainer.step(x, y)
        else:
            trainer.step(x, y)
        stock_step(ref, opt, x, y)
    assert_same_params(model, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("replace", ["load_state_dict(assign=True)", "new nn.Parameter"])
def test_a_replaced_parameter_is_refused_at_the_next_step(replace):
    _, _, model, trainer = pair(lr=0.1, momentum=0.9)
    data = batches(3)
    trainer.step(*data[0])
    if replace == "new nn.Parameter":
        model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    else:
        model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"parameter '(0|2)\.weight' was replaced after the trainer was built"):
        trainer.step(*data[1])
    with pytest.raises(RuntimeError, match="replaced"):
        trainer.fit_epoch(torch.randn(8, 20), torch.zeros(8, dtype=torch.int64), 4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # What the message suggests: a new trainer for the model, with the old one's state.
    again = FusedTrainer(model, lr=1.0)
    again.load_state_dict(trainer.state_dict())
    again.step(*data[1])
    assert not torch.equal(model[2].weight, before["2.weight"])


# ---- the train_step_grads op ----

def test_grads_op_gives_the_steps_gradients_and_leaves_the_parameters():
    torch.manual_seed(0)
    params = [p.detach().double() for p in mlp((6, 5, 3)).parameters()]
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0, -100, 1])
    op = torch.ops.mnist_fast
    ws = op.train_step_workspace(x, params)
    before = [p.clone() for p in params]
    loss, correct = op.train_step_grads(x, y, params, ws, -100, 0.1)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    leaves = [p.clone().requires_grad_() for p in params]
    logits = F.linear(F.relu(F.linear(x, leaves[0], leaves[1])), leaves[2], leaves[3])
    ref_loss = F.cross_entropy(logits, y, label_smoothing=0.1)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL[torch.float64])
    assert int(correct) == int(((logits.argmax(1) == y) & (y != -100)).sum())
    for g, leaf in zip(ws[-4:], leaves):
        torch.testing.assert_close(g, leaf.grad, **TOL[torch.float64])
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        op.train_step_grads(x, torch.tensor([0, 1, 2, 3, 0, 0, 0]), params, ws, -100, 0.0)
    with pytest.raises(ValueError, match="mnist_fast.train_step_grads: expected a workspace of"):
        op.train_step_grads(x, y, params, ws[:-1], -100, 0.0)
    opcheck(op.train_step_grads.default, (x, y, params, ws, -100, 0.1))
    opcheck(op.train_step_grads.default, (x, y, [p.requires_grad_() for p in params], ws, -100, 0.0))
