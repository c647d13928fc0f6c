"""A sweep whose Tune storage is an S3 URI, as on the cluster (GOPC_STORAGE=s3://...), end to end
against a real S3 API on loopback: moto's server, which boto3 and pyarrow (Tune's storage layer) reach
exactly as they reach AWS, through AWS_ENDPOINT_URL and credentials in the environment. The driver is
killed mid-sweep and resumed; the summary, the best config, `gopc best` and the Optuna study must all
come out as they do on local storage."""
import os
import signal
import subprocess
import sys

import boto3
import mlflow
import optuna
import pytest
from moto.server import ThreadedMotoServer

from conftest import free_port, metric_rows, wait_for
from gopc.cli import main as gopc_main
from gopc.sweep.recovery import load_trials

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(ROOT, "sweeps", "gopc2_stability.py")
SWEEP_YAML = os.path.join(ROOT, "sweeps", "gopc2_stability.yaml")
BUCKET = "gopc-sweeps"
ARGS = [sys.executable, SWEEP_PY, "--config", SWEEP_YAML, "--preset", "smoke", "--set", "num_samples=2",
        "--set", "base.train.steps=40", "--set", "scheduler.type=fifo", "--set", "start_points=[{stab.out_act: sigmoid}]",
        "--set", f"storage=s3://{BUCKET}/results"]
TERMINAL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the sweep's subprocesses and Ray's workers inherit it
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def keys(client, prefix="") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def until(predicate, proc, what, timeout: float = 300):
    """Polls until `predicate` holds, with a deadline; fails at once if the sweep ended first."""
    wait_for(lambda: predicate() or proc.poll() is not None, timeout, every=0.2)
    assert predicate(), f"the sweep ended before {what}" if proc.poll() is not None else f"no {what} in {timeout} s"


def reports(folder) -> int:
    return metric_rows(folder / "mlflow.db", "diverged")


def test_a_sweep_on_s3_killed_and_resumed_finishes_every_trial_once(s3, tmp_path, monkeypatch):
    proc = subprocess.Popen(ARGS, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # mid-sweep: a trial has reported, and its checkpoint is on S3 to resume from
        until(lambda: reports(tmp_path) >= 1 and any("/checkpoint_" in k for k in keys(s3, "results/")),
              proc, "the first checkpoint reached S3")
        live = optuna.load_study(study_name="gopc2_stability", storage=f"sqlite:///{tmp_path}/optuna.db")
        assert live.trials and all(t.user_attrs["tune_trial_id"] for t in live.trials)  # readable during the sweep
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run(ARGS + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # Tune's own record, read from S3: both trials finished, none twice
    newest = max(k for k in keys(s3, "results/gopc2_stability/") if "/experiment_state-" in k)
    trials = load_trials(s3.get_object(Bucket=BUCKET, Key=newest)["Body"].read())
    assert len(trials) == 2 and all(t.status in ("TERMINATED", "ERROR") for t in trials)
    assert not [k for k in keys(s3) if "mlflow_pending" in k]  # the driver's queue stays on its own disk
    assert not (tmp_path / "mlflow_pending-gopc2_stability.pkl").exists()  # drained

    # MLflow: one parent with its summary, one finished run per trial. (A trial resumes from the last
    # checkpoint Tune's snapshot recorded, so iterations after it may be trained and logged again.)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("gopc2_stability")
    (parent,) = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    runs = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t.trial_id for t in trials)
    assert all(r.info.status in ("FINISHED", "FAILED") and r.data.tags["status"] != "running" for r in runs)
    assert parent.data.tags["status"] == "completed"
    assert {"trials.csv", "best_config.yaml", "optimisation_history.png", "param_importances.png"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}

    # the study in the documented default storage: every trial told once, none left RUNNING
    study = optuna.load_study(study_name="gopc2_stability", storage=f"sqlite:///{tmp_path}/optuna.db")
    told = [t for t in study.trials if t.number not in study.user_attrs.get("orphans", [])]  # lost with the kill
    assert all(t.state in TERMINAL for t in study.trials)
    assert sorted(t.user_attrs["tune_trial_id"] for t in told) == sorted(t.trial_id for t in trials)

    # the best config, from the sweep and from `gopc best`
    monkeypatch.chdir(tmp_path)  # the sigmoid start point trains 40 steps without diverging
    assert (tmp_path / "best" / "gopc2_stability.yaml").exists()
    assert gopc_main(["best", "--sweep", "gopc2_stability", "--top", "2", "-o", str(tmp_path / "exported")]) == 0
    best = (tmp_path / "exported" / "best-1.yaml").read_text()
    assert f"prior/mse {min(t.value for t in told if t.state == optuna.trial.TrialState.COMPLETE)}" in best

    # a new sweep of the same name elsewhere must not add its trials to this study
    other = subprocess.run(ARGS + ["--set", f"storage=s3://{BUCKET}/elsewhere"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 2 and "an Optuna study named 'gopc2_stability' already exists" in other.stderr
