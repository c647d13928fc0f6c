"""A full disk, for real: a small tmpfs holds the run folder or the sweep's storage (the MLflow and Optuna
databases stay in the test's folder, off it). At a known event the test fills it to the last byte with a
file (posix_fallocate of all that is free), so the very next write finds no space. The command must stop
in one line naming the folder, leave no MLflow run RUNNING, keep what it had saved, and, once the file is
removed, finish with --resume. docs/bad_input.md, "A full disk", lists these tests.

Needs root (mount); the suite runs as root."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import mlflow
import optuna
import pytest
import ray
import torch
import yaml
from test_faults import FAST, SWEEP_PY, children
from test_signals import TINY

from gopc.cli import main as gopc_main
from gopc.sweep.search import main as sweep_main
from gopc.sweep.snapshot import GOOD, whole

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def disk(tmp_path, request):
    """A tmpfs of `request.param` (e.g. '1m') at tmp_path/disk, unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={getattr(request, 'param', '4m')}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode:  # a process still holds a file: detach it
            subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder) -> str:
    """Takes every free byte of `folder`'s file system with one file; returns its path (remove it to free)."""
    path = os.path.join(folder, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        st = os.statvfs(folder)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return path


def lines_of(err: str, prog: str) -> list[str]:
    """The command's own lines (MLflow's and Tune's logging share stderr)."""
    return [line for line in err.splitlines() if line.startswith(f"{prog}: ")]


# 4 steps, a checkpoint every 2: the disk fills after the first, so the second finds no space
RUN = {**TINY, "train": {**TINY["train"], "steps": 4, "ckpt_every": 2}}


@pytest.mark.parametrize("disk", ["1m"], indirect=True)
def test_train_whose_disk_fills_at_a_checkpoint_stops_in_one_line_and_resumes(tmp_path, disk, monkeypatch, capfd):
    """The disk fills right after the checkpoint of step 2: the checkpoint of step 4 finds no space. The
    run keeps the checkpoint of step 2, ends KILLED, and --resume finishes it."""
    import gopc.train as T
    monkeypatch.chdir(tmp_path)  # mlflow.db here, off the tmpfs
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(RUN))
    save, filler = T.save_checkpoint, []

    def save_then_fill(path, step, *args):
        saved = save(path, step, *args)
        if step == 2:
            filler.append(fill(disk))
        return saved

    monkeypatch.setattr(T, "save_checkpoint", save_then_fill)
    cut = disk / "cut"
    assert gopc_main(["train", "--config", "run.yaml", "--out", str(cut), "--quiet"]) == 2
    err = capfd.readouterr().err
    assert lines_of(err, "gopc") == [
        f"gopc: error: --out: no space left on device in {cut} at step 4; its checkpoint of step 2 is kept: "
        f"free space, then resume with: gopc train --resume {cut}"], err
    assert "Traceback" not in err
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (cut / "checkpoint.pt.tmp").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (cut / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["status"] == "disk full"

    os.remove(filler[0])  # space again
    monkeypatch.setattr(T, "save_checkpoint", save)
    assert gopc_main(["train", "--resume", str(cut), "--quiet"]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] in ("learned", "collapsed")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]


def test_sweep_whose_storage_fills_stops_in_one_line_and_resumes(tmp_path, disk, monkeypatch, capfd):
    """The storage fills as the driver takes in the trial's first result (at step 20 of 40): the trial is
    still waiting in tune.report then, so its next checkpoint is the first write to find no space. Tune
    also cannot save that result's experiment state whole: it is ten times the size of the one it replaces
    (no result in it yet), which the filled disk gave back; --resume puts back the good copy kept of it."""
    from gopc.sweep.trial_tracking import SweepTracker
    experiment = disk / "sweep_results" / "gopc2_stability"
    args = FAST + ["--set", "num_samples=1", "--set", f"storage={disk}/sweep_results"]
    monkeypatch.chdir(tmp_path)  # mlflow.db, optuna.db and the queued MLflow writes here, off the tmpfs
    monkeypatch.setattr(sys, "argv", [SWEEP_PY])  # the script the printed --resume command names
    take_in, filler = SweepTracker.on_trial_result, []

    def take_in_then_fill(self, iteration, trials, trial, result, **info):
        take_in(self, iteration, trials, trial, result, **info)
        if result.get("step") == 20 and not filler:
            assert list(experiment.glob(".good/experiment_state-*.json")), "no good copy of the state was kept"
            filler.append(fill(disk))

    monkeypatch.setattr(SweepTracker, "on_trial_result", take_in_then_fill)
    try:
        assert sweep_main(args) == 2
        err = capfd.readouterr().err
        command = shlex.join(["python", SWEEP_PY, *args, "--resume"])
        assert lines_of(err, "gopc2_stability") == [
            f"gopc2_stability: error: storage: no space left on device in {experiment}; sweep 'gopc2_stability' "
            f"stopped with 0 of 1 trials finished, its last good state kept: free space, then resume with: {command}"], err
        assert "Traceback" not in err
        client, runs, parents = children(f"sqlite:///{tmp_path}/mlflow.db")
        assert [(p.info.status, p.data.tags["status"]) for p in parents] == [("KILLED", "disk full")]
        assert [(r.info.status, r.data.tags["status"]) for r in runs] == [("KILLED", "interrupted")]
        state = next(experiment.glob("experiment_state-*.json"))  # what Tune.restore failed on (JSONDecodeError)
        assert not whole(state.name, state.read_bytes()) and whole(state.name, (experiment / GOOD / state.name).read_bytes())

        os.remove(filler[0])  # space again; the same Ray serves the resume, as a second driver would join it
        monkeypatch.setattr(SweepTracker, "on_trial_result", take_in)
        assert sweep_main(args + ["--resume"]) == 0
    finally:
        ray.shutdown()
    err = capfd.readouterr().err
    assert "put back the last good copy of experiment_state-" in err, err
    from ray.tune import ExperimentAnalysis
    assert [t.status for t in ExperimentAnalysis(str(experiment)).trials] == ["TERMINATED"]
    client, runs, parents = children(f"sqlite:///{tmp_path}/mlflow.db")
    assert [(p.info.status, p.data.tags["status"]) for p in parents] == [("FINISHED", "completed")]
    assert [(r.info.status, r.data.tags["status"]) for r in runs] in ([("FINISHED", "collapsed")],
                                                                      [("FINISHED", "learned")])
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/prior/mse")]
    assert sorted(steps) == [20, 40]  # each validation once (conftest checks every metric of every run)
    study = optuna.load_study(study_name="gopc2_stability", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


@pytest.mark.parametrize("disk", ["64k"], indirect=True)
def test_tune_snapshot_files_cut_short_by_the_full_disk_are_put_back_from_their_good_copies(disk):
    """The snapshot's two kinds of file (the trial list's JSON, the pickles), each rewritten onto the full
    disk and cut short by it: the good copy kept before stays as it was, and repair() puts it back. A file
    cut short with no good copy is refused in one line."""
    import json
    import pickle

    from gopc.errors import GopcError
    from gopc.sweep.snapshot import KeepGoodCopies, repair
    experiment = disk / "exp"
    experiment.mkdir()
    files = {"experiment_state-t.json": lambda n: json.dumps({"trial_data": ["x" * n]}).encode(),
             "searcher-state-t.pkl": lambda n: pickle.dumps({"trials": "x" * n})}
    for name, content in files.items():
        (experiment / name).write_bytes(content(100))
    keeper = KeepGoodCopies(str(experiment))
    keeper.keep()
    filler = fill(disk)
    for name, content in files.items():  # Tune's rewrite, in place: truncated, then written until no space
        with pytest.raises(OSError, match="No space left"), open(experiment / name, "wb") as f:
            f.write(content(64 * 1024))
        assert not whole(name, (experiment / name).read_bytes())
    keeper.keep()  # a file cut short is not copied over its good copy
    os.remove(filler)
    assert repair(str(experiment)) == sorted(files)
    assert {name: (experiment / name).read_bytes() for name in files} == {n: c(100) for n, c in files.items()}

    (experiment / "experiment_state-t.json").write_bytes(b'{"trial_data": [')
    (experiment / GOOD / "experiment_state-t.json").unlink()
    with pytest.raises(GopcError, match=r"^--resume: .*experiment_state-t.json was cut short \(the disk filled") as e:
        repair(str(experiment))
    assert "\n" not in str(e.value)
