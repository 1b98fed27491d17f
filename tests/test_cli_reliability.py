"""mnist_fast.train under adverse conditions (issue 12): outputs that are links, devices or FIFOs,
SIGTERM, temp files of killed runs, a full disk, malformed checkpoints and data, stuck DDP ranks."""
import datetime
import errno
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mnist_fast import checkpoint as checkpoint_module
from mnist_fast import distributed, train
from mnist_fast.checkpoint import load_checkpoint, remove_stale_temp_files, write_output
from mnist_fast.recipe import build_model, build_optimizer
from mnist_fast.train import main, parse_args
from helpers import child_env, write_banded_dataset
from test_train import _assert_same_weights, _weights

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(data_dir, *options):
    """The command line of a training process on the small data set."""
    return [sys.executable, "-m", "mnist_fast.train", "--data-dir", str(data_dir), "--no-download",
            "--batch-size", "32", *options]


def _child_env(**extra):
    """The environment of a child run (started in tmp_path: see helpers.child_env), outside any torchrun."""
    env = {key: value for key, value in child_env().items() if key not in ("WORLD_SIZE", "RANK")}
    return dict(env, **extra)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# 1. Output paths that are not regular files


@pytest.mark.parametrize("option, check", [
    ("--checkpoint", lambda path: load_checkpoint(path)["epochs_done"] == 1),
    ("--metrics", lambda path: json.loads(path.read_text().splitlines()[1])["epoch"] == 1),
    ("--plot", lambda path: path.read_bytes()[:8] == PNG),
])
def test_a_symlinked_output_keeps_its_link_and_updates_the_target(run, tmp_path, option, check):
    (tmp_path / "store").mkdir()
    target, link = tmp_path / "store" / "real-file", tmp_path / "link"
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert run("--epochs", "1", option, str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert check(target)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["real-file"]  # no temp file left


def test_a_dangling_symlink_creates_its_target(run, tmp_path):
    link, target = tmp_path / "run.pt", tmp_path / "runs" / "first.pt"
    link.symlink_to(target)
    assert run("--epochs", "1", "--checkpoint", str(link)) == 0
    assert link.is_symlink() and load_checkpoint(target)["epochs_done"] == 1


def test_a_fifo_output_is_written_through(run, tmp_path):
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert run("--epochs", "1", "--metrics", str(fifo)) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    lines = [json.loads(line) for line in received[0].splitlines()]
    assert [next(iter(line)) for line in lines] == ["run", "epoch", "final"]


def test_a_device_output_is_written_through(run, tmp_path):
    # Through a link to /dev/null, so that a broken implementation replaces the link, not /dev/null.
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    assert run("--epochs", "1", "--metrics", str(link), "--checkpoint", str(link)) == 0
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "null"]


@pytest.mark.slow  # child processes: 30-55 s each on the shared development machine
def test_metrics_to_dev_stdout_redirected_into_a_file_append_to_it(data_dir, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        done = subprocess.run(_cli(data_dir, "--epochs", "1", "--metrics", "/dev/stdout"), env=_child_env(),
                              cwd=tmp_path, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = log.read_text()
    assert "done: mnist, 1 epoch" in text and '{"epoch": 1' in text and '{"final"' in text  # log and metrics
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "mnist"]


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="needs a writable /dev/shm")
def test_a_regular_file_under_dev_is_replaced_not_appended_to(tmp_path):
    path = Path("/dev/shm") / f"mnist-fast-test-{os.getpid()}.bin"
    link = tmp_path / "stdout-like"
    link.symlink_to("/dev/stdout")
    try:
        write_output(path, b"first")
        write_output(path, b"second")
        assert path.read_bytes() == b"second"
    finally:
        path.unlink(missing_ok=True)
    assert checkpoint_module.writes_through(link) and checkpoint_module.writes_through("/proc/self/fd/1")
    assert not checkpoint_module.writes_through(tmp_path / "new-file")


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_output(path, b"[]")
    assert path.read_bytes() == b"[]" and stat.S_IMODE(path.stat().st_mode) == 0o640


# ----------------------------------------------------------------------------------------------
# 7. SIGTERM, and the temp files of killed runs


def _wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # child processes: 30-55 s each on the shared development machine
def test_sigterm_stops_the_run_as_ctrl_c_does(data_dir, tmp_path):
    checkpoint = tmp_path / "run.pt"
    child = subprocess.Popen(_cli(data_dir, "--epochs", "100000", "--schedule", "constant",
                                  "--checkpoint", str(checkpoint)),
                             env=_child_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for(checkpoint.exists)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143
    assert _one_error_line(err) == (f"mnist_fast.train: terminated (SIGTERM); continue with --resume "
                                    f"--checkpoint {checkpoint}")
    assert load_checkpoint(checkpoint)["epochs_done"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "run.pt"]


def _sigterm_at(monkeypatch, target, attribute, calls_before):
    """Deliver SIGTERM to this process at call number calls_before + 1 of target.attribute."""
    real, calls = getattr(target, attribute), []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, between two bytecodes
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attribute, terminated)
    return lambda: monkeypatch.setattr(target, attribute, real)


def test_sigterm_then_resume_ends_with_the_weights_of_an_uninterrupted_run(run, tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    assert run("--epochs", "3", "--checkpoint", str(straight)) == 0
    undo = _sigterm_at(monkeypatch, train, "train_epoch", calls_before=1)
    assert run("--epochs", "3", "--checkpoint", str(resumed)) == 143
    assert "continue with --resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the old handler back
    undo()
    assert load_checkpoint(resumed)["epochs_done"] == 1
    assert run("--epochs", "3", "--checkpoint", str(resumed), "--resume") == 0
    _assert_same_weights(_weights(straight), _weights(resumed))


def test_sigterm_while_writing_the_checkpoint_keeps_the_previous_one(run, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "run.pt"
    real_write, calls = checkpoint_module._write, []

    def write_half_then_terminated(path, data, exclusive):
        calls.append(path)
        if len(calls) == 1:
            return real_write(path, data, exclusive)
        real_write(path, data[: len(data) // 2], exclusive)  # the second save: killed half-way
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(checkpoint_module, "_write", write_half_then_terminated)
    assert run("--epochs", "3", "--checkpoint", str(checkpoint)) == 143
    assert load_checkpoint(checkpoint)["epochs_done"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "run.pt"]


def test_sigterm_before_the_first_checkpoint_says_there_is_none(run, tmp_path, monkeypatch, capsys):
    _sigterm_at(monkeypatch, train, "train_epoch", calls_before=0)
    assert run("--epochs", "2", "--checkpoint", str(tmp_path / "run.pt")) == 143
    assert "before the first epoch ended; no checkpoint was written" in capsys.readouterr().err


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temp_files_of_killed_runs_are_removed_by_the_next_run(run, tmp_path):
    checkpoint = tmp_path / "run.pt"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".run.pt.{dead}.tmp"
    kept = [tmp_path / f".run.pt.{alive}.tmp",  # a process that still runs may be writing it
            tmp_path / ".run.pt.x1.tmp", tmp_path / f".other.pt.{dead}.tmp", tmp_path / f"run.pt.{dead}.tmp"]
    for path in [stale, *kept]:
        path.write_bytes(b"half a checkpoint")
    assert run("--epochs", "1", "--checkpoint", str(checkpoint)) == 0
    assert not stale.exists() and all(path.exists() for path in kept)


def test_stale_temp_files_are_looked_for_beside_the_target_of_a_link(tmp_path):
    (tmp_path / "store").mkdir()
    target, link = tmp_path / "store" / "run.pt", tmp_path / "run.pt"
    link.symlink_to(target)
    stale = tmp_path / "store" / f".run.pt.{_dead_pid()}.tmp"
    stale.write_bytes(b"")
    remove_stale_temp_files(link)
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# 8. A full disk


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(run, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--schedule", "constant", "--checkpoint", str(checkpoint)) == 0
    before = checkpoint.read_bytes()
    capsys.readouterr()

    def disk_full(path, data, exclusive):
        with open(path, "xb") as f:
            f.write(data[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module, "_write", disk_full)
    assert run("--epochs", "2", "--schedule", "constant", "--checkpoint", str(checkpoint), "--resume") == 1
    assert _one_error_line(capsys.readouterr().err) == (
        f"mnist_fast.train: error: cannot write {checkpoint}: No space left on device; the previous file is unchanged")
    assert checkpoint.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "run.pt"]


@pytest.mark.slow  # child processes: 30-55 s each on the shared development machine
def test_a_real_write_failure_inside_torch_save_is_one_line(data_dir, tmp_path):
    # A file size limit fails the write as a full disk does (EFBIG instead of ENOSPC), in the real code path.
    checkpoint = tmp_path / "run.pt"
    first = subprocess.run(_cli(data_dir, "--epochs", "1", "--schedule", "constant", "--checkpoint", str(checkpoint)),
                           env=_child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    before = checkpoint.read_bytes()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 3, len(before) // 3))

    second = subprocess.run(_cli(data_dir, "--epochs", "2", "--schedule", "constant", "--checkpoint", str(checkpoint),
                                 "--resume"),
                            env=_child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit_file_size)
    assert second.returncode == 1
    assert _one_error_line(second.stderr) == (f"mnist_fast.train: error: cannot write {checkpoint}: File too large; "
                                              f"the previous file is unchanged")
    assert checkpoint.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "run.pt"]


# ----------------------------------------------------------------------------------------------
# 11. One line instead of a traceback: empty data, huge seeds, malformed checkpoints


@pytest.mark.parametrize("split, n_train, n_test", [("training", 0, 80), ("test", 320, 0)])
def test_an_empty_split_is_one_line(tmp_path, capsys, split, n_train, n_test):
    folder = write_banded_dataset(tmp_path / "empty", n_train=n_train, n_test=n_test)
    assert main(["--data-dir", str(folder), "--no-download", "--epochs", "1"]) == 1
    assert f"error: the {split} set of mnist in {folder} is empty" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("seed", [str(2**64), str(2**50), str(2**32), "-1"])
def test_a_seed_out_of_range_is_refused(capsys, seed):
    with pytest.raises(SystemExit) as info:
        parse_args(["--seed", seed])
    assert info.value.code == 2
    assert f"argument --seed: expected an integer in 0..{2**32 - 1}, got {seed}" in capsys.readouterr().err


def test_the_largest_seed_runs(run):
    assert run("--epochs", "1", "--limit", "64", "--seed", str(2**32 - 1)) == 0


def _set(path):
    """A damage: state[path[0]][path[1]]... = value."""
    def damage(value):
        def apply(state):
            node = state
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        return apply
    return damage


MALFORMED = {
    "negative epochs": (_set(["epochs_done"])(-1), "epochs_done is -1, expected an integer >= 0"),
    "epochs as text": (_set(["epochs_done"])("1"), "epochs_done is '1'"),
    "epochs as bool": (_set(["epochs_done"])(True), "epochs_done is True"),
    "options as list": (_set(["options"])([1, 2]), "options is not a table of option names"),
    "weight as list": (_set(["model", "0.weight"])([1.0, 2.0]), "model is not a state dict of named tensors"),
    "weight as float64": (lambda s: s["model"].update({"4.bias": s["model"]["4.bias"].double()}),
                          "4.bias: torch.float64 in the checkpoint, torch.float32 in the model"),
    "optimizer as tensor": (_set(["optimizer"])(torch.zeros(3)), "optimizer is not an optimizer state dict"),
    "momentum buffer shape": (_set(["optimizer", "state", 0, "momentum_buffer"])(torch.zeros(3)),
                              "momentum_buffer of parameter 0 has shape (3,), the parameter (128, 784)"),
    "momentum buffer as text": (_set(["optimizer", "state", 0, "momentum_buffer"])("x"),
                                "momentum_buffer of parameter 0 is 'x', expected a tensor"),
    "momentum setting": (_set(["optimizer", "param_groups", 0, "momentum"])("0.9"), "momentum '0.9' (this run: 0.9)"),
    "parameter count": (_set(["optimizer", "param_groups", 0, "params"])([0, 1]), "2 parameters, this run has 6"),
    "state of an unknown parameter": (_set(["optimizer", "state", 17])({}), "state for parameter 17"),
    "rng size": (_set(["rng", "cpu"])(torch.zeros(10, dtype=torch.uint8)),
                 "the CPU random generator state has 10 bytes"),
    "rng dtype": (_set(["rng", "cpu"])(torch.zeros(5056)), "rng is not a table of random generator states"),
    "history length": (_set(["history"])([]), "history has 0 entries for 1 epochs done"),
    "history entry": (_set(["history", 0, "train_loss"])("low"), "history entry 1 is"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_checkpoint_is_one_line_and_loads_nothing(run, tmp_path, capsys, name):
    damage, message = MALFORMED[name]
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--schedule", "constant", "--checkpoint", str(checkpoint)) == 0
    state = torch.load(checkpoint, weights_only=True)
    damage(state)
    torch.save(state, checkpoint)
    before = checkpoint.read_bytes()
    capsys.readouterr()
    assert run("--epochs", "2", "--schedule", "constant", "--checkpoint", str(checkpoint), "--resume") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"mnist_fast.train: error: {checkpoint}") and message in line
    assert checkpoint.read_bytes() == before


def test_a_checkpoint_past_the_requested_epochs_is_refused(run, tmp_path, capsys):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "2", "--schedule", "constant", "--checkpoint", str(checkpoint)) == 0
    capsys.readouterr()
    assert run("--epochs", "1", "--schedule", "constant", "--checkpoint", str(checkpoint), "--resume") == 1
    assert "has 2 epochs done, more than --epochs 1" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# 12. A stuck DDP rank


def test_ddp_timeout_option():
    assert parse_args([]).ddp_timeout == distributed.DEFAULT_DDP_TIMEOUT_S == 300
    assert parse_args(["--ddp-timeout", "7.5"]).ddp_timeout == 7.5
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            parse_args(["--ddp-timeout", bad])


def test_ddp_timeout_reaches_init_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kwargs: seen.update(kwargs))
    env = distributed.init_distributed("cpu", 7.5)
    assert (env.rank, env.world_size) == (1, 2) and seen["timeout"] == datetime.timedelta(seconds=7.5)

    captured = []

    def fake_init(device, timeout_s):
        captured.append(timeout_s)
        raise KeyboardInterrupt  # stop there

    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(train, "init_distributed", fake_init)
    assert main(["--ddp-timeout", "12"]) == 130 and captured == [12.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALLED_RANK = """
import sys, time
from mnist_fast.distributed import init_distributed
init_distributed("cpu", 5.0)
time.sleep(120)  # stuck, not dead: never reaches a collective
"""


@pytest.mark.slow
def test_a_stuck_rank_fails_the_others_within_the_timeout(data_dir, tmp_path):
    env = _child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    stuck = subprocess.Popen([sys.executable, "-c", STALLED_RANK], env=dict(env, RANK="1"), cwd=tmp_path)
    try:
        started = time.monotonic()
        rank0 = subprocess.run(_cli(data_dir, "--epochs", "1", "--ddp-timeout", "5"), env=dict(env, RANK="0"),
                               cwd=tmp_path, capture_output=True, text=True, timeout=90)
        elapsed = time.monotonic() - started
    finally:
        stuck.kill()
        stuck.wait()
    assert rank0.returncode == 1
    line = _one_error_line(rank0.stderr)
    assert line.startswith("mnist_fast.train: error: rank 0: Timed out waiting 5000ms")
    assert line.endswith("(another process died, or is stuck past --ddp-timeout 5 s)")
    assert elapsed < 60  # torch's default would wait 30 minutes


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_the_ones_there_are(run, tmp_path, monkeypatch):
    checkpoint = tmp_path / "run.pt"
    assert run("--epochs", "1", "--checkpoint", str(checkpoint)) == 0
    state = load_checkpoint(checkpoint)
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda rng, device: restored.append((device, rng.sum().item())))
    args = parse_args(["--epochs", "1", "--batch-size", "32", "--device", "cpu"])
    model, _ = build_model("fused")
    checkpoint_module.restore_checkpoint(checkpoint, state, state["options"], model,
                                         build_optimizer(args, model.parameters()))
    assert restored == [(0, 0)]
