"""The fused train step's SGD update rounds as torch.optim.SGD does, bit for bit, also where the
momentum buffers are denormal (the CPU kernel computes those lanes without float arithmetic on a
denormal: csrc/cpu/kernels/kernels_impl.h, "SGD"). The same check runs under every CPU capability
in cpu_capability_parity.py."""
import pytest

from helpers import sgd_update_mismatches

CASES = [
    dict(momentum=0.9),
    dict(momentum=0.5, lr=0.1),  # exact ties: 3 * 0.5
    dict(momentum=1.0),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-3, lr=0.05),
    dict(momentum=0.9, lr=1e5),  # lr beyond the exact shortcut's bound: the plain arithmetic
    dict(momentum=1.5),  # momentum beyond it too
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.3, first_step=True),
    dict(momentum=0.9, nesterov=True, first_step=True),
    dict(momentum=0.5, nesterov=True, cancel=True),  # buf' = 0 beside a large gradient
    dict(momentum=0.5, cancel=True),
    dict(momentum=0.0, weight_decay=1e-2),  # no buffer
    dict(momentum=0.0),
]
SIZES = [((40, 32, 10), 16), ((37, 19, 5), 7), ((784, 128, 64, 10), 64)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("sizes,rows", SIZES, ids=lambda v: str(v))
def test_update_is_stocks_bit_for_bit_with_ieee_denormals(sizes, rows, case):
    assert sgd_update_mismatches(sizes, rows, **case) == []


@pytest.mark.parametrize("case", CASES[:2] + CASES[6:7], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_update_is_stocks_bit_for_bit_with_denormals_flushed(flush_denormal, case):
    # The exact shortcut is off here: it would keep denormals that the flushing arithmetic zeroes.
    flush_denormal(True)
    assert sgd_update_mismatches((40, 32, 10), 16, **case) == []
