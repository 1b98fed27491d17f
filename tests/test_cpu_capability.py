"""The CPU kernels of every capability this machine can run, each forced in a child process with
ATEN_CPU_CAPABILITY (so the AVX2 kernels are tested on an AVX-512 machine too), against stock
PyTorch: tests/cpu_capability_parity.py."""
import pathlib
import subprocess
import sys

import pytest
import torch

from mnist_fast import _C

from helpers import child_env

SCRIPT = pathlib.Path(__file__).resolve().parent / "cpu_capability_parity.py"
ORDER = ["default", "avx2", "avx512"]
# The best this CPU has, as ATen sees it (unforced): every capability up to it can run.
BEST = torch.backends.cpu.get_cpu_capability().lower()
RUNNABLE = ORDER[: ORDER.index(BEST) + 1] if BEST in ORDER else ["default"]


def run_child(capability, *args):
    env = child_env(ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], env=env, cwd=SCRIPT.parent, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("capability", [
    pytest.param(c, marks=pytest.mark.skipif(c not in RUNNABLE, reason=f"this CPU's best capability is {BEST}"))
    for c in ORDER])
def test_every_kernel_matches_stock_under(capability):
    result = run_child(capability, str(SCRIPT), capability)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cpu kernels '{capability}'" in result.stdout


def test_unforced_capability_is_the_cpus_best():
    assert _C.cpu_capability() == (BEST if BEST in ORDER else "default")


@pytest.mark.skipif("avx512" in RUNNABLE, reason="this CPU runs AVX-512")
def test_a_capability_the_cpu_lacks_is_not_used():
    # ATen takes ATEN_CPU_CAPABILITY=avx512 at its word (its own kernels then die of SIGILL here, so
    # nothing is computed); our table falls back to what the CPU has.
    result = run_child("avx512", "-c", "from mnist_fast import _C; print(_C.cpu_capability())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == RUNNABLE[-1]
