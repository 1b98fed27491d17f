"""FusedTrainer.fit_epoch and the train_epoch_sgd op: the step loop's training, bit for bit, in a few calls."""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from mnist_fast import data as mnist_data
from mnist_fast import train
from mnist_fast.trainer import FusedTrainer

from helpers import TOL

SIZES = (784, 32, 16, 10)
CONFIGS = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
]


def mlp(sizes=SIZES, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device, dtype)


def dataset(n, dtype=torch.float32, device="cpu", classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 28, 28, generator=g, dtype=dtype).to(device),
            torch.randint(0, classes, (n,), generator=g).to(device))


def step_loop(trainer, images, labels, batch_size, order, lrs=None):
    """The reference: the documented loop of trainer.step calls."""
    losses, correct = [], []
    for s, start in enumerate(range(0, len(order), batch_size)):
        index = order[start:start + batch_size].to(images.device)
        if lrs is not None:
            trainer.lr = float(lrs[s])
        loss, c = trainer.step(images.index_select(0, index), labels.index_select(0, index))
        losses.append(loss)
        correct.append(c)
    return torch.stack(losses), torch.tensor(correct)


def assert_equal_state(a, b, trainer_a=None, trainer_b=None):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item()}"
    if trainer_a is not None:
        sa, sb = trainer_a.state_dict()["state"], trainer_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), f"momentum buffer {k}"


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---- the same run as the step loop ----

@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_epoch_is_the_step_loop_bit_for_bit(config, dtype):
    images, labels = dataset(300, dtype)  # 4 batches of 64 and a last one of 44
    ref, model = mlp(dtype=dtype), mlp(dtype=dtype)
    loop_trainer, trainer = FusedTrainer(ref, **config), FusedTrainer(model, **config)
    for epoch in range(2):  # the second epoch starts from momentum buffers
        ref_losses, ref_correct = step_loop(loop_trainer, images, labels, 64, torch.randperm(300, generator=seeded(epoch)))
        losses, correct = trainer.fit_epoch(images, labels, 64, seeded(epoch))
        assert torch.equal(losses, ref_losses)
        assert torch.equal(correct, ref_correct)
        assert losses.dtype == dtype and correct.dtype == torch.int64 and losses.shape == (5,)
        assert_equal_state(model, ref, trainer, loop_trainer)


def test_fit_epoch_matches_stock_sgd():
    # Not only self-consistent: the same training as model + CrossEntropyLoss + torch.optim.SGD.
    images, labels = dataset(200, torch.float64)
    ref, model = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    config = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = torch.optim.SGD(ref.parameters(), **config)
    order = torch.randperm(200, generator=seeded(3))
    ref_losses = []
    for start in range(0, 200, 32):
        index = order[start:start + 32]
        loss = nn.functional.cross_entropy(ref(images[index].flatten(1)), labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.detach())
    losses, _ = FusedTrainer(model, **config).fit_epoch(images, labels, 32, seeded(3))
    torch.testing.assert_close(losses, torch.stack(ref_losses), **TOL[torch.float64])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float64])


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_chunks_change_nothing_and_report_progress(chunk):
    images, labels = dataset(300)
    ref, model = mlp(), mlp()
    config = dict(lr=0.05, momentum=0.9)
    ref_losses, ref_correct = FusedTrainer(ref, **config).fit_epoch(images, labels, 64, seeded(0))
    trainer = FusedTrainer(model, **config)
    calls = []
    losses, correct = trainer.fit_epoch(images, labels, 64, seeded(0), chunk=chunk,
                                        on_chunk=lambda n, l, c: calls.append((n, l.shape[0], c.sum().item())))
    assert torch.equal(losses, ref_losses) and torch.equal(correct, ref_correct)
    assert_equal_state(model, ref)
    assert sum(n for n, _, _ in calls) == 300
    assert [s for _, s, _ in calls] == [min(chunk, 5 - i) for i in range(0, 5, chunk)]
    assert sum(c for _, _, c in calls) == correct.sum().item()


def test_lr_schedule_is_one_learning_rate_per_step():
    images, labels = dataset(300)
    ref, model = mlp(), mlp()
    lrs = [0.1, 0.05, 0.0, 0.02, 0.01]
    loop_trainer, trainer = FusedTrainer(ref, lr=0.3, momentum=0.9), FusedTrainer(model, lr=0.3, momentum=0.9)
    step_loop(loop_trainer, images, labels, 64, torch.randperm(300, generator=seeded(0)), lrs)
    trainer.fit_epoch(images, labels, 64, seeded(0), lr_schedule=torch.tensor(lrs), chunk=2)
    assert_equal_state(model, ref, trainer, loop_trainer)
    assert trainer.lr == 0.3  # the schedule is for this epoch only


def test_given_order_ignore_index_label_smoothing_and_uint8_labels():
    images, labels = dataset(130)
    labels[::7] = -100
    ref, model = mlp(), mlp()
    config = dict(lr=0.05, momentum=0.9, label_smoothing=0.1, ignore_index=-100)
    order = torch.cat([torch.arange(129, -1, -1), torch.arange(0, 130, 3)])  # any index sequence, repeats too
    ref_out = step_loop(FusedTrainer(ref, **config), images, labels, 32, order)
    out = FusedTrainer(model, **config).fit_epoch(images, labels, 32, order=order)
    assert torch.equal(out[0], ref_out[0]) and torch.equal(out[1], ref_out[1])
    assert_equal_state(model, ref)

    clean = labels.clamp(min=0)
    a, b = mlp(), mlp()
    FusedTrainer(a, lr=0.1).fit_epoch(images, clean, 32, seeded(1))
    FusedTrainer(b, lr=0.1).fit_epoch(images, clean.to(torch.uint8), 32, seeded(1))
    assert_equal_state(a, b)


def test_resume_from_state_dict_is_bit_exact():
    images, labels = dataset(256)
    config = dict(lr=0.05, momentum=0.9, nesterov=True)
    straight = mlp()
    trainer = FusedTrainer(straight, **config)
    for epoch in range(2):
        trainer.fit_epoch(images, labels, 64, seeded(epoch))

    first = mlp()
    saved_trainer = FusedTrainer(first, **config)
    saved_trainer.fit_epoch(images, labels, 64, seeded(0))
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": saved_trainer.state_dict()})
    resumed = mlp(seed=5)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_trainer = FusedTrainer(resumed, lr=1.0)
    resumed_trainer.load_state_dict(checkpoint["optimizer"])
    resumed_trainer.fit_epoch(images, labels, 64, seeded(1))
    assert_equal_state(resumed, straight, resumed_trainer, trainer)


def test_step_and_fit_epoch_mix():
    images, labels = dataset(192)
    ref, model = mlp(), mlp()
    loop_trainer, trainer = FusedTrainer(ref, lr=0.05, momentum=0.9), FusedTrainer(model, lr=0.05, momentum=0.9)
    step_loop(loop_trainer, images, labels, 64, torch.arange(64))
    step_loop(loop_trainer, images, labels, 64, torch.randperm(192, generator=seeded(2)))
    trainer.step(images[:64], labels[:64])  # sets the momentum buffers: the epoch continues from them
    trainer.fit_epoch(images, labels, 64, seeded(2))
    assert_equal_state(model, ref, trainer, loop_trainer)


def test_empty_epoch_changes_nothing():
    images, labels = dataset(10)
    model, before = mlp(), mlp()
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9)
    losses, correct = trainer.fit_epoch(images, labels, 4, order=torch.empty(0, dtype=torch.int64))
    assert losses.shape == (0,) and correct.shape == (0,)
    assert_equal_state(model, before)
    assert trainer.state_dict()["state"] == {}


# ---- bad input: a clear exception, nothing trained ----

@pytest.mark.parametrize("change, error, match", [
    (dict(order=torch.tensor([0, 1, 40, 2])), IndexError, "index 40, out of range for 40 samples"),
    (dict(order=torch.tensor([0, -1])), IndexError, "index -1"),
    (dict(order=torch.zeros(2, 2, dtype=torch.int64)), ValueError, "1-D order"),
    (dict(order=torch.tensor([0.0, 1.0])), TypeError, "int64 order"),
    (dict(labels_at=(37, 10)), IndexError, r"Target 10 is out of bounds for 10 classes \(sample 37, step"),
    (dict(labels_at=(5, -3)), IndexError, "Target -3"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(chunk=0), ValueError, "chunk must be a positive number"),
    (dict(lr_schedule=[0.1, 0.1]), ValueError, "2 learning rates for 3 steps"),
    (dict(lr_schedule=[0.1, -0.1, 0.1]), ValueError, "Invalid learning rate: -0.1"),
    (dict(generator=torch.Generator(), order=torch.arange(40)), ValueError, "either an order or a generator"),
    (dict(images=torch.randn(40, 784, dtype=torch.float64)), TypeError, "parameters' dtype and device"),
    (dict(images=torch.randn(40)), ValueError, "images of shape"),
    (dict(labels=torch.zeros(39, dtype=torch.int64)), ValueError, r"labels of shape \(40,\)"),
    (dict(images=torch.randn(40, 700)), ValueError, "expects 784 input features"),
])
def test_bad_input_raises_before_any_update(change, error, match):
    images, labels = dataset(40)
    if "labels_at" in change:
        labels = labels.clone()
        i, v = change.pop("labels_at")
        labels[i] = v
    images, labels = change.pop("images", images), change.pop("labels", labels)
    batch_size = change.pop("batch_size", 16)
    if "order" not in change:
        change.setdefault("generator", seeded(0))
    model, before = mlp(), mlp()
    trainer = FusedTrainer(model, lr=0.1, momentum=0.9)
    with pytest.raises(error, match=match):
        trainer.fit_epoch(images, labels, batch_size, chunk=change.pop("chunk", 1), **change)
    assert_equal_state(model, before)
    assert trainer.state_dict()["state"] == {}  # no momentum state left behind


def test_a_bad_label_the_order_never_reaches_is_no_error():
    images, labels = dataset(40)
    labels = labels.clone()
    labels[39] = 10
    trainer = FusedTrainer(mlp(), lr=0.1, momentum=0.9)
    losses, _ = trainer.fit_epoch(images, labels, 16, order=torch.arange(39), chunk=1)
    assert losses.shape == (3,) and torch.isfinite(losses).all()


def test_op_checks_its_own_arguments():
    params = [p.detach() for p in mlp().parameters()]
    images, labels = dataset(8)
    x, order, lr = images.flatten(1), torch.arange(8), torch.full((2,), 0.1, dtype=torch.float64)
    op = torch.ops.mnist_fast.train_epoch_sgd

    def call(**kw):
        args = dict(images=x, labels=labels, order=order, batch_size=4, lr=lr)
        args.update(kw)
        return op(args["images"], args["labels"], args["order"], args["batch_size"], args["lr"], params, [],
                  0.0, 0.0, 0.0, False, False, -100, 0.0)

    with pytest.raises(TypeError, match="float64 lr schedule"):
        call(lr=lr.float())
    with pytest.raises(ValueError, match=r"lr on the CPU of shape \(2,\)"):
        call(lr=lr[:1])
    with pytest.raises(TypeError, match="labels of dtype int64"):
        call(labels=labels.int())
    with pytest.raises(ValueError, match="batch_size must be positive"):
        call(batch_size=0)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # the step's own checks still apply
        call(lr=torch.tensor([0.1, -1.0], dtype=torch.float64))
    # the order and every target of the call, before its first update
    before = [p.clone() for p in params]
    with pytest.raises(IndexError, match="order holds index 8, out of range for 8 samples"):
        call(order=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]))
    with pytest.raises(IndexError, match="order holds index -1, out of range"):
        call(order=torch.tensor([0, 1, 2, 3, 4, 5, -1, 7]))
    bad = labels.clone()
    bad[5] = 10
    with pytest.raises(IndexError, match=r"Target 10 is out of bounds for 10 classes \(sample 5, step 0\)"):
        call(labels=bad, order=torch.arange(7, -1, -1))  # sample 5 is the 3rd of the order: step 0
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    bad[5] = -100  # ignore_index is no class, and no error
    call(labels=bad, order=torch.arange(16)[::2] // 2)  # a strided order
    losses, correct = call()
    assert losses.shape == correct.shape == (2,)


def test_opcheck():
    params = [p.detach().double() for p in mlp((5, 6, 3)).parameters()]
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    lr = torch.full((3,), 0.1, dtype=torch.float64)
    bufs = [torch.zeros_like(p) for p in params]
    opcheck(torch.ops.mnist_fast.train_epoch_sgd.default,
            (x, y, torch.randperm(9), 4, lr, params, bufs, 0.9, 0.0, 1e-3, True, False, -100, 0.1))
    opcheck(torch.ops.mnist_fast.train_epoch_sgd.default,
            (x, y, torch.arange(9), 4, lr, [p.requires_grad_() for p in params], [], 0.0, 0.0, 0.0, False, False,
             -100, 0.0))


# ---- devices ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_epoch_on_each_device(device, dtype):
    images, labels = dataset(200, dtype, device)
    ref, model = mlp(dtype=dtype, device=device), mlp(dtype=dtype, device=device)
    config = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    loop_trainer, trainer = FusedTrainer(ref, **config), FusedTrainer(model, **config)
    ref_losses, ref_correct = step_loop(loop_trainer, images, labels, 64, torch.randperm(200, generator=seeded(0)))
    losses, correct = trainer.fit_epoch(images, labels, 64, seeded(0), chunk=2)
    assert losses.device == images.device
    assert torch.equal(losses, ref_losses) and torch.equal(correct.cpu(), ref_correct)
    assert_equal_state(model, ref, trainer, loop_trainer)
    bad = labels.clone()
    bad[150] = 10
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        trainer.fit_epoch(images, bad, 64, seeded(0))
    with pytest.raises(IndexError, match="out of range for 200 samples"):
        trainer.fit_epoch(images, labels, 64, order=torch.tensor([3, 200]))


# ---- the training CLI ----

def test_cli_epoch_of_fused_step_is_the_step_loop(monkeypatch):
    images, labels = dataset(300)
    batches = mnist_data.Batches(mnist_data.Split(images, labels), 64, seed=4)
    batches.set_epoch(2)
    ref, model = mlp(), mlp()
    loop_trainer, trainer = FusedTrainer(ref, lr=0.05, momentum=0.9), FusedTrainer(model, lr=0.05, momentum=0.9)
    ref_sum = torch.zeros((), dtype=torch.float64)
    for x, y in batches:  # the loop train_epoch runs for the other optimizers
        ref_sum += loop_trainer.step(x, y)[0].double() * y.shape[0]

    class Progress:
        samples = 0

        def update(self, n):
            self.samples += n

        def set_postfix(self, **kwargs):
            pass

    progress = Progress()
    calls = []
    fit_epoch = FusedTrainer.fit_epoch
    monkeypatch.setattr(FusedTrainer, "fit_epoch", lambda *a, **k: calls.append(1) or fit_epoch(*a, **k))
    loss_sum, seen = train.train_epoch(model, None, trainer, batches, torch.device("cpu"), progress)
    assert calls, "the fused-step epoch did not go through fit_epoch"
    assert seen == progress.samples == 300
    torch.testing.assert_close(loss_sum, ref_sum, rtol=1e-12, atol=0)
    assert_equal_state(model, ref, trainer, loop_trainer)


# ---- uint8 images through their pixel map ----

def pixel_dataset(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g))


def test_pixel_values_are_normalize_of_each_byte_value():
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(mnist_data.pixel_values(), mnist_data.normalize(every))
    pixels, _ = pixel_dataset(3)
    assert torch.equal(mnist_data.pixel_values()[pixels.long()], mnist_data.normalize(pixels))
    assert mnist_data.pixel_values(torch.float64).dtype == torch.float64


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # the epoch op, and the loop of steps
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uint8_images_train_as_their_mapped_values_bit_for_bit(optimizer, dtype):
    pixels, labels = pixel_dataset(300)
    table = torch.randn(256, generator=seeded(5), dtype=dtype)  # any map, not only normalize's
    images = table[pixels.long()]
    config = dict(lr=0.05, momentum=0.9) if optimizer == "sgd" else dict(lr=1e-3, optimizer="adam")
    ref, model = mlp(dtype=dtype), mlp(dtype=dtype)
    ref_trainer, trainer = FusedTrainer(ref, **config), FusedTrainer(model, **config)
    for epoch, chunk in enumerate((None, 2)):
        ref_losses, ref_correct = ref_trainer.fit_epoch(images, labels, 64, seeded(epoch), chunk=chunk)
        losses, correct = trainer.fit_epoch(pixels, labels, 64, seeded(epoch), chunk=chunk, pixel_values=table)
        assert torch.equal(losses, ref_losses) and torch.equal(correct, ref_correct)
        assert losses.dtype == dtype
        assert_equal_state(model, ref)


def test_uint8_rows_of_any_length_and_a_strided_order():
    # rows that are no whole number of vectors, and the op's fallback for a non-contiguous order
    sizes = (37, 8, 10)
    pixels = torch.randint(0, 256, (50, 37), generator=seeded(2), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,), generator=seeded(3))
    table = mnist_data.pixel_values()
    ref, model = mlp(sizes), mlp(sizes)
    order = torch.randperm(100, generator=seeded(4))[::2] // 2
    ref_losses, _ = FusedTrainer(ref, lr=0.1).fit_epoch(table[pixels.long()], labels, 16, order=order)
    losses, _ = FusedTrainer(model, lr=0.1).fit_epoch(pixels, labels, 16, order=order, pixel_values=table)
    assert torch.equal(losses, ref_losses)
    assert_equal_state(model, ref)


@pytest.mark.parametrize("images, table, match", [
    ("pixels", None, "uint8 images and pixel_values go together"),
    ("float", "table", "uint8 images and pixel_values go together"),
    ("pixels", torch.zeros(255), r"pixel_values of shape \(256,\)"),
    ("pixels", torch.zeros(256, dtype=torch.float64), r"pixel_values of shape \(256,\) with the parameters' dtype"),
])
def test_bad_pixel_input_is_a_clear_error_before_any_update(images, table, match):
    pixels, labels = pixel_dataset(40)
    images = pixels if images == "pixels" else mnist_data.normalize(pixels)
    table = mnist_data.pixel_values() if isinstance(table, str) else table
    model, before = mlp(), mlp()
    with pytest.raises(TypeError, match=match):
        FusedTrainer(model, lr=0.1, momentum=0.9).fit_epoch(images, labels, 16, seeded(0), pixel_values=table)
    assert_equal_state(model, before)


def test_op_checks_its_pixel_values():
    params = [p.detach() for p in mlp().parameters()]
    pixels, labels = pixel_dataset(8)
    x, order, lr = pixels.flatten(1), torch.arange(8), torch.full((2,), 0.1, dtype=torch.float64)
    op = torch.ops.mnist_fast.train_epoch_sgd

    def call(images, table):
        return op(images, labels, order, 4, lr, params, [], 0.0, 0.0, 0.0, False, False, -100, 0.0, table)

    before = [p.clone() for p in params]
    with pytest.raises(TypeError, match="uint8 images need pixel_values"):
        call(x, None)
    with pytest.raises(TypeError, match="pixel_values maps uint8 images"):
        call(mnist_data.normalize(x), mnist_data.pixel_values())
    with pytest.raises(ValueError, match=r"pixel_values of shape \(256,\)"):
        call(x, torch.zeros(2, 128))
    with pytest.raises(TypeError, match="the parameters' dtype"):
        call(x, torch.zeros(256, dtype=torch.float64))
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    losses, _ = call(x, mnist_data.pixel_values())
    assert losses.dtype == torch.float32 and losses.shape == (2,)
    empty, _ = op(x, labels, order[:0], 4, lr[:0], params, [], 0.0, 0.0, 0.0, False, False, -100, 0.0,
                  mnist_data.pixel_values())
    assert empty.dtype == torch.float32 and empty.shape == (0,)


def test_opcheck_with_pixel_values():
    params = [p.detach().double() for p in mlp((5, 6, 3)).parameters()]
    x, y = torch.randint(0, 256, (9, 5), dtype=torch.uint8), torch.randint(0, 3, (9,))
    lr = torch.full((3,), 0.1, dtype=torch.float64)
    opcheck(torch.ops.mnist_fast.train_epoch_sgd.default,
            (x, y, torch.randperm(9), 4, lr, params, [torch.zeros_like(p) for p in params], 0.9, 0.0, 0.0, False,
             False, -100, 0.0, torch.randn(256, dtype=torch.float64)))


def test_split_keeps_its_pixels_through_head_take_and_to():
    pixels, labels = pixel_dataset(20)
    split = mnist_data.Split(mnist_data.normalize(pixels).unsqueeze(1), labels, pixels)
    for part in (split.head(7), split.take(torch.tensor([3, 0, 19])), split.to("cpu")):
        assert torch.equal(mnist_data.pixel_values()[part.pixels.long()].unsqueeze(1), part.images)
    assert mnist_data.Split(split.images, labels).take(torch.tensor([1])).pixels is None


def test_cli_epoch_trains_from_the_pixels_as_from_the_images(monkeypatch):
    pixels, labels = pixel_dataset(300)
    with_pixels = mnist_data.Split(mnist_data.normalize(pixels).unsqueeze(1), labels, pixels)
    without = mnist_data.Split(with_pixels.images, labels)
    models, seen_images = [], []
    fit_epoch = FusedTrainer.fit_epoch
    monkeypatch.setattr(FusedTrainer, "fit_epoch", lambda self, images, *a, **k: seen_images.append(images.dtype) or
                        fit_epoch(self, images, *a, **k))

    class Progress:
        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            pass

    for split in (with_pixels, without):
        batches = mnist_data.Batches(split, 64, seed=4)
        model = mlp()
        trainer = FusedTrainer(model, lr=0.05, momentum=0.9)
        train.train_epoch(model, None, trainer, batches, torch.device("cpu"), Progress())
        models.append(model)
    assert seen_images == [torch.uint8, torch.float32]
    assert_equal_state(*models)
