"""The one table of bad (and borderline) inputs, each mirrored from stock PyTorch and run one by one
in a child process.

`python tests/bad_input_cases.py [cpu|cuda]` prints, per case, a line "START <name>" before running
it and a JSON record after it. tests/test_bad_inputs.py runs this in a subprocess, so a crash
(segfault, abort) in a kernel is reported as the failure of the case that was running, not as a
dead test run.

Each case gives (stock_call, ours_call, expected): expected is OK (both return, and agree) or the
(exception type, message regex) that ours must raise, where stock raises too. Cases in DEVIATIONS
are inputs stock accepts that mnist_fast rejects on purpose (documented in the README).
"""
import copy
import json
import sys

import torch
import torch.nn.functional as F

import mnist_fast
from mnist_fast import functional as MF
from mnist_fast.models import stock_mlp

ops = torch.ops.mnist_fast


OK = None  # expected: no error, and the same values as stock


def _linear(expected, x, w, b=None):
    return (lambda: torch.relu(F.linear(x, w, b))), (lambda: MF.linear_relu(x, w, b)), expected


def _ce(expected, x, t, **kw):
    return (lambda: F.cross_entropy(x, t, **kw)), (lambda: MF.cross_entropy(x, t, **kw)), expected


def _step(expected, x, labels):
    """One training step: stock model + SGD, and FusedTrainer on a copy of the same model."""
    torch.manual_seed(0)
    model = stock_mlp((5, 4, 3)).to(x.device)
    fused = copy.deepcopy(model)

    def stock():
        F.cross_entropy(model(x), labels).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        return model[0].weight.detach()

    def ours():
        mnist_fast.FusedTrainer(fused, lr=0.1).step(x, labels)
        return fused[0].weight.detach()
    return stock, ours, expected


def _op_only(expected, call):
    """A direct call of an op with no stock counterpart: it must raise cleanly."""
    def stock():
        raise RuntimeError("no stock counterpart: the op must reject this input")
    return stock, call, expected


def cases(device="cpu"):
    def r(*shape, **kw):
        return torch.randn(*shape, **{"device": device, **kw})

    def idx(values, **kw):
        return torch.tensor(values, **{"device": device, **kw})

    long = dict(dtype=torch.long)
    x35 = r(3, 5)
    y = ops.linear_relu(r(4, 3), r(5, 3), None)
    loss, lse = ops.cross_entropy_forward(x35, idx([0, 1, 2]), None, 1, -100, 0.0)
    same_device = (RuntimeError, "on the same device as input")
    out_of_bounds = (IndexError, "out of bounds")
    return {
        # linear_relu
        "linear: in_features mismatch": _linear((ValueError, "in_features = 6"), r(3, 5), r(4, 6)),
        "linear: bias length": _linear((ValueError, r"expected bias of shape \(4,\)"), r(3, 5), r(4, 5), r(3)),
        "linear: bias 2-d": _linear((ValueError, r"expected bias of shape \(4,\)"), r(3, 5), r(4, 5), r(1, 4)),
        "linear: mixed dtypes": _linear((TypeError, "weight to have the same dtype as input"), r(3, 5),
                                        r(4, 5, dtype=torch.float64)),
        "linear: 0-d input": _linear((ValueError, "at least 1 dimension"), idx(1.0), r(4, 1)),
        "linear: empty batch": _linear(OK, r(0, 5), r(4, 5), r(4)),
        "linear: zero in_features": _linear(OK, r(3, 0), r(4, 0), r(4)),
        "linear: zero out_features": _linear(OK, r(3, 5), r(0, 5), r(0)),
        "linear: empty leading dims": _linear(OK, r(0, 2, 5), r(4, 5)),
        "linear: 1-d input": _linear(OK, r(5), r(4, 5), r(4)),
        "linear: stride-0 input": _linear(OK, r(1, 5).expand(6, 5), r(4, 5), r(4)),
        "linear: int64 tensors": _linear((TypeError, "input to be float32, float64, bfloat16 or float16"),
                                         idx([[1] * 5] * 3), idx([[1] * 5] * 4)),
        "linear: 1-d weight": _linear((ValueError, r"weight of shape \(out_features, in_features\)"), r(3, 5), r(5)),
        # a meta tensor among the others: the ops' Meta kernels (their fakes) must check devices too
        "linear: meta bias": _linear((RuntimeError, "bias on the same device as input"), r(3, 5), r(4, 5),
                                     r(4, device="meta")),
        "linear: meta input": _linear((RuntimeError, "weight on the same device as input"), r(3, 5, device="meta"),
                                      r(4, 5), r(4)),
        # cross_entropy
        "ce: class index == C": _ce((IndexError, "Target 5 is out of bounds"), x35, idx([0, 5, 1])),
        "ce: negative class index": _ce((IndexError, "Target -1 is out of bounds"), x35, idx([0, -1, 1])),
        "ce: class index 2**62": _ce(out_of_bounds, x35, idx([0, 2**62, 1])),
        "ce: index == ignore_index beyond C": _ce(OK, x35, idx([0, 50, 1]), ignore_index=50),
        "ce: out of range next to an ignored row": _ce(out_of_bounds, x35, idx([-100, 7, 1])),
        "ce: (C,) input, index out of range": _ce(out_of_bounds, r(5), idx(9)),
        "ce: (N,C,d) input, index out of range": _ce(out_of_bounds, r(2, 5, 3), idx([[0, 1, 2], [3, 4, 5]])),
        "ce: int32 target": _ce((TypeError, r"dtype int64 \(or uint8\), got Int"), x35, idx([0, 1, 2], dtype=torch.int32)),
        "ce: float class indices": _ce((TypeError, r"dtype int64 \(or uint8\), got Float"), x35, idx([0.0, 1.0, 2.0])),
        "ce: integer probabilities": _ce((TypeError, "floating-point target"), x35, torch.ones(3, 5, device=device, **long)),
        "ce: uint8 target": _ce(OK, x35, idx([0, 1, 4], dtype=torch.uint8)),
        "ce: batch mismatch": _ce((ValueError, r"batch_size \(3\) to match target batch_size \(2\)"), x35, idx([0, 1])),
        "ce: 2-d index target of wrong shape": _ce((ValueError, "probability targets must have the shape of input"),
                                                   x35, torch.zeros(3, 4, device=device, **long)),
        "ce: probabilities of wrong width": _ce((ValueError, "probability targets must have the shape of input"),
                                                x35, torch.rand(3, 6, device=device)),
        "ce: (N,C,d) target of wrong shape": _ce((ValueError, "expected target of shape"), r(2, 3, 4),
                                                 torch.zeros(2, 5, device=device, **long)),
        "ce: weight length": _ce((ValueError, "a weight for each of the 5 classes"), x35, idx([0, 1, 2]),
                                 weight=torch.ones(4, device=device)),
        "ce: weight 2-d": _ce((ValueError, "a weight for each of the 5 classes"), x35, idx([0, 1, 2]),
                              weight=torch.ones(1, 5, device=device)),
        "ce: weight dtype": _ce((TypeError, "weight to have the same dtype as input"), x35, idx([0, 1, 2]),
                                weight=torch.ones(5, device=device, dtype=torch.float64)),
        "ce: label_smoothing < 0": _ce((ValueError, "label_smoothing must be between 0.0 and 1.0"), x35, idx([0, 1, 2]),
                                       label_smoothing=-0.1),
        "ce: label_smoothing > 1": _ce((ValueError, "label_smoothing must be between 0.0 and 1.0"), x35, idx([0, 1, 2]),
                                       label_smoothing=1.5),
        "ce: ignore_index with probabilities": _ce((ValueError, "ignore_index is not supported"), x35,
                                                   torch.rand(3, 5, device=device), ignore_index=1),
        "ce: bad reduction": _ce((ValueError, "not a valid value for reduction"), x35, idx([0, 1, 2]), reduction="avg"),
        "ce: 0-d input": _ce((ValueError, "at least 1 dimension"), idx(1.0), idx(0)),
        "ce: empty batch, mean": _ce(OK, r(0, 5), torch.zeros(0, device=device, **long)),
        "ce: empty batch, none": _ce(OK, r(0, 5), torch.zeros(0, device=device, **long), reduction="none"),
        "ce: one class": _ce(OK, r(4, 1), torch.zeros(4, device=device, **long)),
        "ce: all rows ignored": _ce(OK, x35, idx([-100, -100, -100])),
        "ce: stride-0 input": _ce(OK, r(1, 5).expand(4, 5), idx([0, 1, 2, 3])),
        "ce: NaN logits": _ce(OK, torch.full((2, 3), float("nan"), device=device), idx([0, 1])),
        "ce: meta target": _ce(same_device, x35, idx([0, 1, 2], device="meta")),
        "ce: meta weight": _ce((RuntimeError, "weight on the same device as input"), x35, idx([0, 1, 2]),
                               weight=torch.ones(5, device="meta")),
        "ce: meta probabilities": _ce(same_device, x35, torch.rand(3, 5, device="meta")),
        # FusedTrainer's step
        "step: labels": _step(OK, r(3, 5), idx([0, 1, 2])),
        "step: meta labels": _step(same_device, r(3, 5), idx([0, 1, 2], device="meta")),
        # the ops called directly with inconsistent arguments or saved tensors
        "op: linear_relu_backward, output of wrong shape": _op_only((ValueError, "expected output of shape"), lambda: (
            ops._linear_relu_backward(torch.ones(4, 5, device=device), r(4, 3), r(5, 3), y[:2], [True, True, True]))),
        "op: linear_relu_backward, grad of wrong shape": _op_only((ValueError, "expected grad_output of shape"), lambda: (
            ops._linear_relu_backward(torch.ones(4, 4, device=device), r(4, 3), r(5, 3), y, [True, True, True]))),
        "op: linear_relu_backward, grad of wrong dtype": _op_only((TypeError, "grad_output to have the same dtype"),
                                                                 lambda: ops._linear_relu_backward(
            torch.ones(4, 5, device=device, dtype=torch.float64), r(4, 3), r(5, 3), y, [True, True, True])),
        "op: cross_entropy_backward, short logsumexp": _op_only((ValueError, "expected logsumexp of shape"), lambda: (
            ops._cross_entropy_backward(idx(1.0), x35, idx([0, 1, 2]), None, lse[:1], 1, -100, 0.0, [True, False]))),
        "op: cross_entropy_backward, float32 logsumexp": _op_only((TypeError, "expected logsumexp of dtype"), lambda: (
            ops._cross_entropy_backward(idx(1.0), x35, idx([0, 1, 2]), None, lse.float(), 1, -100, 0.0,
                                        [True, False]))),
        "op: cross_entropy_backward, grad_loss not 0-d": _op_only((ValueError, "expected a 0-d grad_loss"), lambda: (
            ops._cross_entropy_backward(torch.ones(3, device=device), x35, idx([0, 1, 2]), None, lse, 1, -100, 0.0,
                                        [True, False]))),
        "op: cross_entropy_backward, bad index": _op_only(out_of_bounds, lambda: (
            ops._cross_entropy_backward(idx(1.0), x35, idx([0, 9, 2]), None, lse, 1, -100, 0.0, [True, False]))),
        "op: cross_entropy_backward, grad of class indices": _op_only(
            (RuntimeError, "class-index targets have no gradient"), lambda: (
                ops._cross_entropy_backward(idx(1.0), x35, idx([0, 1, 2]), None, lse, 1, -100, 0.0, [True, True]))),
        "op: cross_entropy_forward, 3-d input": _op_only((ValueError, r"expected input of shape \(N, C\)"), lambda: (
            ops.cross_entropy_forward(r(2, 3, 4), torch.zeros(2, device=device, **long), None, 1, -100, 0.0))),
        "op: cross_entropy_forward, reduction 3": _op_only((ValueError, "reduction must be 0"), lambda: (
            ops.cross_entropy_forward(r(2, 3), torch.zeros(2, device=device, **long), None, 3, -100, 0.0))),
    }


# Stock accepts these; mnist_fast rejects them on purpose, with a clear error (see README): integer
# tensors, a weight or bias that only broadcasting makes fit, and a negative label_smoothing,
# which stock silently treats as 0.
DEVIATIONS = {"linear: int64 tensors", "linear: 1-d weight", "linear: bias 2-d", "ce: label_smoothing < 0"}


def outcome(call):
    try:
        return "ok", call()
    except Exception as e:  # noqa: BLE001 - recording which exception, not handling it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", None


def run_case(name, stock_call, ours_call, expected):
    stock, stock_value = outcome(stock_call)
    ours, ours_value = outcome(ours_call)
    agree = None
    if stock == "ok" and ours == "ok":
        agree = bool(torch.allclose(ours_value.double().cpu(), stock_value.double().cpu(), rtol=1e-5, atol=1e-6,
                                    equal_nan=True) and ours_value.shape == stock_value.shape)
    return dict(case=name, stock=stock, ours=ours, agree=agree)


def main(device="cpu"):
    torch.manual_seed(0)
    for name, case in cases(device).items():
        if device != "cpu" and case[2] is not None and case[2][0] is IndexError:
            continue  # on CUDA a bad class index is a device-side assert, which poisons the context
        print(f"START {name}", flush=True)
        print(json.dumps(run_case(name, *case)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
