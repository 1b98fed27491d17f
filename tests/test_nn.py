"""Drop-in modules: LinearReLU, CrossEntropyLoss, fuse(), MNISTNet, and torch.compile of them."""
import copy

import pytest
import torch
from torch import nn

import mnist_fast
from mnist_fast.models import MNISTNet, stock_mlp
from mnist_fast.nn import CrossEntropyLoss, LinearReLU, fuse

from helpers import lesson_sequential


def test_public_api():
    assert mnist_fast.fuse is fuse and mnist_fast.LinearReLU is LinearReLU
    assert mnist_fast.nn.CrossEntropyLoss is CrossEntropyLoss
    for name in ["linear_relu", "_linear_relu_backward", "cross_entropy", "cross_entropy_forward",
                 "_cross_entropy_backward"]:
        assert hasattr(torch.ops.mnist_fast, name)


def test_linear_relu_layer_is_a_linear_with_the_same_init_and_keys():
    torch.manual_seed(1)
    ref = nn.Linear(20, 7)
    torch.manual_seed(1)
    layer = LinearReLU(20, 7)
    assert isinstance(layer, nn.Linear)
    assert layer.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), torch.relu(ref(x)))
    assert "in_features=20, out_features=7" in repr(layer)


def test_linear_relu_layer_without_bias_and_loading_a_linear_state_dict():
    layer = LinearReLU(6, 3, bias=False)
    assert layer.bias is None
    ref = nn.Linear(6, 3, bias=False)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), torch.relu(ref(x)))


def test_cross_entropy_loss_module_matches_stock():
    w = torch.rand(10) + 0.5
    ours = CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1)
    ref = nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1)
    x = torch.randn(16, 10, requires_grad=True)
    t = torch.randint(0, 10, (16,))
    a, b = ours(x, t), ref(x, t)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])
    assert CrossEntropyLoss().reduction == "mean" and CrossEntropyLoss().ignore_index == -100


def test_fuse_lesson_model_gives_identical_outputs_and_gradients():
    stock = stock_mlp()
    fused = fuse(stock)
    assert [type(m) for m in fused] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, nn.Linear]
    # The same Parameter objects, and the stock model is left as it was.
    assert all(a is b for a, b in zip(stock.parameters(), fused.parameters()))
    assert [type(m) for m in stock] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert fused.state_dict().keys() == stock.state_dict().keys()

    x = torch.randn(32, 784)
    t = torch.randint(0, 10, (32,))
    out_fused, out_stock = fused(x), stock(x)
    torch.testing.assert_close(out_fused, out_stock)
    params = list(stock.parameters())
    g_fused = torch.autograd.grad(CrossEntropyLoss()(out_fused, t), params)
    g_stock = torch.autograd.grad(nn.CrossEntropyLoss()(out_stock, t), params)
    for a, b in zip(g_fused, g_stock):
        torch.testing.assert_close(a, b)


def test_fuse_nested_modules_and_leaves_other_layers_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.Tanh(),
                                      nn.Sequential(nn.Linear(5, 3), nn.ReLU()))
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.body(x))

    net = Net()
    fused = fuse(net)
    assert type(fused.body[0]) is LinearReLU and type(fused.body[1]) is nn.Identity
    assert type(fused.body[2]) is nn.Linear and type(fused.body[3]) is nn.Tanh
    assert type(fused.body[4][0]) is LinearReLU and type(fused.head) is nn.Linear
    assert type(net.body[0]) is nn.Linear  # the original is untouched
    x = torch.randn(6, 4)
    torch.testing.assert_close(fused(x), net(x))
    assert fuse(fused).state_dict().keys() == net.state_dict().keys()  # fusing twice changes nothing


def test_fuse_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fuse(lambda x: x)


def test_mnist_net_shapes_and_inputs():
    net = MNISTNet()
    assert [type(m) for m in net] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, nn.Linear]
    assert sum(p.numel() for p in net.parameters()) == 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    images = torch.randn(3, 1, 28, 28)
    assert net(images).shape == (3, 10)
    torch.testing.assert_close(net(images), net(images.view(3, 784)))
    torch.testing.assert_close(net(images), net(images.view(3, 28, 28)))


def test_mnist_net_has_the_lesson_keys_and_init():
    torch.manual_seed(3)
    net = MNISTNet()
    torch.manual_seed(3)
    lesson = lesson_sequential(False)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(net.state_dict()) == list(lesson.state_dict())
    for key, value in lesson.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key  # same seed, same weights


@pytest.mark.parametrize("log_softmax", [False, True])
def test_mnist_net_state_loads_into_the_lessons_sequential_and_back(log_softmax):
    torch.manual_seed(0)
    net = MNISTNet()
    lesson = lesson_sequential(log_softmax)
    lesson.load_state_dict(net.state_dict())  # strict

    def as_lesson(logits):  # what the lesson's model outputs for these logits
        return torch.log_softmax(logits, dim=1) if log_softmax else logits

    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(lesson(x.flatten(1)), as_lesson(net(x)))

    other = lesson_sequential(log_softmax)  # other weights, back into an MNISTNet
    back = MNISTNet()
    back.load_state_dict(other.state_dict())  # strict
    torch.testing.assert_close(as_lesson(back(x)), other(x.flatten(1)))


def _earlier_keys(state):
    """A state dict of the MNISTNet before it had the lesson's keys."""
    names = {"0": "hidden.0", "2": "hidden.1", "4": "output"}
    return {names[key.split(".")[0]] + "." + key.split(".")[1]: value for key, value in state.items()}


def test_mnist_net_loads_state_dicts_with_the_earlier_keys():
    torch.manual_seed(0)
    source = MNISTNet()
    earlier = _earlier_keys(source.state_dict())
    assert sorted(earlier) == ["hidden.0.bias", "hidden.0.weight", "hidden.1.bias", "hidden.1.weight",
                               "output.bias", "output.weight"]
    net = MNISTNet()
    net.load_state_dict(earlier)  # strict
    assert "hidden.0.weight" in earlier and "0.weight" not in earlier  # the caller's dict is left as it was
    for key, value in source.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key

    # Inside another model (its keys under a prefix), and strict still reports what does not fit.
    outer, outer_source = nn.Sequential(nn.Identity(), MNISTNet()), nn.Sequential(nn.Identity(), source)
    outer.load_state_dict({"1." + key: value for key, value in earlier.items()})
    torch.testing.assert_close(outer(torch.ones(2, 784)), outer_source(torch.ones(2, 784)))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "hidden.2.weight"'):
        MNISTNet().load_state_dict({**earlier, "hidden.2.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "4.bias"'):
        MNISTNet().load_state_dict({k: v for k, v in earlier.items() if k != "output.bias"})


def test_mnist_net_trains_with_sgd():
    torch.manual_seed(0)
    net = MNISTNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    crit = CrossEntropyLoss()
    x = torch.randn(64, 784)
    t = torch.randint(0, 10, (64,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = crit(net(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = MNISTNet()
    crit = CrossEntropyLoss(label_smoothing=0.1)
    compiled_net = copy.deepcopy(net)

    def loss_of(model, x, t):
        return crit(model(x), t)

    # fullgraph=True: a graph break anywhere in the fused layers or loss fails the test.
    compiled_loss_of = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 1, 28, 28)
    t = torch.randint(0, 10, (16,))
    compiled_loss, eager_loss = compiled_loss_of(compiled_net, x, t), loss_of(net, x, t)
    torch.testing.assert_close(compiled_loss, eager_loss)
    compiled_loss.backward()
    eager_loss.backward()
    for a, b in zip(compiled_net.parameters(), net.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    net = MNISTNet()
    x = torch.randn(8, 784)
    t = torch.randint(0, 10, (8,))
    compiled = torch.compile(lambda x, t: CrossEntropyLoss()(net(x), t), fullgraph=True)
    loss = compiled(x, t)
    torch.testing.assert_close(loss, CrossEntropyLoss()(net(x), t))
    grads = torch.autograd.grad(loss, list(net.parameters()))
    ref = torch.autograd.grad(CrossEntropyLoss()(net(x), t), list(net.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", [(0, 1, 28, 28), (0, 28, 28), (0, 784)])
def test_mnist_net_empty_batch_matches_stock(shape):
    # reshape(0, -1) cannot infer its -1: an empty batch (the last batch of a filtered set) failed.
    torch.manual_seed(0)
    net = MNISTNet().double()
    ref = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).double()
    ref.load_state_dict(net.state_dict())
    x = torch.zeros(shape, dtype=torch.float64)
    t = torch.zeros(0, dtype=torch.long)
    logits = net(x)
    assert logits.shape == (0, 10)
    loss = CrossEntropyLoss(reduction="sum")(logits, t)
    ref_loss = nn.CrossEntropyLoss(reduction="sum")(ref(x.flatten(1)), t)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_fused_ops_empty_batch_forward_and_backward_match_stock(reduction):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(0, 7, dtype=dtype, requires_grad=True)
        w = torch.randn(5, 7, dtype=dtype, requires_grad=True)
        b = torch.randn(5, dtype=dtype, requires_grad=True)
        y = mnist_fast.functional.linear_relu(x, w, b)
        y_ref = torch.relu(nn.functional.linear(x, w, b))
        assert y.shape == y_ref.shape == (0, 5)
        t = torch.zeros(0, dtype=torch.long)
        loss = mnist_fast.functional.cross_entropy(y, t, reduction=reduction)
        loss_ref = nn.functional.cross_entropy(y_ref, t, reduction=reduction)
        torch.testing.assert_close(loss, loss_ref, equal_nan=True)  # mean of nothing: NaN on both sides
        out = loss.sum() if reduction == "none" else loss
        out_ref = loss_ref.sum() if reduction == "none" else loss_ref
        grads = torch.autograd.grad(out, [x, w, b], allow_unused=True)
        grads_ref = torch.autograd.grad(out_ref, [x, w, b], allow_unused=True)
        for g, g_ref, p in zip(grads, grads_ref, [x, w, b]):
            assert g.shape == p.shape
            torch.testing.assert_close(g, g_ref, equal_nan=True)
