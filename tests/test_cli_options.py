"""mnist_fast.train's training-script options (issue 16): metrics after every epoch, TensorBoard,
--weight-decay, --label-smoothing, --val-split, --output-dir; resume stays exact with each of them."""
import json

import pytest
import torch

from mnist_fast import data, run_log, train, train_options
from mnist_fast.checkpoint import load_checkpoint
from mnist_fast.train import build_parser, parse_args
from helpers import assert_resume_refused
from test_train import _assert_same_weights, _interrupt_after, _weights

PNG = b"\x89PNG\r\n\x1a\n"


def _history(data_dir, *options):
    args = parse_args(["--data-dir", str(data_dir), "--no-download", "--epochs", "2", *options])
    return train.train(args).history


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Metrics after every epoch


def test_metrics_are_on_disk_after_every_epoch_and_survive_ctrl_c(run, tmp_path, monkeypatch):
    metrics, checkpoint = tmp_path / "m.jsonl", tmp_path / "run.pt"
    undo = _interrupt_after(monkeypatch, epochs=2)
    assert run("--epochs", "4", "--metrics", str(metrics), "--checkpoint", str(checkpoint)) == 130
    lines = _lines(metrics)
    assert list(lines[0]) == ["run"] and [line["epoch"] for line in lines[1:]] == [1, 2]  # no final line
    undo()
    assert run("--epochs", "4", "--metrics", str(metrics), "--checkpoint", str(checkpoint), "--resume") == 0
    lines = _lines(metrics)
    assert [line["epoch"] for line in lines[1:-1]] == [1, 2, 3, 4] and lines[-1]["final"]["epochs"] == 4
    assert lines[1:-1] == load_checkpoint(checkpoint)["history"]


def test_an_interrupted_run_plots_its_finished_epochs(run, tmp_path, monkeypatch):
    plot = tmp_path / "curves.png"
    _interrupt_after(monkeypatch, epochs=1)
    assert run("--epochs", "3", "--plot", str(plot)) == 130
    assert plot.read_bytes()[:8] == PNG


def test_metrics_record_the_learning_rate_of_each_epoch(run, tmp_path):
    metrics = tmp_path / "m.jsonl"
    assert run("--epochs", "2", "--lr", "0.1", "--metrics", str(metrics)) == 0
    assert [line["lr"] for line in _lines(metrics)[1:-1]] == [pytest.approx(0.1), pytest.approx(0.05)]


# ----------------------------------------------------------------------------------------------
# TensorBoard


@pytest.mark.skipif(run_log.tensorboard_available(), reason="checks the message for a machine without tensorboard")
def test_tensorboard_without_the_package_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--tensorboard", "tb"])
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err


class _FakeWriter:
    made = []

    def __init__(self, log_dir, purge_step):
        self.log_dir, self.purge_step, self.scalars, self.flushes, self.closed = log_dir, purge_step, [], 0, False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_tensorboard_logs_every_epoch_and_purges_on_resume(run, tmp_path, monkeypatch):
    _FakeWriter.made = []
    monkeypatch.setattr(train_options, "tensorboard_available", lambda: True)
    monkeypatch.setattr(run_log, "_summary_writer", _FakeWriter)
    tb, checkpoint = tmp_path / "tb", tmp_path / "run.pt"
    assert run("--epochs", "2", "--tensorboard", str(tb), "--checkpoint", str(checkpoint),
               "--schedule", "constant") == 0
    writer = _FakeWriter.made[-1]
    assert writer.log_dir == str(tb) and writer.purge_step is None and writer.closed and writer.flushes == 2
    tags = {(tag, step) for tag, step, _ in writer.scalars}
    assert {("loss/train", 1), ("loss/test", 2), ("accuracy/test", 2), ("lr", 1), ("time/epoch_s", 2)} <= tags
    history = load_checkpoint(checkpoint)["history"]
    assert ("loss/train", 2, history[1]["train_loss"]) in writer.scalars

    assert run("--epochs", "3", "--tensorboard", str(tb), "--checkpoint", str(checkpoint),
               "--schedule", "constant", "--resume") == 0
    resumed = _FakeWriter.made[-1]
    assert resumed.purge_step == 3 and {step for _, step, _ in resumed.scalars} == {3}


def test_tensorboard_into_a_file_fails_before_training(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_options, "tensorboard_available", lambda: True)
    monkeypatch.setattr(run_log, "_summary_writer", _FakeWriter)
    (tmp_path / "tb").write_text("")
    assert run("--epochs", "1", "--tensorboard", str(tmp_path / "tb")) == 1
    captured = capsys.readouterr()
    assert f"error: --tensorboard {tmp_path / 'tb'} is a file; give a folder" in captured.err
    assert "epoch" not in captured.out


# ----------------------------------------------------------------------------------------------
# --weight-decay, --label-smoothing


@pytest.mark.parametrize("options", [("--weight-decay", "1"), ("--label-smoothing", "0.2"),
                                     ("--weight-decay", "1", "--label-smoothing", "0.2")])
def test_every_backend_applies_weight_decay_and_label_smoothing_alike(data_dir, options):
    fused = _history(data_dir, *options)
    plain = _history(data_dir)
    assert fused[-1]["train_loss"] != pytest.approx(plain[-1]["train_loss"], rel=1e-2)  # the option does something
    for backend, rel in (("fused-step", 1e-4), ("stock", 1e-4)):
        other = _history(data_dir, "--backend", backend, *options)
        for f, o in zip(fused, other):
            assert o["train_loss"] == pytest.approx(f["train_loss"], rel=rel), backend
            assert o["test_loss"] == pytest.approx(f["test_loss"], rel=1e-3), backend


def test_label_smoothing_scores_with_plain_cross_entropy(data_dir):
    smoothed = _history(data_dir, "--label-smoothing", "0.5")
    # The smoothed training loss stays far from 0, the plain test loss does not carry the smoothing term.
    assert smoothed[-1]["train_loss"] > smoothed[-1]["test_loss"]


def test_adam_takes_weight_decay(data_dir):
    assert _history(data_dir, "--optimizer", "adam", "--weight-decay", "0.01")[-1]["train_loss"] < 2.3


@pytest.mark.parametrize("argv, message", [
    (["--weight-decay", "-0.1"], "argument --weight-decay: expected a number >= 0"),
    (["--weight-decay", "inf"], "argument --weight-decay: expected a number >= 0"),
    (["--label-smoothing", "1.5"], "argument --label-smoothing: expected a number in [0, 1]"),
    (["--label-smoothing", "nan"], "argument --label-smoothing: expected a number in [0, 1]"),
    (["--val-split", "-1"], "argument --val-split: expected an integer >= 0"),
    (["--eval-test-every-epoch"], "--eval-test-every-epoch goes with --val-split N"),
    (["--resume"], "--resume needs --checkpoint PATH or --output-dir DIR"),
])
def test_option_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# --val-split


def test_val_split_scores_the_held_out_images_each_epoch_and_the_test_set_once(run, tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    assert run("--epochs", "2", "--val-split", "64", "--metrics", str(metrics)) == 0
    out = capsys.readouterr().out
    assert "mnist: 256 training (64 held out for validation) / 80 test images" in out
    assert out.count("val accuracy") == 2 and out.count("test accuracy") == 1  # the final line
    lines = _lines(metrics)
    assert all("val_loss" in h and "test_loss" not in h for h in lines[1:-1])
    assert set(lines[-1]["final"]) == {"epochs", "test_loss", "test_accuracy"}


def test_eval_test_every_epoch_scores_both(run, tmp_path, capsys):
    assert run("--epochs", "2", "--val-split", "64", "--eval-test-every-epoch") == 0
    out = capsys.readouterr().out
    assert out.count("val accuracy") == 2 and out.count("test accuracy") == 3


def test_val_split_is_deterministic_given_the_seed_and_disjoint_from_training():
    labels = torch.arange(100)
    split = data.Split(labels.float().reshape(100, 1, 1, 1).expand(100, 1, 28, 28), labels)
    kept, held = train._hold_out(split, 30, seed=1)
    again, held_again = train._hold_out(split, 30, seed=1)
    _, other = train._hold_out(split, 30, seed=2)
    assert torch.equal(held.labels, held_again.labels) and torch.equal(kept.labels, again.labels)
    assert not torch.equal(held.labels, other.labels)
    assert sorted(kept.labels.tolist() + held.labels.tolist()) == list(range(100))
    assert kept.labels.tolist() == sorted(kept.labels.tolist())  # the rest keep their order
    assert torch.equal(kept.images[:, 0, 0, 0], kept.labels.float())  # images stay with their labels


def test_a_val_split_that_leaves_nothing_to_train_is_one_line(run, capsys):
    assert run("--epochs", "1", "--limit", "100", "--val-split", "100") == 1
    err = capsys.readouterr().err
    assert "error: --val-split 100 leaves no training images: the training set has 100" in err
    assert "Traceback" not in err


def test_the_plot_shows_the_validation_curves(run, tmp_path):
    plot = tmp_path / "curves.png"
    assert run("--epochs", "2", "--val-split", "64", "--plot", str(plot)) == 0
    assert plot.read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------------------------
# --output-dir


def test_output_dir_collects_the_files_and_resumes_from_there(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    undo = _interrupt_after(monkeypatch, epochs=1)
    assert run("--epochs", "2", "--output-dir", str(out), "--show", "2") == 130
    undo()
    assert run("--epochs", "2", "--output-dir", str(out), "--show", "2", "--resume") == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl", "predictions.png"]
    assert load_checkpoint(out / "checkpoint.pt")["epochs_done"] == 2
    assert [line.get("epoch") for line in _lines(out / "metrics.jsonl")][1:3] == [1, 2]


def test_explicit_paths_win_over_output_dir(tmp_path):
    args = parse_args(["--output-dir", str(tmp_path / "out"), "--metrics", str(tmp_path / "elsewhere.jsonl")])
    assert args.metrics == tmp_path / "elsewhere.jsonl" and args.checkpoint == tmp_path / "out" / "checkpoint.pt"
    assert args.plot == tmp_path / "out" / "curves.png" and args.show_file == tmp_path / "out" / "predictions.png"
    assert parse_args([]).show_file.name == "predictions.png" and parse_args([]).checkpoint is None


def test_output_dir_without_matplotlib_skips_the_plot_and_says_so(run, tmp_path, monkeypatch, capsys):
    real_find_spec = train_options.importlib.util.find_spec
    monkeypatch.setattr(train_options.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    out = tmp_path / "out"
    assert run("--epochs", "1", "--output-dir", str(out)) == 0
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


# ----------------------------------------------------------------------------------------------
# Resume with the new options


@pytest.mark.parametrize("options", [
    ("--weight-decay", "0.01", "--label-smoothing", "0.1", "--val-split", "64"),
    ("--backend", "fused-step", "--weight-decay", "0.01", "--label-smoothing", "0.1", "--val-split", "64"),
    ("--backend", "stock", "--label-smoothing", "0.1", "--optimizer", "adam", "--weight-decay", "0.01"),
])
def test_resume_is_exact_with_the_new_options(run, tmp_path, monkeypatch, options):
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    assert run("--epochs", "3", "--checkpoint", str(straight), *options) == 0
    undo = _interrupt_after(monkeypatch, epochs=1)
    assert run("--epochs", "3", "--checkpoint", str(resumed), *options) == 130
    undo()
    assert run("--epochs", "3", "--checkpoint", str(resumed), "--resume", *options) == 0
    _assert_same_weights(_weights(straight), _weights(resumed))
    last = [load_checkpoint(path)["history"][-1]["train_loss"] for path in (straight, resumed)]
    assert last[0] == last[1]


@pytest.mark.parametrize("option, value, saved", [
    ("--weight-decay", "0.1", "0.0"), ("--label-smoothing", "0.1", "0.0"), ("--val-split", "10", "0"),
])
def test_the_new_run_defining_options_are_checked_on_resume(run, tmp_path, capsys, option, value, saved):
    # The refusal names the option with the new value and the checkpoint's.
    assert_resume_refused(run, tmp_path / "run.pt", capsys, [option, value], f"{option} {value} (checkpoint: {saved})")


def test_a_checkpoint_from_before_the_new_options_still_resumes(run, tmp_path):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--schedule", "constant", "--checkpoint", str(checkpoint)) == 0
    state = torch.load(checkpoint, weights_only=True)
    for name in ("weight_decay", "label_smoothing", "val_split"):
        del state["options"][name]
    torch.save(state, checkpoint)
    assert run("--epochs", "2", "--schedule", "constant", "--checkpoint", str(checkpoint), "--resume") == 0
    assert run("--epochs", "3", "--schedule", "constant", "--checkpoint", str(checkpoint), "--resume",
               "--weight-decay", "0.1") == 1


def test_help_lists_the_new_options():
    text = build_parser().format_help()
    for option in ("--weight-decay", "--label-smoothing", "--val-split", "--eval-test-every-epoch", "--output-dir",
                   "--tensorboard", "--metrics", "--ddp-timeout"):
        assert option in text


# ----------------------------------------------------------------------------------------------
# --flush-denormal


def _flushes() -> bool:
    return bool(torch.tensor(1e-39) * 1.0 == 0)  # 1e-39: a float32 denormal


def test_flush_denormal_holds_for_the_run_only(run, monkeypatch, flush_denormal):
    seen = []
    real_train = train._train
    monkeypatch.setattr(train, "_train", lambda *a: (seen.append(_flushes()), real_train(*a))[1])
    assert run("--epochs", "1", "--backend", "fused-step", "--flush-denormal") == 0
    assert run("--epochs", "1") == 0
    assert seen == [True, False] and not _flushes()  # and the caller's mode is back
