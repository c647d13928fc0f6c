"""Faults a sweep meets on real clusters, each injected and its outcome asserted: nodes dying mid-trial
(and again during the retry), the driver killed at several moments, the tracking server unreachable or
going away, trials that raise or run out of memory, and corrupt input data."""
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import mlflow
import optuna
import pytest
import ray
import torch
import yaml

from conftest import base_sets, free_port, metric_rows, mlflow_count, tiny, wait_for
from gopc import config as C
from gopc.errors import DataError
from gopc.sweep.search import main as sweep_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_YAML = os.path.join(ROOT, "sweeps", "gopc2_stability.yaml")
SWEEP_PY = os.path.join(ROOT, "sweeps", "gopc2_stability.py")
TERMINAL = {"learned", "collapsed", "diverged", "stopped early", "errored"}
SMOKE = ["--config", SWEEP_YAML, "--preset", "smoke", "--set", "start_points=[{stab.out_act: sigmoid}]"]
# trials of 40 tiny steps: what these tests watch is the driver, Ray and the stores, not the training
TINY_SETS = base_sets(tiny(train={"steps": 40}))
FAST = SMOKE + TINY_SETS


def children(uri: str, experiment="gopc2_stability"):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], "tags.role = 'trial'"), \
        client.search_runs([exp.experiment_id], "tags.role = 'parent'")


def tune_trials(folder):
    from ray.tune import ExperimentAnalysis
    return ExperimentAnalysis(str(folder / "sweep_results" / "gopc2_stability"))


def assert_each_trial_once(folder, uri, n):
    analysis = tune_trials(folder)
    assert len(analysis.trials) == n and all(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)
    client, runs, parents = children(uri)
    assert len(parents) == 1 and len(runs) == n and len({r.data.tags["trial_id"] for r in runs}) == n
    assert all(r.data.tags["status"] in TERMINAL for r in runs)
    for r in runs:  # resumed from checkpoints, not restarted: no iteration logged twice
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "diverged")]
        assert len(steps) == len(set(steps)), (r.info.run_name, steps)
    return analysis, client, runs, parents


# ---------------------------------------------------------------------------------------------------
def test_unreachable_tracking_server_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    assert sweep_main(FAST + ["--set", f"tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert uri in err and "tracking_uri" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_trials_that_raise_or_run_out_of_memory_are_errored_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(open(SWEEP_YAML))
    raw["space"] = {"train.inject": {"choices": ["raise@1", "oom@1", ""]}}
    raw["start_points"] = [{"train.inject": "raise@1"}, {"train.inject": "oom@1"}, {"train.inject": ""}]
    raw["base"]["stab"] = {"out_act": "sigmoid"}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    try:
        code = sweep_main(["--config", "sweep.yaml", "--preset", "smoke", "--set", "num_samples=3",
                           "--set", "max_failures=0"] + TINY_SETS)
    finally:
        ray.shutdown()
    assert code == 0
    client, runs, parents = children(f"sqlite:///{tmp_path}/mlflow.db")
    by_status = {}
    for r in runs:
        by_status.setdefault(r.data.tags["status"], []).append(r)
    assert len(by_status["errored"]) == 2 and len(by_status.get("learned", []) + by_status.get("collapsed", [])) == 1
    reasons = " ".join(r.data.tags["error"] for r in by_status["errored"])
    assert "injected failure" in reasons and "OutOfMemoryError" in reasons
    assert parents[0].data.tags["status"] == "completed"


@pytest.mark.cluster
def test_worker_nodes_killed_mid_trial_and_during_the_retry(tmp_path, monkeypatch):
    """A head and five one-CPU workers (ray.cluster_utils.Cluster). The node running a trial dies once
    that trial has checkpointed; when the retries report again, every node then running a trial dies.
    Every trial still finishes exactly once, from its last checkpoint."""
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(5)]  # spares: add_node needs the main thread
    cluster.wait_for_nodes()
    experiment = tmp_path / "sweep_results" / "gopc2_stability"
    kills, failures = [], []

    def reports() -> int:  # results the driver has processed
        return metric_rows(tmp_path / "mlflow.db", "diverged")

    def busy_workers():
        """Worker nodes running a trial: a trial's process is a child of its node's raylet."""
        raylets = {w.all_processes["raylet"][0].process.pid: w for w in workers}
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        return list({id(raylets[int(ppid)]): raylets[int(ppid)] for pid, ppid, *args in map(str.split, out.splitlines())
                     if "ray::ImplicitFunc" in " ".join(args) and int(ppid) in raylets}.values())

    def kill(nodes):
        for node in nodes:
            cluster.remove_node(node)
            workers.remove(node)
        kills.append((len(nodes), reports()))

    def killer():
        try:
            assert wait_for(lambda: any(experiment.glob("*/checkpoint_*")) and busy_workers(), 180)
            kill(busy_workers()[:1])  # mid-trial, with a checkpoint to resume from
            assert wait_for(lambda: reports() >= kills[0][1] + 2 and busy_workers(), 180)
            kill(busy_workers())  # the retried trial is running again: hit it too
        except Exception as e:  # noqa: BLE001: surfaced by the assertion below
            failures.append(repr(e))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        # the smoke preset's trials, 120 steps: long enough to be running when their node dies
        code = sweep_main(SMOKE + ["--set", "num_samples=3", "--set", "max_concurrent=2", "--set", "max_failures=4",
                                   "--set", "scheduler.type=fifo", "--set", "base.train.steps=120"])
    finally:
        thread.join(timeout=5)
        ray.shutdown()
        cluster.shutdown()
    assert not failures and code == 0 and len(kills) == 2, (failures, kills)
    analysis, *_ = assert_each_trial_once(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", 3)
    assert all(t.status == "TERMINATED" for t in analysis.trials)
    assert sum(t.run_metadata.num_failures for t in analysis.trials) >= 2


def sweep_in(folder, args, monkeypatch) -> int:
    """The sweep driver run in this process, in `folder`: what a test does not kill needs no process of its
    own (seconds of imports and shutdown saved per run)."""
    monkeypatch.chdir(folder)
    try:
        return sweep_main(args)
    finally:
        ray.shutdown()


def finished_trials(db) -> int:
    """Trial runs an MLflow database (SQLite file or a server's) holds with a final status."""
    return mlflow_count(db, "select count(*) from tags where key='status' and value in "
                            "('learned','collapsed','diverged','stopped early')", timeout=1)


@pytest.mark.parametrize("moment", ["before-first-result", "between-trials", "while-writing-the-summary"])
def test_driver_killed_then_resumed_loses_and_duplicates_nothing(tmp_path, moment, monkeypatch):
    """SIGKILL to the driver and the local Ray it started (its process group): before any trial
    reported, once a trial finished while the next ran (one at a time), and while the summary was
    written. The resumed sweep ends with each trial once and none run again."""
    n = 2
    args = FAST + ["--set", f"num_samples={n}"] + ["--set", "max_concurrent=1"] * (moment == "between-trials")
    proc = subprocess.Popen([sys.executable, SWEEP_PY, *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    experiment = tmp_path / "sweep_results" / "gopc2_stability"
    hit = wait_for({"before-first-result": lambda: any(experiment.glob("run_trial_*")),
                    "between-trials": lambda: finished_trials(tmp_path / "mlflow.db") >= 1,
                    "while-writing-the-summary": lambda: (experiment / "summary").exists()}[moment], 240)
    assert hit and proc.poll() is None, f"the sweep ended before the moment {moment}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sweep_in(tmp_path, args + ["--resume"], monkeypatch) == 0
    analysis, client, runs, parents = assert_each_trial_once(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", n)
    assert {"trials.csv", "param_importances.png"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert parents[0].data.tags["status"] == "completed"


# ---------------------------------------------------------------------------------------------------
# MLflow 3's server also starts a job runner (GenAI jobs, a dozen worker processes) that nothing here uses
NO_JOBS = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """A real `mlflow server` on loopback, stoppable and restartable on the same port and database."""

    def __init__(self, folder):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder}/server.db", "--artifacts-destination",
             str(self.folder / "artifacts"), "--workers", "1"], env=NO_JOBS,
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(self.healthy, 90), "mlflow server did not start"

    def healthy(self):
        try:
            return urllib.request.urlopen(self.uri + "/health", timeout=1).status == 200
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_tracking_server_going_away_mid_sweep_loses_nothing(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        args = [sys.executable, SWEEP_PY] + FAST + [
            "--set", "num_samples=3", "--set", "max_concurrent=1", "--set", f"tracking_uri={server.uri}"]
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        assert wait_for(lambda: finished_trials(tmp_path / "server.db") >= 1, 180)
        server.stop()  # the server goes away while trials keep training
        pending = tmp_path / "mlflow_pending-gopc2_stability.pkl"  # the driver queues what it cannot write
        assert wait_for(pending.exists, 180), "the driver never noticed the outage"
        server.start()
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
        assert "queueing writes" in out and "answers again" in out
        analysis, client, runs, parents = assert_each_trial_once(tmp_path, server.uri, 3)
        seen = {df["trial_id"].iloc[0]: len(df) for df in analysis.trial_dataframes.values()}
        for r in runs:  # every iteration Tune saw is in MLflow
            logged = client.get_metric_history(r.info.run_id, "diverged")
            assert len(logged) == seen[r.data.tags["trial_id"]], r.info.run_name
        assert not pending.exists()  # beside optuna.db, drained
    finally:
        server.stop()


def test_a_nan_pixel_is_a_data_error_not_divergence(tmp_path, monkeypatch):
    import gopc.train as T
    real = T.to_float

    def corrupt(batch):
        x = real(batch)
        x[0, 0, 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(T, "to_float", corrupt)
    cfg = C.load(None, ["data.frame_size=32", "data.seq_len=4", "data.n_train=32", "data.n_val=8",
                        "data.n_test=8", "model.r_dim=8", "model.lstm_dim=8", "model.ngf=4", "train.batch_size=4",
                        "train.eval_size=8"])
    with pytest.raises(DataError, match="non-finite pixels"):
        T.train(cfg, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "divergence.json").exists()
    assert torch.isfinite(torch.zeros(1)).all()  # sanity: torch itself is fine


def test_optuna_never_sees_nan(tmp_path):
    """A NaN validation objective without divergence (possible with a broken metric) is reported to Tune as
    the penalty and to Optuna as the blank frame's error (no finite validation before it), so no Optuna
    trial is left RUNNING and none holds the penalty."""
    from gopc.sweep.trainable import TuneHooks
    reports = []
    hooks = TuneHooks("prior/mse", 1e6, str(tmp_path), margin=0.1)
    hooks.report = lambda metrics, with_checkpoint: reports.append(metrics)
    hooks.evaluated(10, {"prior/mse": float("nan"), "prior/blank_mse": 0.025}, {})
    assert reports[0]["objective"] == 1e6 and reports[0]["study_value"] == 0.025
    study = optuna.create_study()
    trial = study.ask()
    study.tell(trial, reports[0]["study_value"])
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE


def test_a_snapshot_torn_by_the_kill_is_repaired_on_resume(tmp_path, monkeypatch, capsys):
    """Tune writes its trial list and its searcher state separately; a kill between the two leaves the
    searcher counting a trial Tune never recorded. Simulated by dropping the last trial from the trial
    list: the resumed sweep runs it again, and no Optuna trial is left RUNNING."""
    args = FAST + ["--set", "num_samples=2", "--set", "base.train.steps=20", "--set", "scheduler.type=fifo"]
    assert sweep_in(tmp_path, args, monkeypatch) == 0
    experiment = tmp_path / "sweep_results" / "gopc2_stability"
    state_file = sorted(experiment.glob("experiment_state-*.json"))[-1]
    state = json.loads(state_file.read_text())
    dropped = json.loads(state["trial_data"].pop()[0])["trial_id"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert sweep_in(tmp_path, args + ["--resume"], monkeypatch) == 0
    assert f"trial(s) {dropped} will be suggested again" in capsys.readouterr().err
    analysis, *_ = assert_each_trial_once(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", 2)
    assert dropped not in {t.trial_id for t in analysis.trials}
    study = optuna.load_study(study_name="gopc2_stability", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in study.trials]
    assert len(study.trials) == 3  # the dropped one, then its rerun
    assert study.user_attrs["orphans"] == [t.number for t in study.trials if t.user_attrs["tune_trial_id"] == dropped]
    assert sweep_in(tmp_path, args + ["--resume"], monkeypatch) == 0
    assert "will be suggested again" not in capsys.readouterr().err  # repaired once, for good
    assert len(tune_trials(tmp_path).trials) == 2


def test_a_kill_before_the_first_snapshot_was_complete_starts_the_sweep_over(tmp_path, monkeypatch, capsys):
    """Killed while Tune copied its first snapshot, which had no finished trial yet and no searcher
    state: the resumed sweep starts over under the same parent, and the killed trials leave no run."""
    from ray.tune.experiment.trial import Trial

    from gopc.sweep.recovery import load_trials
    args = FAST + ["--set", "num_samples=2", "--set", "base.train.steps=20", "--set", "scheduler.type=fifo"]
    assert sweep_in(tmp_path, args, monkeypatch) == 0
    experiment = tmp_path / "sweep_results" / "gopc2_stability"
    state_file = next(experiment.glob("experiment_state-*.json"))
    trials = load_trials(state_file.read_bytes())
    for t in trials:
        t.status = Trial.PENDING  # as in the first snapshot, written when the trials were created
    state_file.write_text(json.dumps({"trial_data": [list(t.get_json_state()) for t in trials], "runner_data": {}}))
    for f in [*experiment.glob("search_gen_state-*"), *experiment.glob("searcher-state-*")]:
        f.unlink()
    storage = f"sqlite:///{tmp_path}/optuna.db"  # the study as it was then: both trials asked, none told
    optuna.delete_study(study_name="gopc2_stability", storage=storage)
    then = optuna.create_study(study_name="gopc2_stability", storage=storage)
    for t in trials:
        then.ask().set_user_attr("tune_trial_id", t.trial_id)
    capsys.readouterr()
    assert sweep_in(tmp_path, args + ["--resume"], monkeypatch) == 0
    assert "starting it over" in capsys.readouterr().err
    analysis, *_ = assert_each_trial_once(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", 2)
    assert not {t.trial_id for t in trials} & {t.trial_id for t in analysis.trials}
    study = optuna.load_study(study_name="gopc2_stability", storage=storage)  # started over, too
    assert sorted(t.user_attrs["tune_trial_id"] for t in study.trials) == sorted(t.trial_id for t in analysis.trials)
