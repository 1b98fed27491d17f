"""FusedMLP and the forms fuse() finds in users' code (the lesson's nn.Sequential with and without
LogSoftmax, a class-based Classifier calling F.relu / F.log_softmax), fuse(criterion), unfuse()."""
import collections
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import mnist_fast
from benchmarks.lesson_models import Classifier
from mnist_fast import functional as MF
from mnist_fast.nn import CrossEntropyLoss, FusedMLP, LinearReLU, fuse, unfuse

from helpers import lesson_sequential


class ClassifierWithDropout(Classifier):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(p=0.2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        x = self.dropout(F.relu(self.fc3(x)))
        return F.log_softmax(self.fc4(x), dim=1)


def calls(gm, fn):
    return sum(node.op == "call_function" and node.target is fn for node in gm.graph.nodes)


def fuse_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these forms fuse completely: no "left stock" warning
        return fuse(model)


def assert_same_training(stock, fused, loss_stock, loss_fused, x, t, steps=3):
    """The same outputs, losses, gradients and SGD trajectory (momentum 0.9)."""
    fused_params = dict(fused.named_parameters())
    for name, p in stock.named_parameters():  # the same Parameter objects: copy the model first
        assert fused_params[name] is not p
    opt_s = torch.optim.SGD(stock.parameters(), lr=0.05, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        out_s, out_f = stock(x), fused(x)
        torch.testing.assert_close(out_f, out_s)
        ls, lf = loss_stock(out_s, t), loss_fused(out_f, t)
        torch.testing.assert_close(lf, ls)
        opt_s.zero_grad()
        opt_f.zero_grad()
        ls.backward()
        lf.backward()
        for name, p in stock.named_parameters():
            torch.testing.assert_close(fused_params[name].grad, p.grad)
        opt_s.step()
        opt_f.step()


def data(n=32):
    return torch.randn(n, 784), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("log_softmax", [False, True])
def test_fuse_lesson_sequential_is_one_fused_mlp(log_softmax):
    stock = lesson_sequential(log_softmax)
    fused = fuse_quietly(stock)
    assert type(fused) is FusedMLP and isinstance(fused, nn.Sequential)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    assert all(a is b for a, b in zip(stock.parameters(), fused.parameters()))
    x, t = data()
    out = fused(x)
    assert out.grad_fn.name() == "FusedMLPBackward"  # the whole network is one node
    criterion = nn.NLLLoss() if log_softmax else nn.CrossEntropyLoss()
    fused_criterion = fuse_quietly(criterion)
    assert type(fused_criterion) is (nn.NLLLoss if log_softmax else CrossEntropyLoss)
    assert_same_training(stock, fuse(copy.deepcopy(stock)), criterion, fused_criterion, x, t)
    if log_softmax:  # inference keeps its meaning: exp of the output is a probability distribution
        torch.testing.assert_close(torch.exp(fused(x)).sum(1), torch.ones(32))


def test_fused_mlp_is_a_drop_in_for_the_sequential():
    torch.manual_seed(3)
    stock = lesson_sequential(True)
    torch.manual_seed(3)
    fused = FusedMLP(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
                     nn.LogSoftmax(dim=1))
    torch.manual_seed(3)
    sized = FusedMLP.from_sizes(784, 128, 64, 10, log_softmax=True)
    for model in (fused, sized):
        assert model.state_dict().keys() == stock.state_dict().keys()
        for key, value in stock.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)  # the same init
    assert [type(m) for m in fused] == [LinearReLU, nn.Identity, LinearReLU, nn.Identity, nn.Linear, nn.LogSoftmax]
    fused.load_state_dict(stock.state_dict())
    x, _ = data(5)
    torch.testing.assert_close(fused(x), stock(x))
    assert type(fused[:2]) is nn.Sequential  # a slice is a plain Sequential of the layers
    torch.testing.assert_close(fused[:2](x), torch.relu(stock[0](x)))
    with pytest.raises(ValueError, match="FusedMLP"):
        FusedMLP(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def test_fused_mlp_options_match_stock():
    cases = [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(12, 5), nn.ReLU(inplace=True), nn.Linear(5, 3, bias=False), nn.LogSoftmax(dim=-1)),
        nn.Sequential(nn.Linear(12, 3), nn.LogSoftmax(dim=1)),  # one layer and a log-softmax
    ]
    for stock in cases:
        fused = fuse_quietly(copy.deepcopy(stock))
        assert type(fused) is FusedMLP
        x = torch.randn(4, 3, 4) if type(stock[0]) is nn.Flatten else torch.randn(4, 12)
        torch.testing.assert_close(fused(x), stock(x))
    # A log-softmax over another dimension than the features, or the legacy implicit one: as stock.
    for dim in (0, None):
        stock = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(dim=dim))
        fused = fuse_quietly(copy.deepcopy(stock))
        x = torch.randn(4, 6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the implicit-dim deprecation warning, from both
            torch.testing.assert_close(fused(x), stock(x))
    stock = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(dim=1))
    fused = fuse(copy.deepcopy(stock))
    x = torch.randn(2, 4, 6)  # dim=1 is not the features here
    torch.testing.assert_close(fused(x), stock(x))


def test_changed_children_run_as_a_sequential():
    fused = fuse(lesson_sequential())
    fused.append(nn.Tanh())
    x, _ = data(4)
    torch.testing.assert_close(fused(x), torch.tanh(unfuse(fused)[:5](x)))


@pytest.mark.parametrize("cls", [Classifier, ClassifierWithDropout])
def test_fuse_class_based_classifier(cls):
    stock = cls()
    fused = fuse_quietly(stock) if cls is Classifier else fuse(stock)
    assert isinstance(fused, fx.GraphModule)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    assert all(a is b for a, b in zip(stock.parameters(), fused.parameters()))
    if cls is Classifier:  # one op for the whole network
        assert calls(fused, mnist_fast.nn._mlp_forward) == 1 and calls(fused, MF.linear_relu) == 0
        assert not any(node.op == "call_module" for node in fused.graph.nodes)
    else:  # dropout between the layers: each Linear+ReLU fused, the last layer with the log-softmax
        assert calls(fused, MF.linear_relu) == 3 and calls(fused, mnist_fast.nn._mlp_forward) == 1
    stock.eval()
    fused.eval()
    x, t = data()
    assert_same_training(stock, fuse(copy.deepcopy(stock)), nn.NLLLoss(), nn.NLLLoss(), x, t)
    torch.testing.assert_close(torch.exp(fused(x)).sum(1), torch.ones(32))


def test_fuse_forms_with_relu_modules_methods_and_torch_relu():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(8, 6), nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.d(torch.relu(self.c(self.b(self.act(self.a(x))).relu()))).log_softmax(-1)

    stock = Net()
    fused = fuse_quietly(stock)
    assert isinstance(fused, fx.GraphModule) and calls(fused, mnist_fast.nn._mlp_forward) == 1
    x = torch.randn(5, 8)
    torch.testing.assert_close(fused(x), stock(x))


def test_fuse_leaves_shared_intermediates_and_untraceable_modules_stock_with_a_warning():
    class UsesHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + h.sum(1, keepdim=True)  # h has another use: a, b cannot be one op

    stock = UsesHidden()
    fused = fuse(stock)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fused(x), stock(x))
    assert calls(fused, MF.linear_relu) == 1  # a + relu is still fused on its own

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.b(F.relu(self.a(x)))

    with pytest.warns(UserWarning, match="cannot be traced"):
        fused = fuse(Branchy())
    assert type(fused.a) is nn.Linear
    with pytest.warns(UserWarning, match=r"left stock.*2 \(nn.Linear followed by Tanh\)"):
        fuse(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh()))


def test_fuse_keeps_mode_and_fuses_mnist_net_children():
    stock = lesson_sequential(True).eval()
    assert not fuse(stock).training
    net = mnist_fast.models.MNISTNet()
    fused = fuse(net)
    x = torch.randn(3, 784)
    torch.testing.assert_close(fused(x), net(x))


def test_fuse_criterion():
    w = torch.rand(10) + 0.5
    stock = nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1)
    fused = fuse(stock)
    assert type(fused) is CrossEntropyLoss and type(stock) is nn.CrossEntropyLoss
    assert fused.weight is stock.weight and fused.reduction == "sum" and fused.label_smoothing == 0.1
    x, t = torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.testing.assert_close(fused(x, t), stock(x, t))
    nll = nn.NLLLoss()
    assert fuse(nll) is nll  # nothing to gain: see fuse's docstring


@pytest.mark.parametrize("make", [lambda: lesson_sequential(True), lesson_sequential, Classifier,
                                  ClassifierWithDropout, mnist_fast.models.MNISTNet])
def test_unfuse_gives_stock_modules_sharing_parameters(make):
    stock = make().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fuse(stock)
        back = unfuse(fused)
    fused_types = {type(m) for m in back.modules()}
    assert not any(t.__module__.startswith("mnist_fast") for t in fused_types)
    assert all(a is b for a, b in zip(fused.parameters(), back.parameters()))
    assert back.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(4, 784)
    torch.testing.assert_close(back(x), stock(x))
    if isinstance(back, fx.GraphModule):
        assert "mnist_fast" not in back.code
    assert type(unfuse(CrossEntropyLoss())) is nn.CrossEntropyLoss


def test_unfused_sequential_exports_without_mnist_fast_ops():
    back = unfuse(fuse(lesson_sequential(True)))
    assert [type(m) for m in back] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.LogSoftmax]
    exported = torch.export.export(back, (torch.randn(2, 784),))
    assert "mnist_fast" not in str(exported.graph)


def test_torch_compile_of_fused_forms():
    for stock in (lesson_sequential(True), Classifier()):
        fused = fuse(copy.deepcopy(stock))
        x, t = data(8)
        compiled = torch.compile(lambda x, t: F.nll_loss(fused(x), t), fullgraph=True, backend="aot_eager")
        loss = compiled(x, t)
        torch.testing.assert_close(loss, F.nll_loss(stock(x), t))
        loss.backward()
        F.nll_loss(stock(x), t).backward()
        for (name, a), b in zip(fused.named_parameters(), stock.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_fuse_state_dict_round_trip():
    stock = lesson_sequential(True)
    fused = fuse(copy.deepcopy(stock))
    fresh = fuse(lesson_sequential(True))
    fresh.load_state_dict(fused.state_dict())
    x, _ = data(4)
    torch.testing.assert_close(fresh(x), stock(x))
    stock.load_state_dict(collections.OrderedDict(fresh.state_dict()))


def test_user_loop_benchmark_runs(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "user_loop.py"
    spec = importlib.util.spec_from_file_location("user_loop", path)
    user_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_loop)
    threads = torch.get_num_threads()
    try:
        rows = user_loop.main(["--batch", "8", "--rounds", "2", "--steps", "1"])
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 3 and all(r["stock_us"] > 0 and r["fused_us"] > 0 for r in rows)
    assert [r["fused_model"] for r in rows] == ["FusedMLP", "FusedMLP", "Classifier"]
    assert "| Classifier" in capsys.readouterr().out


def test_fuse_module_list_loop():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 6), nn.Linear(6, 5, bias=False), nn.Linear(5, 3)])

        def forward(self, x):
            for layer in self.layers[:-1]:
                x = F.relu(layer(x))
            return self.layers[-1](x)

    stock = Stack()
    fused = fuse_quietly(stock)
    assert calls(fused, mnist_fast.nn._mlp_forward) == 1
    assert fused.state_dict().keys() == stock.state_dict().keys()
    x = torch.randn(5, 8, requires_grad=True)
    torch.testing.assert_close(fused(x), stock(x))
    torch.testing.assert_close(torch.autograd.grad(fused(x).sum(), x), torch.autograd.grad(stock(x).sum(), x))
