"""Signals are normal events for the sweep and study drivers too: SIGINT, SIGTERM, a double SIGINT and
Ctrl-C to the whole process group, each mid-experiment, stop it through Tune's graceful stop, with no
summary or verdict, every unfinished MLflow run and the parent KILLED, the Optuna trials of cut trials
not shown as finished, one line naming the exact --resume command, and exit 128 + the signal. That
command then finishes the experiment with every trial once and no metric step twice (conftest).

Deterministic: each signal is sent once a trial has reported a validation, found by waiting on its
row in the MLflow database (a deadline, no fixed sleeps)."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import mlflow
import optuna
import yaml

from conftest import base_sets, metric_rows, tiny, wait_for
from gopc.sweep.run import resume_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(ROOT, "sweeps", "gopc2_stability.py")
STUDY_PY = os.path.join(ROOT, "sweeps", "gopc2_study.py")
TINY = tiny(model={"lstm_dim": 16}, train={"steps": 40})
# 3 tiny trials of 2 Tune iterations, 2 at a time: the signal lands while trials still run or wait
SWEEP_ARGS = ["--preset", "smoke", "--set", "num_samples=3", "--set", "scheduler.type=fifo",
              "--set", "start_points=[{stab.out_act: sigmoid}]"] + base_sets(TINY)
STUDY = {"name": "sig_study", "seeds": [0, 1], "report_every": 20, "max_concurrent": 2,
         "resources": {"cpu": 1, "gpu": 0},
         "base": TINY,
         "arms": [{"name": "gopc1", "set": {"model.kind": "gopc1"}}, {"name": "vae1", "set": {"model.kind": "vae1"}}]}


def validations(db) -> int:
    return metric_rows(db, "val/prior/mse")


def interrupt(cwd, argv, signals, group=False, after: int = 0) -> tuple[int, str]:
    """Start the driver, wait until more than `after` validations are logged, send `signals` (to its
    process group if `group`: Ctrl-C in a terminal); returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert wait_for(lambda: validations(cwd / "mlflow.db") > after or proc.poll() is not None, 300)
        assert proc.poll() is None, proc.communicate()
        seen = []
        for i, sig in enumerate(signals):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            if i + 1 < len(signals):  # two signals at once would arrive as one: the next once Tune is stopping
                while (line := proc.stderr.readline()) and "Stop signal received" not in line:
                    seen.append(line)
                seen.append(line)
        _, err = proc.communicate(timeout=300)  # a safety net: the stop takes seconds
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, "".join(seen) + err


def resume_in(cwd, command: str, monkeypatch) -> int:
    """The printed `--resume` command, run to the end as its script runs, but in this process (nothing
    interrupts it: no process of its own needed); returns its exit code."""
    import runpy

    import ray
    script, *args = shlex.split(command)[1:]
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # the script's sys.exit(main())
        return e.code
    finally:
        ray.shutdown()
    raise AssertionError(f"{script} ended without sys.exit")


def runs(uri, experiment):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.role = 'trial'"), \
        client.search_runs([exp.experiment_id], "tags.role = 'parent'")


# an INFO line as Ray (2026-12-06 02:42:05,624<tab>INFO), Optuna ([I 2026-...]) or MLflow (2026/12/06 ... INFO) write it
LIBRARY_INFO = re.compile(r"^(\[I \d{4}-|\d{4}[-/]\d\d[-/]\d\d \d\d:\d\d:\d\d[,.\d]*\s+INFO\b)", re.M)


def check_stopped(folder, code, err, kind, experiment, signals, n) -> str:
    """The stop: exit code, its one line, MLflow and Optuna states. Returns the --resume command."""
    prog, name = {"sweep": "gopc2_stability", "study": "gopc2_study"}[kind], signals[0].name
    assert code == 128 + signals[0], err
    assert "Traceback" not in err and "SystemExit" not in err and "KeyboardInterrupt" not in err, err
    assert not LIBRARY_INFO.search(err), err  # the driver's own lines: Ray's, Optuna's, MLflow's INFO only with --verbose
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: ")]
    ack = [f"{prog}: {name} again: already stopping, the experiment state is being saved; it stays resumable"]
    assert lines[:-1] == (ack if len(signals) == 2 else []), err
    line = lines[-1]
    assert line.startswith(f"{prog}: {name}: {kind} {experiment!r} stopped with "), err
    assert " trials finished; state saved, resume with: " in line, err
    finished, total = map(int, line.split(" stopped with ")[1].split(" trials finished")[0].split(" of "))
    assert finished < n and total == n
    trials, parents = runs(f"sqlite:///{folder}/mlflow.db", experiment)
    assert [p.info.status for p in parents] == ["KILLED"] and parents[0].data.tags["status"] == "interrupted"
    assert trials and all(r.info.status != "RUNNING" for r in trials)
    assert sum(r.data.tags["status"] == "interrupted" for r in trials) == len(trials) - finished
    for what in ("verdict", "summary"):  # nothing summed up from an incomplete experiment
        assert not (folder / "sweep_results" / experiment / what).exists()
    if kind == "sweep":  # the cut trials' Optuna trials are not shown as finished
        study = optuna.load_study(study_name=experiment, storage=f"sqlite:///{folder}/optuna.db")
        assert sum(t.state.is_finished() for t in study.trials) == finished
    return line.split("resume with: ")[1]


def check_finished(folder, kind, experiment, n):
    trials, parents = runs(f"sqlite:///{folder}/mlflow.db", experiment)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(trials) == n and len({r.data.tags["trial_id"] for r in trials}) == n
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") and r.data.tags["status"] != "interrupted"
               for r in trials), [(r.info.status, r.data.tags["status"]) for r in trials]
    if kind == "sweep":
        study = optuna.load_study(study_name=experiment, storage=f"sqlite:///{folder}/optuna.db")
        assert len(study.trials) == n and all(t.state.is_finished() for t in study.trials)
    else:
        assert (folder / "sweep_results" / experiment / "verdict" / "verdict.json").exists()


def test_sweep_SIGINT_then_SIGTERM_on_the_resumed_sweep_then_resume_to_the_end(tmp_path, monkeypatch):
    argv = [SWEEP_PY, *SWEEP_ARGS]
    code, err = interrupt(tmp_path, argv, [signal.SIGINT])
    command = check_stopped(tmp_path, code, err, "sweep", "gopc2_stability", [signal.SIGINT], 3)
    assert command == shlex.join(["python", *argv, "--resume"])
    logged = validations(tmp_path / "mlflow.db")

    code, err = interrupt(tmp_path, shlex.split(command)[1:], [signal.SIGTERM], after=logged)
    assert check_stopped(tmp_path, code, err, "sweep", "gopc2_stability", [signal.SIGTERM], 3) == command

    assert resume_in(tmp_path, command, monkeypatch) == 0
    check_finished(tmp_path, "sweep", "gopc2_stability", 3)


def test_study_double_ctrl_c_to_the_process_group_then_resume(tmp_path, monkeypatch):
    """Ctrl-C in a terminal reaches the driver and every process of its group; pressed twice."""
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    argv = [STUDY_PY, "--config", "study.yaml"]
    code, err = interrupt(tmp_path, argv, [signal.SIGINT, signal.SIGINT], group=True)
    command = check_stopped(tmp_path, code, err, "study", "sig_study", [signal.SIGINT, signal.SIGINT], 4)
    assert resume_in(tmp_path, command, monkeypatch) == 0
    check_finished(tmp_path, "study", "sig_study", 4)


def test_the_resume_command_repeats_the_arguments_once():
    from gopc.sweep.search import SWEEP
    assert resume_command(SWEEP, ["--preset", "smoke", "--resume"]).endswith(" --preset smoke --resume")
