"""MLflow from the driver: one nested child run per trial, under the parent run of gopc/sweep/parent_run.py.

Everything is logged by this Tune callback on the driver (the head node), never from the trials, so the tracking server
can listen on the head's loopback only, and SQLite sees a single writer. Runs are found again by tags (sweep name, trial
id) rather than held in memory, so a resumed sweep carries on with the same runs instead of duplicating them."""
from __future__ import annotations

import os
import pickle
import sys
import time

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from PIL import Image
from ray import tune

from gopc import config as C
from gopc import outcome as O
from gopc.sweep.notes import GRIDS, MLFLOW_RUNS  # eval/*.png drawn at every validation, logged as MLflow images
from gopc.sweep.space import trial_config
from gopc.run_tracking import every_run, logged_steps

DIVERGENCE_KEYS = ("diverged_step", "diverged_quantity", "diverged_frame", "max_grad_norm_before")
# What a user charts: never Tune's `objective` (a diverged trial's penalty would flatten every sort and average)
LOGGED = (O.DIVERGED, O.LEARNED, O.DEGRADED, "diverged_step", "max_grad_norm_before")


def run_name(config: dict) -> str:
    """A trial's run name from its sampled values, e.g. 'out_act=layernorm h_grad=clip_norm lr=0.00035'."""
    def short(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k.rsplit('.', 1)[-1]}={short(v)}" for k, v in sorted(config.items()))[:240] or "trial"


class SweepTracker(tune.Callback):
    """Every write is an operation (start / metrics / finish, keyed by trial id) in an ordered queue. When the tracking
    server is away the queue waits, trials keep training, and the writes are replayed in order once it answers again.
    What is still queued is kept beside the experiment (`mlflow_pending.pkl`), so a driver restart replays it too."""

    RETRY_S = 10  # how long to leave an unreachable server alone between tries

    def __init__(self, uri: str, parent_run_id: str, sweep: str, bases: dict, total_steps: int, pending_path: str):
        self.uri, self.parent, self.sweep, self.bases = uri, parent_run_id, sweep, bases
        self.total_steps, self.pending_path = total_steps, pending_path
        self._reset()

    def _reset(self):
        self._client = None
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id
        self._existing: dict | None = None  # existing_runs(), read at the first write
        self._exp_id = ""
        self._checkpoints: dict[str, object] = {}
        self._logged: dict[str, dict[str, int]] = {}  # trial id -> metric -> last step in MLflow
        self._imaged: dict[str, int] = {}  # trial id -> step of the grids last queued
        self._open: set[str] = set()  # trials started and not finished: at the experiment's end, interrupted
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
        self._open.add(trial.trial_id)
        self.submit("start", trial, {})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step, now = int(result.get("step", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k.startswith(("train/", "val/", "test/")) or k in LOGGED
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.submit("metrics", trial, {"metrics": metrics})

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """Each validation's prediction grids as MLflow images at its step, so the Image grid and the
        compare view set trials side by side over training (a diverged trial's grids are stale: skipped)."""
        self._checkpoints[trial.trial_id] = checkpoint
        result = trial.last_result or {}
        step = int(result.get("step", 0))
        if result.get(O.DIVERGED) or self._imaged.get(trial.trial_id) == step:
            return
        self._imaged[trial.trial_id] = step
        with checkpoint.as_directory() as folder:
            images = {name: np.asarray(Image.open(path).convert("RGB")) for name in GRIDS
                      if os.path.exists(path := os.path.join(folder, "eval", f"{name}.png"))}
        if images:
            self.submit("images", trial, {"step": step, "images": images})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, O.of_trial(trial.last_result, False, self.total_steps))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, O.ERRORED)

    def on_experiment_end(self, trials, **info):
        for trial in trials:  # still open when the experiment ends: a signal stopped it (--resume goes on)
            if trial.trial_id in self._open:
                self._finish(trial, O.INTERRUPTED)
        self.drain(wait_s=120)

    def _finish(self, trial, status: str):
        self._open.discard(trial.trial_id)
        self.submit("finish", trial, {
            "status": status, "result": dict(trial.last_result or {}),
            "checkpoint": self._checkpoints.get(trial.trial_id) or trial.checkpoint,
            "error": error_text(trial) if status == O.ERRORED else ""})

    # the queue -----------------------------------------------------------------------------------
    def submit(self, op: str, trial, payload: dict):
        self._pending.append((op, trial.trial_id, {**payload, "config": dict(trial.config)}))
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
                self._existing = None  # a write whose answer was lost may have created a run: search again
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
    def existing_runs(self) -> dict:
        """Trial id -> MLflow run of this sweep's trial runs already in MLflow (a resumed sweep's): one search per
        driver, not one per trial (a search by tag reads every run's tags: O(N) a trial)."""
        if self._existing is None:
            self._exp_id = self.client.get_run(self.parent).info.experiment_id
            self._existing = {run.data.tags.get("trial_id"): run for run in every_run(
                self.client, self._exp_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent}'")}
        return self._existing

    def find_or_create_run(self, trial_id: str, config: dict) -> str:
        if trial_id in self._runs:
            return self._runs[trial_id]
        found = self.existing_runs().get(trial_id)
        # the steps the run already holds, which a restarted driver may get again (_do_metrics)
        self._logged[trial_id] = logged_steps(self.client, found.info.run_id) if found else {}
        if found and found.data.tags.get("status") == O.INTERRUPTED:  # resumed: it runs again
            self.client.update_run(found.info.run_id, "RUNNING")
            self.client.set_tag(found.info.run_id, "status", "running")
        run = found or self.client.create_run(self._exp_id, run_name=run_name(config), tags={
            MLFLOW_PARENT_RUN_ID: self.parent, "trial_id": trial_id, "sweep": self.sweep, "role": "trial",
            "status": "running", "sampled": ", ".join(sorted(config))})
        self._existing[trial_id] = run  # a retry after a failure below finds this run, not a second one
        if not run.data.params:
            cfg = trial_config(self.bases, config)
            self.client.log_batch(run.info.run_id, params=[Param(k, C.redact(str(v))) for k, v in cfg.flat().items()])
            self.client.log_text(run.info.run_id, C.redact(C.dump(cfg)), "config.yaml")
        self._runs[trial_id] = run.info.run_id
        del self._existing[trial_id]
        MLFLOW_RUNS[trial_id] = (self._exp_id, run.info.run_id)
        return run.info.run_id

    def _do_start(self, trial_id, config):
        self.find_or_create_run(trial_id, config)

    def _do_metrics(self, trial_id, metrics, config):
        # Never a (key, step) twice: not what a killed driver logged, not a retried trial's repeat of the
        # steps after its checkpoint, not a study's last report repeated beside its test metrics.
        run_id, logged = self.find_or_create_run(trial_id, config), self._logged[trial_id]
        if new := [m for m in metrics if m.step > logged.get(m.key, -1)]:
            self.client.log_batch(run_id, metrics=new)
            logged.update({m.key: max(m.step, logged.get(m.key, -1)) for m in new})

    def _do_images(self, trial_id, step, images, config):
        run_id = self.find_or_create_run(trial_id, config)
        for name, image in images.items():
            self.client.log_image(run_id, image, key=f"predictions/{name}", step=step)

    def _do_finish(self, trial_id, status, result, checkpoint, error, config):
        run_id = self.find_or_create_run(trial_id, config)
        tags = [RunTag("status", status)]
        if status == O.DIVERGED:
            record = {k: result.get(k) for k in DIVERGENCE_KEYS}
            record["step"] = record.pop("diverged_step")
            self.client.log_dict(run_id, record, "divergence.json")
            tags += [RunTag("diverged_step", str(record["step"])),
                     RunTag("diverged_quantity", str(record["diverged_quantity"]))]
        if status == O.ERRORED:
            tags.append(RunTag("error", error.strip().splitlines()[-1][:500] if error.strip() else "unknown"))
            self.client.log_text(run_id, error, "error.txt")
        if checkpoint is not None and status != O.INTERRUPTED:  # its last grids come with its real end
            with checkpoint.as_directory() as folder:
                if os.path.isdir(eval_dir := os.path.join(folder, "eval")):
                    self.client.log_artifacts(run_id, eval_dir, "eval")
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, O.MLFLOW_STATUS[status])


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
    return str(trial.get_error() or "") if hasattr(trial, "get_error") else ""
