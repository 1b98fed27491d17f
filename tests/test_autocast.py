"""The fused layers, loss and FusedMLP under torch.autocast: the dtypes and values stock gives."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mnist_fast
from mnist_fast import functional as MF
from mnist_fast.nn import fuse

# (device type, dtype): CPU bfloat16 runs here; CUDA's are skipped without a GPU.
CASES = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
LOOSE = dict(rtol=3e-2, atol=3e-2)  # both sides round to the lower precision, in other orders


def run(device, dtype, fn):
    with torch.autocast(device, dtype=dtype):
        return fn()


@pytest.mark.parametrize("device,dtype", CASES)
def test_ops_give_stock_dtypes_and_values(device, dtype):
    x = torch.randn(16, 12, device=device)
    w, b = torch.randn(8, 12, device=device) / 4, torch.randn(8, device=device)
    w2 = torch.randn(5, 8, device=device) / 3
    t = torch.randint(0, 5, (16,), device=device)
    pairs = [
        (lambda: MF.linear_relu(x, w, b), lambda: torch.relu(F.linear(x, w, b))),
        (lambda: MF.cross_entropy(x, t.clamp(max=4) + 7), lambda: F.cross_entropy(x, t.clamp(max=4) + 7)),
        (lambda: MF.fused_mlp(x, [w, w2], [b, None]), lambda: F.linear(torch.relu(F.linear(x, w, b)), w2)),
        (lambda: MF.fused_mlp(x, [w, w2], [b, None], True),
         lambda: F.log_softmax(F.linear(torch.relu(F.linear(x, w, b)), w2), dim=-1)),
    ]
    for ours, stock in pairs:
        got, want = run(device, dtype, ours), run(device, dtype, stock)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **LOOSE)


@pytest.mark.parametrize("device,dtype", CASES)
def test_float64_is_left_alone(device, dtype):
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    w = torch.randn(3, 6, dtype=torch.float64, device=device)
    assert run(device, dtype, lambda: MF.fused_mlp(x, [w], [None], True)).dtype == torch.float64
    assert run(device, dtype, lambda: MF.linear_relu(x, w)).dtype == torch.float64


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return F.log_softmax(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))), dim=1)


MODELS = {
    "MNISTNet + CrossEntropyLoss": (mnist_fast.models.MNISTNet, nn.CrossEntropyLoss),
    "Sequential + CrossEntropyLoss": (lambda: nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)),
                                      nn.CrossEntropyLoss),
    "Sequential+LogSoftmax + NLLLoss": (lambda: nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10),
                                                              nn.LogSoftmax(dim=1)), nn.NLLLoss),
    "Classifier + NLLLoss": (Classifier, nn.NLLLoss),
}


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_under_autocast_matches_stock(device, dtype, name):
    make_model, make_loss = MODELS[name]
    stock = make_model().to(device)
    if isinstance(stock, mnist_fast.models.MNISTNet):  # its layers are the fused ones: compare with stock layers
        fused, stock = stock, mnist_fast.unfuse(stock)
    else:
        fused = fuse(copy.deepcopy(stock))
    criterion, fused_criterion = make_loss(), fuse(make_loss())
    x, t = torch.randn(32, 784, device=device), torch.randint(0, 10, (32,), device=device)
    results = []
    for model, loss_fn in ((stock, criterion), (fused, fused_criterion)):
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            loss = loss_fn(out, t)
        loss.backward()
        results.append((out, loss, [p.grad for p in model.parameters()]))
    (out_s, loss_s, grads_s), (out_f, loss_f, grads_f) = results
    assert out_f.dtype == out_s.dtype and loss_f.dtype == loss_s.dtype
    torch.testing.assert_close(out_f.float(), out_s.float(), **LOOSE)
    torch.testing.assert_close(loss_f, loss_s, **LOOSE)
    for a, b in zip(grads_f, grads_s):
        assert a.dtype == b.dtype == torch.float32  # the Parameters stay float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
