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
import time

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from gopc import config as C
from gopc.sweep.searcher import trial_status
from gopc.sweep.space import apply

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
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, space_yaml, "search_space.yaml")
    return run.info.run_id


class SweepTracker(tune.Callback):
    def __init__(self, uri: str, parent_run_id: str, sweep: str, base: dict, total_steps: int):
        self.uri, self.parent, self.sweep, self.base, self.total_steps = uri, parent_run_id, sweep, base, total_steps
        self._client = None
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id
        self._checkpoints: dict[str, str] = {}

    def __getstate__(self):  # Tune pickles callbacks with the experiment; clients do not pickle
        return {**self.__dict__, "_client": None, "_runs": {}, "_checkpoints": {}}

    @property
    def client(self) -> mlflow.MlflowClient:
        if self._client is None:
            self._client = mlflow.MlflowClient(self.uri)
        return self._client

    def run_id(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        exp_id = self.client.get_run(self.parent).info.experiment_id
        found = self.client.search_runs(
            [exp_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent}' and tags.trial_id = '{trial.trial_id}'")
        if found:
            run_id = found[0].info.run_id
        else:
            cfg = apply(self.base, trial.config)
            tags = {MLFLOW_PARENT_RUN_ID: self.parent, "trial_id": trial.trial_id, "sweep": self.sweep,
                    "role": "trial", "status": "running", "sampled": ", ".join(sorted(trial.config))}
            run_id = self.client.create_run(exp_id, run_name=str(trial), tags=tags).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.flat().items()])
            self.client.log_text(run_id, C.dump(cfg), "config.yaml")
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, now = int(result.get("step", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k.startswith(("train/", "val/")) or k in ("objective", "diverged")
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._checkpoints[trial.trial_id] = checkpoint

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial, trial_status(trial.last_result, False, self.total_steps))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finish(trial, "errored")

    def finish(self, trial, status: str):
        run_id, result = self.run_id(trial), trial.last_result or {}
        tags = [RunTag("status", status)]
        if status == "diverged":
            record = {k: result.get(k) for k in DIVERGENCE_KEYS}
            record["step"] = record.pop("diverged_step")
            self.client.log_dict(run_id, record, "divergence.json")
            tags += [RunTag("diverged_step", str(record["step"])), RunTag("diverged_quantity", str(record["diverged_quantity"]))]
        if status == "errored":
            reason = error_text(trial)
            tags.append(RunTag("error", reason.strip().splitlines()[-1][:500] if reason.strip() else "unknown"))
            self.client.log_text(run_id, reason, "error.txt")
        checkpoint = self._checkpoints.get(trial.trial_id) or trial.checkpoint
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                if os.path.isdir(eval_dir := os.path.join(folder, "eval")):
                    self.client.log_artifacts(run_id, eval_dir, "eval")
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if status == "errored" else "FINISHED")


def error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()
    err = trial.get_error() if hasattr(trial, "get_error") else None
    return str(err or "")


def finish_parent(uri: str, parent: str, files: dict[str, str], metrics: dict[str, float]) -> None:
    client = mlflow.MlflowClient(uri)
    for path in files.values():
        client.log_artifact(parent, path)
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in finite.items()])
    client.log_batch(parent, tags=[RunTag("status", "completed"), RunTag("summary", json.dumps(metrics)[:4000])])
    client.set_terminated(parent, "FINISHED")
