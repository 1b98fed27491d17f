"""Bad-input cases mirrored from stock PyTorch, run one by one in a child process.

`python tests/bad_input_cases.py` prints, per case, a line "START <name>" before running it and a
JSON record after it. tests/test_bad_inputs.py runs this in a subprocess, so a crash (segfault,
abort) in a kernel is reported as the failure of the case that was running, not as a dead test run.

Each case gives (stock_call, ours_call). The contract: ours raises exactly when stock raises, and
returns the same values when stock does not. Cases in DEVIATIONS are inputs stock accepts that
mnist_fast rejects on purpose (documented in the README): ours must raise a clear error there.
"""
import json
import sys

import torch
import torch.nn.functional as F

import mnist_fast  # noqa: F401
from mnist_fast import functional as MF

ops = torch.ops.mnist_fast


def _linear(x, w, b=None):
    return (lambda: torch.relu(F.linear(x, w, b))), (lambda: MF.linear_relu(x, w, b))


def _ce(x, t, **kw):
    return (lambda: F.cross_entropy(x, t, **kw)), (lambda: MF.cross_entropy(x, t, **kw))


def _op_only(call):
    """A direct call of a backward op (no stock counterpart): it must raise cleanly."""
    def stock():
        raise RuntimeError("no stock counterpart: the op must reject this input")
    return stock, call


def cases():
    r = torch.randn
    idx = torch.tensor
    x35 = r(3, 5)
    y = ops.linear_relu(r(4, 3), r(5, 3), None)
    loss, lse = ops.cross_entropy_forward(x35, idx([0, 1, 2]), None, 1, -100, 0.0)
    return {
        # linear_relu
        "linear: in_features mismatch": _linear(r(3, 5), r(4, 6)),
        "linear: bias length": _linear(r(3, 5), r(4, 5), r(3)),
        "linear: bias 2-d": _linear(r(3, 5), r(4, 5), r(1, 4)),
        "linear: mixed dtypes": _linear(r(3, 5), r(4, 5, dtype=torch.float64)),
        "linear: 0-d input": _linear(torch.tensor(1.0), r(4, 1)),
        "linear: empty batch": _linear(r(0, 5), r(4, 5), r(4)),
        "linear: zero in_features": _linear(r(3, 0), r(4, 0), r(4)),
        "linear: zero out_features": _linear(r(3, 5), r(0, 5), r(0)),
        "linear: empty leading dims": _linear(r(0, 2, 5), r(4, 5)),
        "linear: 1-d input": _linear(r(5), r(4, 5), r(4)),
        "linear: stride-0 input": _linear(r(1, 5).expand(6, 5), r(4, 5), r(4)),
        "linear: int64 tensors": _linear(torch.ones(3, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long)),
        "linear: 1-d weight": _linear(r(3, 5), r(5)),
        # cross_entropy
        "ce: class index == C": _ce(x35, idx([0, 5, 1])),
        "ce: negative class index": _ce(x35, idx([0, -1, 1])),
        "ce: class index 2**62": _ce(x35, idx([0, 2**62, 1])),
        "ce: index == ignore_index beyond C": _ce(x35, idx([0, 50, 1]), ignore_index=50),
        "ce: out of range next to an ignored row": _ce(x35, idx([-100, 7, 1])),
        "ce: (C,) input, index out of range": _ce(r(5), idx(9)),
        "ce: (N,C,d) input, index out of range": _ce(r(2, 5, 3), idx([[0, 1, 2], [3, 4, 5]])),
        "ce: int32 target": _ce(x35, idx([0, 1, 2], dtype=torch.int32)),
        "ce: float class indices": _ce(x35, idx([0.0, 1.0, 2.0])),
        "ce: uint8 target": _ce(x35, idx([0, 1, 4], dtype=torch.uint8)),
        "ce: batch mismatch": _ce(x35, idx([0, 1])),
        "ce: 2-d index target of wrong shape": _ce(x35, torch.zeros(3, 4, dtype=torch.long)),
        "ce: probabilities of wrong width": _ce(x35, torch.rand(3, 6)),
        "ce: weight length": _ce(x35, idx([0, 1, 2]), weight=torch.ones(4)),
        "ce: weight 2-d": _ce(x35, idx([0, 1, 2]), weight=torch.ones(1, 5)),
        "ce: weight dtype": _ce(x35, idx([0, 1, 2]), weight=torch.ones(5, dtype=torch.float64)),
        "ce: label_smoothing < 0": _ce(x35, idx([0, 1, 2]), label_smoothing=-0.1),
        "ce: label_smoothing > 1": _ce(x35, idx([0, 1, 2]), label_smoothing=1.5),
        "ce: ignore_index with probabilities": _ce(x35, torch.rand(3, 5), ignore_index=1),
        "ce: bad reduction": _ce(x35, idx([0, 1, 2]), reduction="avg"),
        "ce: 0-d input": _ce(torch.tensor(1.0), idx(0)),
        "ce: empty batch, mean": _ce(r(0, 5), torch.zeros(0, dtype=torch.long)),
        "ce: empty batch, none": _ce(r(0, 5), torch.zeros(0, dtype=torch.long), reduction="none"),
        "ce: one class": _ce(r(4, 1), torch.zeros(4, dtype=torch.long)),
        "ce: all rows ignored": _ce(x35, idx([-100, -100, -100])),
        "ce: stride-0 input": _ce(r(1, 5).expand(4, 5), idx([0, 1, 2, 3])),
        "ce: NaN logits": _ce(torch.full((2, 3), float("nan")), idx([0, 1])),
        # the ops called directly with inconsistent saved tensors
        "op: linear_relu_backward, output of wrong shape": _op_only(
            lambda: ops.linear_relu_backward(torch.ones(4, 5), r(4, 3), r(5, 3), y[:2], [True, True, True])),
        "op: linear_relu_backward, grad of wrong dtype": _op_only(
            lambda: ops.linear_relu_backward(torch.ones(4, 5, dtype=torch.float64), r(4, 3), r(5, 3), y,
                                             [True, True, True])),
        "op: cross_entropy_backward, short logsumexp": _op_only(
            lambda: ops.cross_entropy_backward(torch.ones(()), x35, idx([0, 1, 2]), None, lse[:1], 1, -100, 0.0,
                                               [True, False])),
        "op: cross_entropy_backward, float32 logsumexp": _op_only(
            lambda: ops.cross_entropy_backward(torch.ones(()), x35, idx([0, 1, 2]), None, lse.float(), 1, -100, 0.0,
                                               [True, False])),
        "op: cross_entropy_backward, bad index": _op_only(
            lambda: ops.cross_entropy_backward(torch.ones(()), x35, idx([0, 9, 2]), None, lse, 1, -100, 0.0,
                                               [True, False])),
        "op: cross_entropy_forward, 3-d input": _op_only(
            lambda: ops.cross_entropy_forward(r(2, 3, 4), torch.zeros(2, dtype=torch.long), None, 1, -100, 0.0)),
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


def run_case(name, stock_call, ours_call):
    stock, stock_value = outcome(stock_call)
    ours, ours_value = outcome(ours_call)
    agree = None
    if stock == "ok" and ours == "ok":
        agree = bool(torch.allclose(ours_value.double(), stock_value.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
                     and ours_value.shape == stock_value.shape)
    return dict(case=name, stock=stock, ours=ours, agree=agree)


def main():
    torch.manual_seed(0)
    for name, (stock_call, ours_call) in cases().items():
        print(f"START {name}", flush=True)
        print(json.dumps(run_case(name, stock_call, ours_call)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
