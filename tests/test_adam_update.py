"""The adam_update op (FusedTrainer's Adam and AdamW) rounds as torch.optim.Adam / AdamW do, bit for
bit, also where the moments are denormal (the CPU kernel computes a dead unit's lanes without float
arithmetic on a denormal: csrc/cpu/kernels/kernels_impl.h, "Adam"). The same check runs under every
CPU capability in cpu_capability_parity.py."""
import pytest
import torch

from helpers import adam_update_mismatches

CASES = [
    ("adam", dict(lr=1e-3)),
    ("adam", dict(lr=1e-2, weight_decay=1e-2)),  # the L2 term: no gradient is 0, no shortcut
    ("adam", dict(lr=1e-2, betas=(0.3, 0.5), eps=1e-3)),  # 1 - beta1 > 0.5: lerp's other formula
    ("adam", dict(lr=1e-3, betas=(0.5, 0.9))),  # lerp weight 1/2: exact ties
    ("adam", dict(lr=1e-3, betas=(0.99, 0.9999))),
    ("adam", dict(lr=1e3)),  # step_size / eps beyond the exact shortcut's bound: the plain arithmetic
    ("adamw", dict(lr=1e-2)),  # AdamW's default weight decay, 1e-2
    ("adamw", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))),
]


def case_id(case):
    optimizer, config = case
    return optimizer + "," + ",".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_is_stocks_bit_for_bit_with_ieee_denormals(case, dtype):
    assert adam_update_mismatches(*case, dtype=dtype) == []


@pytest.mark.parametrize("shape", [(3,), (16,), (4099,), (2, 1024)], ids=str)
def test_every_length_and_block_boundary(shape):
    # vector tails and the kernel's 1024-element blocks
    assert adam_update_mismatches(*CASES[0], shape=shape) == []


@pytest.mark.parametrize("case", CASES[:1] + CASES[3:4] + CASES[6:7], ids=case_id)
def test_update_is_stocks_bit_for_bit_with_denormals_flushed(flush_denormal, case):
    # The exact shortcut is off here: it would keep denormals that the flushing arithmetic zeroes.
    flush_denormal(True)
    assert adam_update_mismatches(*case) == []
