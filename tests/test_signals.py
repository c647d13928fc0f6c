"""Signals are normal events for `gopc train`: SIGINT or SIGTERM mid-run writes a checkpoint at the step
the run stands at, ends the MLflow run KILLED, and says in one line how to resume; the resumed run
follows the uninterrupted loss curve and MLflow holds every step once.

Deterministic: `train.inject=wait@STEP` makes the real `gopc train` process stand still before STEP and
say so on stdout; the test reads that line (a blocking read, no sleeps, no polling) and only then sends
the signal, so the run is always interrupted at STEP, never racing it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import mlflow
import torch
import yaml

from conftest import tiny
from gopc.cli import main

TINY = tiny(data={"speed_min": 1.0, "speed_max": 2.0}, model={"kind": "gopc1", "lstm_dim": 8},
            # checkpoints every 5 steps: the signals below land between them, so only the signal can save there
            train={"steps": 12, "log_every": 1, "ckpt_every": 5})


def start(cwd, *argv) -> subprocess.Popen:
    """`gopc train ARGV` in a process of its own. Every run a test compares runs this way, at one thread:
    torch's reductions follow the thread count, so a curve is bit-identical only at the same count."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gopc.cli", "train", "--quiet", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_to_end(cwd, *argv) -> None:
    """`gopc train ARGV` to its end, in a process like the interrupted ones (the same thread count)."""
    proc = start(cwd, *argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def interrupt(cwd, sig: signal.Signals, step: int, *argv, while_waiting=None) -> tuple[int, str]:
    """Run `gopc train ARGV` until it stands before `step`, call `while_waiting`, send `sig`; returns
    (exit code, stderr)."""
    proc = start(cwd, *argv, "--set", f"train.inject=wait@{step}")
    try:
        line = proc.stdout.readline()  # blocks until the run stands before `step` (or ends: then '')
        assert f"waiting before step {step}" in line, (line, proc.stderr.read() if not line else "")
        if while_waiting:
            while_waiting()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)  # a safety net only: the run ends right after the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def checkpoint_step(run_dir) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]


def history(client, run_id, key="train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def run_of(client, run_dir):
    return client.get_run((run_dir / "mlflow_run_id").read_text().strip())


def test_sigint_then_sigterm_mid_run_resume_onto_the_uninterrupted_curve(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    train_to_end(tmp_path, "--config", "run.yaml", "--out", "full")  # the reference
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    cut = tmp_path / "cut"

    # SIGINT before step 4; meanwhile a second run into the same folder is refused (it is locked)
    def second_run_is_refused():
        assert main(["train", "--resume", "cut", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--resume: cut is in use by another run" in err, err

    code, err = interrupt(tmp_path, signal.SIGINT, 4, "--config", "run.yaml", "--out", "cut",
                          while_waiting=second_run_is_refused)
    assert code == 128 + signal.SIGINT, err
    assert [l for l in err.splitlines() if "resume" in l] == [
        "gopc: SIGINT at step 4: checkpoint saved; resume with: gopc train --resume cut"], err
    assert "Traceback" not in err
    assert checkpoint_step(cut) == 4 and not (cut / "checkpoint.pt.tmp").exists()
    run = run_of(client, cut)
    assert run.info.status == "KILLED" and run.data.tags["status"] == "killed"

    # resumed, then SIGTERM before step 9
    code, err = interrupt(tmp_path, signal.SIGTERM, 9, "--resume", "cut")
    assert code == 128 + signal.SIGTERM, err
    assert [l for l in err.splitlines() if "resume" in l] == [
        "gopc: SIGTERM at step 9: checkpoint saved; resume with: gopc train --resume cut"], err
    assert checkpoint_step(cut) == 9
    run = run_of(client, cut)
    assert run.info.status == "KILLED" and run.data.tags["status"] == "killed"

    # resumed to the end
    proc = start(tmp_path, "--resume", "cut", "--set", "train.inject=''")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run = run_of(client, cut)
    assert run.info.status == "FINISHED" and run.data.tags["status"] in ("learned", "collapsed")

    full = run_of(client, tmp_path / "full")
    for key in run.data.metrics:  # every metric: each step once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert history(client, run.info.run_id) == history(client, full.info.run_id)  # bit-identical on the CPU
    assert [s for s, _ in history(client, run.info.run_id)] == list(range(1, 13))
    assert run.data.metrics["val/prior/mse"] == full.data.metrics["val/prior/mse"]


def test_a_run_killed_outright_resumes_without_logging_a_step_twice(tmp_path, monkeypatch):
    """SIGKILL cannot be caught: the run dies 2 steps after its last checkpoint, having logged them. The
    resumed run trains those steps again (to the same values); MLflow keeps the first rows only. The
    dead run's lock went with it: the folder is free at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    code, _ = interrupt(tmp_path, signal.SIGKILL, 7, "--config", "run.yaml", "--out", "cut")
    assert code == -signal.SIGKILL and checkpoint_step(tmp_path / "cut") == 5
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (tmp_path / "cut" / "mlflow_run_id").read_text().strip()
    assert [s for s, _ in history(client, run_id)] == list(range(1, 8))  # 6 and 7: logged, not checkpointed

    train_to_end(tmp_path, "--resume", "cut", "--set", "train.inject=''")
    train_to_end(tmp_path, "--config", "run.yaml", "--out", "full")  # the reference
    full_id = (tmp_path / "full" / "mlflow_run_id").read_text().strip()
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert history(client, run_id) == history(client, full_id)
