"""MLflow from the driver: one parent run per sweep, one nested child run per trial.

Everything is logged by this Tune callback on the driver (the head node), never from the trials, so
the tracking server can listen on the head's loopback only, and SQLite sees a single writer. Runs are
found again by tags (sweep name, trial id) rather than held in memory, so a resumed sweep carries on
with the same runs instead of duplicating them.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from gopc import config as C
from gopc.sweep.searcher import trial_status
from gopc.sweep.space import trial_config

DIVERGENCE_KEYS = ("diverged_step", "diverged_quantity", "diverged_frame", "max_grad_norm_before")


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def find_parent(client, exp_id: str, sweep: str):
    runs = client.search_runs([exp_id], f"tags.sweep = '{sweep}' and tags.role = 'parent'", max_results=1)
    return runs[0] if runs else None


def start_parent(uri: str, experiment: str, sweep: str, resume: bool, params: dict, space_yaml: str) -> str:
    """The sweep's parent run: created on a fresh start, found again on --resume."""
    client = mlflow.MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    existing = find_parent(client, exp_id, sweep)
    if existing and resume:
        client.set_terminated(existing.info.run_id, "RUNNING")
        return existing.info.run_id
    run = client.create_run(exp_id, run_name=sweep, tags={"sweep": sweep, "role": "parent", "status": "running"})
    client.log_batch(run.info.run_id, params=[Param(k, C.redact(str(v))[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, C.redact(space_yaml), "search_space.yaml")
    return run.info.run_id


class SweepTracker(tune.Callback):
    """Every write is an operation (start / metrics / finish, keyed by trial id) in an ordered queue.
    When the tracking server is away the queue waits, trials keep training, and the writes are replayed
    in order once it answers again. What is still queued is kept beside the experiment
    (`mlflow_pending.pkl`), so a driver restart replays it too."""

    RETRY_S = 10  # how long to leave an unreachable server alone between tries

    def __init__(self, uri: str, parent_run_id: str, sweep: str, bases: dict, total_steps: int, pending_path: str):
        self.uri, self.parent, self.sweep, self.bases = uri, parent_run_id, sweep, bases
        self.total_steps, self.pending_path = total_steps, pending_path
        self._reset()

    def _reset(self):
        self._client = None
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id
        self._checkpoints: dict[str, object] = {}
        self._pending: list[tuple[str, str, dict]] = load_pending(self.pending_path)
        self._retry_at, self._outage = 0.0, False

    def __getstate__(self):  # Tune pickles callbacks with the experiment; clients do not pickle
        return {k: v for k, v in self.__dict__.items() if k in
                ("uri", "parent", "sweep", "bases", "total_steps", "pending_path")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self) -> mlflow.MlflowClient:
        if self._client is None:
            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    # Tune's hooks: queue, then try to write --------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.submit("start", trial, {"name": str(trial), "config": dict(trial.config)})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, now = int(result.get("step", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k.startswith(("train/", "val/", "test/")) or k in ("objective", "diverged", "learned")
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.submit("metrics", trial, {"metrics": metrics, "name": str(trial), "config": dict(trial.config)})

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._checkpoints[trial.trial_id] = checkpoint

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, trial_status(trial.last_result, False, self.total_steps))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "errored")

    def on_experiment_end(self, trials, **info):
        self.drain(wait_s=120)

    def _finish(self, trial, status: str):
        self.submit("finish", trial, {
            "status": status, "result": dict(trial.last_result or {}),
            "checkpoint": self._checkpoints.get(trial.trial_id) or trial.checkpoint,
            "error": error_text(trial) if status == "errored" else "",
            "name": str(trial), "config": dict(trial.config)})

    # the queue -----------------------------------------------------------------------------------
    def submit(self, op: str, trial, payload: dict):
        self._pending.append((op, trial.trial_id, payload))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        if not force and time.time() < self._retry_at:
            save_pending(self.pending_path, self._pending)
            return False
        while self._pending:
            op, trial_id, payload = self._pending[0]
            try:
                getattr(self, f"_do_{op}")(trial_id, **payload)
            except Exception as e:  # noqa: BLE001: any failure to write means "try again later"
                if not self._outage:
                    print(f"MLflow at {self.uri} failed ({type(e).__name__}: {str(e)[:120]}); "
                          f"queueing writes and retrying every {self.RETRY_S}s", file=sys.stderr)
                self._outage, self._retry_at = True, time.time() + self.RETRY_S
                save_pending(self.pending_path, self._pending)
                return False
            self._pending.pop(0)
        if self._outage:
            print(f"MLflow at {self.uri} answers again; queued writes are logged", file=sys.stderr)
        self._outage = False
        save_pending(self.pending_path, self._pending)
        return True

    def drain(self, wait_s: float) -> bool:
        deadline = time.time() + wait_s
        while not self.flush(force=True) and time.time() < deadline:
            time.sleep(self.RETRY_S / 2)
        if self._pending:
            print(f"MLflow still unreachable: {len(self._pending)} writes kept in {self.pending_path}; "
                  "run the sweep again with --resume to log them", file=sys.stderr)
        return not self._pending

    # the operations (each idempotent, so a replay after a partial failure is harmless) -------------
    def run_id(self, trial_id: str, name: str, config: dict) -> str:
        if trial_id in self._runs:
            return self._runs[trial_id]
        exp_id = self.client.get_run(self.parent).info.experiment_id
        found = self.client.search_runs(
            [exp_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent}' and tags.trial_id = '{trial_id}'")
        run = found[0] if found else self.client.create_run(exp_id, run_name=name, tags={
            MLFLOW_PARENT_RUN_ID: self.parent, "trial_id": trial_id, "sweep": self.sweep, "role": "trial",
            "status": "running", "sampled": ", ".join(sorted(config))})
        if not run.data.params:
            cfg = trial_config(self.bases, config)
            self.client.log_batch(run.info.run_id, params=[Param(k, C.redact(str(v))) for k, v in cfg.flat().items()])
            self.client.log_text(run.info.run_id, C.redact(C.dump(cfg)), "config.yaml")
        self._runs[trial_id] = run.info.run_id
        return run.info.run_id

    def _do_start(self, trial_id, name, config):
        self.run_id(trial_id, name, config)

    def _do_metrics(self, trial_id, metrics, name, config):
        self.client.log_batch(self.run_id(trial_id, name, config), metrics=metrics)

    def _do_finish(self, trial_id, status, result, checkpoint, error, name, config):
        run_id = self.run_id(trial_id, name, config)
        tags = [RunTag("status", status)]
        if status == "diverged":
            record = {k: result.get(k) for k in DIVERGENCE_KEYS}
            record["step"] = record.pop("diverged_step")
            self.client.log_dict(run_id, record, "divergence.json")
            tags += [RunTag("diverged_step", str(record["step"])),
                     RunTag("diverged_quantity", str(record["diverged_quantity"]))]
        if status == "errored":
            tags.append(RunTag("error", error.strip().splitlines()[-1][:500] if error.strip() else "unknown"))
            self.client.log_text(run_id, error, "error.txt")
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                if os.path.isdir(eval_dir := os.path.join(folder, "eval")):
                    self.client.log_artifacts(run_id, eval_dir, "eval")
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "errored" else "FINISHED")


def load_pending(path: str) -> list:
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    return []


def save_pending(path: str, pending: list) -> None:
    if not pending:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(pending, f)
    os.replace(tmp, path)


def error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    err = trial.get_error() if hasattr(trial, "get_error") else None
    return str(err or "")


def finish_parent(uri: str, parent: str, files: dict[str, str], metrics: dict[str, float], wait_s: float = 120) -> bool:
    """Log the summary on the parent run, retrying while the server is away. False if it never came back."""
    deadline = time.time() + wait_s
    while True:
        try:
            _finish_parent(uri, parent, files, metrics)
            return True
        except Exception as e:  # noqa: BLE001
            if time.time() > deadline:
                print(f"MLflow at {uri} unreachable ({type(e).__name__}); the summary was not logged", file=sys.stderr)
                return False
            time.sleep(5)


def _finish_parent(uri: str, parent: str, files: dict[str, str], metrics: dict[str, float]) -> None:
    client = mlflow.MlflowClient(uri)
    for path in files.values():
        client.log_artifact(parent, path)
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in finite.items()])
    client.log_batch(parent, tags=[RunTag("status", "completed"), RunTag("summary", json.dumps(metrics)[:4000])])
    client.set_terminated(parent, "FINISHED")
