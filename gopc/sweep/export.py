"""`gopc best`: a sweep's top-K configs by its Optuna study, as their MLflow runs logged them, as YAML to train on."""
from __future__ import annotations

import collections
import os

import mlflow
import optuna
import yaml

from gopc import config as C
from gopc import outcome as O
from gopc.errors import GopcError
from gopc.evaluate import scored_line
from gopc.sweep.searcher import TUNE_ID, open_study
from gopc.sweep.settings import study_storage
from gopc.sweep.parent_run import find_parent
from gopc.run_tracking import resolve_uri

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class NothingToExport(GopcError):
    """A sweep none of whose trials trained to the end; `tally` says what became of them."""

    def __init__(self, sweep: str, tally: str):
        super().__init__(f"--sweep: sweep {sweep!r} has no trial that trained to the end ({tally}); nothing to "
                         "export: resume it if it is unfinished, or search other stabilizers")
        self.tally = tally


def best_configs(sweep: str, top: int, tracking_uri: str = "", experiment: str = "",
                 optuna_storage: str = "") -> list[tuple]:
    """The sweep's top trials by its Optuna study (its storage as the sweep's settings resolve it) as
    (MLflow run, run config, "metric value"), best first: learned trials, then degraded and collapsed ones only to fill up (their
    header says so), each config as its MLflow run logged it."""
    if top < 1:
        raise GopcError(f"--top: {top} must be at least 1")
    uri = resolve_uri(tracking_uri or os.environ.get("GOPC_TRACKING_URI", ""))
    study = open_study(sweep, study_storage(optuna_storage, uri))
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment or sweep)
    parent = find_parent(client, exp.experiment_id, sweep) if exp else None
    if parent is None:
        raise GopcError(f"--sweep: no sweep named {sweep!r} in MLflow at {uri}; check the name or --tracking-uri")
    ranked = []
    for status in O.TRAINED:  # learned trials first, degraded then collapsed ones only to fill up
        ranked += sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                          and t.user_attrs.get("status") == status), key=lambda t: t.value,
                         reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    runs = []
    for t in ranked:
        # a trial without a run was lost by a kill and run again (its run deleted), or its writes are queued
        runs += [(run, t.value) for run in client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.trial_id = '{t.user_attrs[TUNE_ID]}'")]
        if len(runs) == top:
            break
    if not runs:
        raise NothingToExport(sweep, _tally(study))
    metric = parent.data.params.get("sweep.metric", "objective")
    configs = []
    for run, value in runs:  # check every config before writing any file
        with open(client.download_artifacts(run.info.run_id, "config.yaml")) as f:
            configs.append((run, C.from_dict(yaml.safe_load(f)), f"{metric} {value}"))
    return configs


def _tally(study: optuna.Study) -> str:
    """What became of a study's trials, e.g. '5 trials: 4 diverged, 1 running'."""
    words = collections.Counter(t.user_attrs.get("status") or t.state.name.lower() for t in study.trials)
    return f"{len(study.trials)} trials" + (": " + ", ".join(f"{n} {w}" for w, n in sorted(words.items())) if words else "")


def export_best(sweep: str, top: int, out_dir: str, tracking_uri: str = "", experiment: str = "",
                optuna_storage: str = "") -> list[str]:
    configs = best_configs(sweep, top, tracking_uri, experiment, optuna_storage)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, (run, cfg, score) in enumerate(configs, 1):
        path = os.path.join(out_dir, f"best-{i}.yaml")
        with open(path, "w") as f:
            f.write(f"# sweep {sweep}, trial {run.data.tags['trial_id']} '{run.info.run_name}' (MLflow run "
                    f"{run.info.run_id}), {score}, {run.data.tags['status']}: "
                    f"validation {scored_line(run.data.metrics, 'val/')}\n")
            f.write(C.dump(cfg))
        paths.append(path)
    return paths
