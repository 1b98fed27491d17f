"""FusedTrainer across processes: 2 CPU ranks over gloo, spawned here. The gradients are averaged
between the fused backward and the update, so every rank ends with the same parameters, those of one
process stepping on the two ranks' batches concatenated (within float32 rounding); and the training
CLI under torchrun with --backend fused-step, SGD and Adam."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mnist_fast import models
from mnist_fast.trainer import FusedTrainer

WORLD = 2
ROWS = 16  # per rank and step
STEPS = 4
CONFIGS = {"sgd": dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
           "adam": dict(optimizer="adam", lr=1e-2, weight_decay=1e-3)}


def _model(seed):
    torch.manual_seed(seed)
    return models.stock_mlp((20, 12, 8, 4))


def _data():
    g = torch.Generator().manual_seed(7)
    n = WORLD * ROWS * STEPS
    return torch.randn(n, 20, generator=g), torch.randint(0, 4, (n,), generator=g)


def _batch(images, labels, step, rank):
    """Rank `rank`'s share of global step `step`: rows [step*WORLD*ROWS + rank*ROWS, ...)."""
    start = (step * WORLD + rank) * ROWS
    return images[start:start + ROWS], labels[start:start + ROWS]


def _worker(rank, store, out):
    torch.set_num_threads(1)
    # A file rendezvous: a TCP one needs a free port picked before the ranks bind it, a race that
    # another process can win (gloo then aborts the rank).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for optimizer, config in CONFIGS.items():
            model = _model(seed=rank)  # other initial weights on rank 1: the trainer broadcasts rank 0's
            trainer = FusedTrainer(model, **config)
            start = {k: v.clone() for k, v in model.state_dict().items()}
            images, labels = _data()
            losses = []
            for step in range(STEPS - 1):
                losses.append(trainer.step(*_batch(images, labels, step, rank))[0])
            # The last step through fit_epoch (a loop of steps when the gradients are all-reduced).
            x, y = _batch(images, labels, STEPS - 1, rank)
            epoch_losses, _ = trainer.fit_epoch(x, y, ROWS, order=torch.arange(ROWS))
            losses.append(epoch_losses[0])
            torch.save({"start": start, "end": model.state_dict(), "losses": torch.stack(losses),
                        "optimizer": trainer.state_dict()}, Path(out) / f"{optimizer}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each rank saved, per optimizer: one spawn of 2 processes for all (they take ~30 s to start)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return {optimizer: [torch.load(out / f"{optimizer}{r}.pt") for r in range(WORLD)] for optimizer in CONFIGS}


@pytest.mark.parametrize("optimizer", sorted(CONFIGS))
def test_two_ranks_end_with_the_parameters_of_one_process_on_the_whole_batch(two_ranks, optimizer):
    ranks = two_ranks[optimizer]
    for key in ranks[0]["end"]:
        assert torch.equal(ranks[0]["start"][key], ranks[1]["start"][key]), f"{key}: not broadcast"
        assert torch.equal(ranks[0]["end"][key], ranks[1]["end"][key]), f"{key} differs between the ranks"

    # One process, the same initial weights, each step on both ranks' batches: the same run.
    model = _model(seed=0)
    trainer = FusedTrainer(model, **CONFIGS[optimizer])
    images, labels = _data()
    losses = []
    for step in range(STEPS):
        parts = [_batch(images, labels, step, r) for r in range(WORLD)]
        losses.append(trainer.step(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))[0])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["end"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    # Each rank's loss is its own batch's; their mean is the whole batch's.
    mean_loss = (ranks[0]["losses"] + ranks[1]["losses"]) / 2
    torch.testing.assert_close(mean_loss, torch.stack(losses), rtol=1e-5, atol=1e-6)
    # The optimizer state is the single process's too (the stock format).
    single = trainer.state_dict()["state"]
    for k, entry in ranks[1]["optimizer"]["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(value, single[k][name], rtol=1e-5, atol=1e-6)


def test_distributed_true_needs_a_process_group():
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        FusedTrainer(_model(0), lr=0.1, distributed=True)
    assert "world_size" not in repr(FusedTrainer(_model(0), lr=0.1))


# ---- the CLI under torchrun ----

CLI_SCRIPT = """
import os, sys, torch
from mnist_fast import train
result = train.train(train.parse_args(sys.argv[1:]))
torch.save(result.model.state_dict(), f"rank{os.environ['RANK']}.pt")
"""


def _torchrun(tmp_path, *options):
    from test_train import write_banded_dataset  # the small learnable data set of the CLI tests

    data_dir = tmp_path / "mnist"
    if not data_dir.exists():
        write_banded_dataset(data_dir)
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(CLI_SCRIPT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                             str(script), "--data-dir", str(data_dir), "--no-download", "--batch-size", "16",
                             "--backend", "fused-step", *options], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    return result.stdout, rank0


@pytest.mark.slow  # six torchrun launches: about a minute
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cli_fused_step_under_torchrun_trains_identical_ranks_and_resumes(tmp_path, optimizer):
    options = ["--optimizer", optimizer, "--schedule", "constant", "--checkpoint", "run.pt"]
    out, two_epochs = _torchrun(tmp_path, *options, "--epochs", "2")
    assert "fused-step backend" in out and "2 processes" in out
    assert out.count("done: mnist") == 1  # rank 0 alone prints
    torch.manual_seed(0)
    initial = models.MNISTNet().state_dict()
    assert not any(torch.equal(initial[k], two_epochs[k]) for k in initial)  # it trained
    # Extended by one epoch from the checkpoint: the run that trains 3 epochs straight.
    _, resumed = _torchrun(tmp_path, *options, "--epochs", "3", "--resume")
    _, straight = _torchrun(tmp_path, *[o if o != "run.pt" else "straight.pt" for o in options], "--epochs", "3")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
