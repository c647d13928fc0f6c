"""The MLflow parent run of a sweep or a study, on the driver: created (with the MLflow UI's saved view
of its trials) on a fresh start, found again by its tags on --resume, and finished with the summary,
its result in a sentence and a link to its best trial. The trials' own runs are gopc/sweep/trial_tracking.py's."""
from __future__ import annotations

import json
import math
import re
import sys
import time

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from gopc import config as C
from gopc import outcome as O


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The experiment, created as a model-training one (the UI would open a new one on its GenAI pages)."""
    if exp := client.get_experiment_by_name(name):
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development"})
    except mlflow.MlflowException as e:  # another sweep created it since we looked: use theirs
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


VIEW_TAG = "mlflow.sharedViewState."  # + view id: the MLflow UI's saved views live in experiment tags


def view_id(sweep: str) -> str:
    return re.sub(r"[^\w.-]", "-", f"gopc-{sweep}")


def save_view(client, exp_id: str, sweep: str, columns: list[str], group_by: str | None) -> str:
    """A saved view of the sweep's trials in the MLflow UI ("Views"): its outcome columns, sorted by
    the objective, grouped by `group_by` (a param) with group averages, so the `diverged` and `learned`
    columns read as rates per value. Returns the view's id (?viewStateShareKey= in the runs page URL)."""
    view = view_id(sweep)
    state = {"searchFilter": f"tags.sweep = '{sweep}' and tags.role = 'trial'", "orderByKey": "metrics.`val/prior/mse`",
             "orderByAsc": True, "startTime": "ALL", "lifecycleFilter": "Active", "selectedColumns": columns,
             "groupBy": group_by and {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": group_by}]},
             "runsHiddenMode": "FIRST_10_RUNS", "hideEmptyCharts": True, "useGroupedValuesInCharts": True}
    now = int(time.time() * 1000)
    title = f"{sweep}: outcomes" + (f" by {group_by}" if group_by else "")
    client.set_experiment_tag(exp_id, VIEW_TAG + view, json.dumps(
        {"name": title, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))
    return view


def view_link(uri: str, run_id: str, sweep: str) -> str:
    """Where the sweep's saved view opens, after the MLflow UI's address ("" while MLflow is away)."""
    try:
        exp_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001: the summary has already said what it could not log
        return ""
    return f"#/experiments/{exp_id}/runs?viewStateShareKey={view_id(sweep)}"


def find_parent(client, exp_id: str, sweep: str):
    runs = client.search_runs([exp_id], f"tags.sweep = '{sweep}' and tags.role = 'parent'", max_results=1)
    return runs[0] if runs else None


def start_parent(uri: str, experiment: str, sweep: str, resume: bool, params: dict, space_yaml: str,
                 view: tuple[list[str], str | None] | None = None) -> str:
    """The parent run: created, or found again on --resume; `view` (columns, group by) saves its MLflow UI view."""
    client = mlflow.MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    existing = find_parent(client, exp_id, sweep)
    if existing and resume:
        client.set_terminated(existing.info.run_id, "RUNNING")
        return existing.info.run_id
    run = client.create_run(exp_id, run_name=sweep, tags={"sweep": sweep, "role": "parent", "status": "running"})
    client.log_batch(run.info.run_id, params=[Param(k, C.redact(str(v))[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, C.redact(space_yaml), "search_space.yaml")
    if view:
        save_view(client, exp_id, sweep, *view)
    return run.info.run_id


def kill_parent(uri: str, parent: str, status: str = O.INTERRUPTED) -> None:
    """A stopped experiment's parent: KILLED, tagged `interrupted` (a signal) or `disk full`; --resume sets RUNNING."""
    try:
        client = mlflow.MlflowClient(uri)
        client.set_tag(parent, "status", status)
        client.set_terminated(parent, "KILLED")
    except Exception as e:  # noqa: BLE001: the stop goes on; --resume marks the parent again
        print(f"MLflow at {uri} unreachable ({type(e).__name__}); the parent run is still marked RUNNING",
              file=sys.stderr)


def finish_parent(uri: str, parent: str, files: dict[str, str], metrics: dict[str, float], description: str,
                  best_trial: str = "", table: list[dict] | None = None, wait_s: float = 120) -> bool:
    """Log the summary on the parent run, retrying while the server is away. False if it never came back.
    `description` is the result in a sentence, shown on the run's page; `best_trial` (a Tune trial id)
    is tagged with its run's id, so the parent links to it; `table` rows are logged as an MLflow table."""
    deadline = time.time() + wait_s
    while True:
        try:
            _finish_parent(uri, parent, files, metrics, description, best_trial, table)
            return True
        except Exception as e:  # noqa: BLE001
            if time.time() > deadline:
                print(f"MLflow at {uri} unreachable ({type(e).__name__}); the summary was not logged", file=sys.stderr)
                return False
            time.sleep(5)


def _finish_parent(uri, parent, files, metrics, description, best_trial, table) -> None:
    client = mlflow.MlflowClient(uri)
    for path in files.values():
        client.log_artifact(parent, path)
    if table:
        columns = sorted({k for row in table for k in row})
        client.log_table(parent, {c: [str(row.get(c, "")) for row in table] for c in columns}, "trials_table.json")
    held = client.get_run(parent).data.metrics  # a summary logged before (a resumed, finished sweep): once
    finite = {k: float(v) for k, v in metrics.items()
              if isinstance(v, (int, float)) and math.isfinite(v) and k not in held}
    client.log_batch(parent, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in finite.items()])
    tags = {"status": "completed", "summary": json.dumps(metrics)[:4000], MLFLOW_RUN_NOTE: description}
    if best_trial:
        exp_id = client.get_run(parent).info.experiment_id
        found = client.search_runs([exp_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and tags.trial_id = '{best_trial}'")
        tags.update(best_trial=best_trial, **({"best_run_id": found[0].info.run_id} if found else {}))
    client.log_batch(parent, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(parent, "FINISHED")
