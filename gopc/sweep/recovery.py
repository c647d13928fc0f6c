"""Repair a Tune snapshot torn by a killed driver, before `Tuner.restore` reads it.

Tune writes its trial list (experiment_state-*.json) and its searcher state (search_gen_state-*.json,
searcher-state-*.pkl) as separate files and copies them to storage one by one. A driver killed in
between leaves the searcher ahead of the trial list: it counts a trial it already suggested that Tune
never recorded, so that trial would never run (and its Optuna trial would stay RUNNING forever). Here
the searcher is rewound to the trials Tune knows.
"""
from __future__ import annotations

import glob
import json
import os

import cloudpickle
from optuna.trial import TrialState


def _newest(folder: str, pattern: str) -> str | None:
    files = sorted(glob.glob(os.path.join(folder, pattern)))  # names end in a timestamp
    return files[-1] if files else None


def _replace(path: str, obj) -> None:
    with open(path + ".tmp", "wb") as f:
        cloudpickle.dump(obj, f)
    os.replace(path + ".tmp", path)


def align_snapshot(folder: str) -> list[str]:
    """Returns the ids of the trials the searcher knows and Tune does not (usually none)."""
    state, gen_path, searcher_path = (_newest(folder, p) for p in
                                      ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"))
    if not (state and gen_path and searcher_path):
        return []
    with open(state) as f:
        known = {json.loads(t[0])["trial_id"] for t in json.load(f)["trial_data"]}  # entries: [trial, metadata]
    from gopc.sweep.searcher import DivergenceAwareOptunaSearch
    searcher = DivergenceAwareOptunaSearch(total_steps=1)
    searcher.restore(searcher_path)
    orphans = [tid for tid in searcher._ot_trials if tid not in known]
    if not orphans:
        return []
    for tid in orphans:  # suggested, never run to the end as far as Tune knows
        if tid not in searcher._completed_trials:  # FAIL, which TPE ignores, rather than RUNNING forever
            searcher._ot_study.tell(searcher._ot_trials[tid], state=TrialState.FAIL)
        del searcher._ot_trials[tid]  # the study keeps its record; the next resume must not count it again
        searcher._completed_trials.discard(tid)
    searcher.save(searcher_path)
    with open(gen_path, "rb") as f:
        gen = cloudpickle.load(f)
    gen["counter"] = len(known)  # so the generator suggests the missing trials again
    limiter = gen.get("name:ConcurrencyLimiter")
    if isinstance(limiter, dict) and "live_trials" in limiter:
        limiter["live_trials"] = set(limiter["live_trials"]) - set(orphans)
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    _replace(gen_path, gen)
    return orphans


def forget_orphans(uri: str, parent_run_id: str, orphans: list[str]) -> None:
    """An orphan may have opened its MLflow run before the kill; it has no trial behind it any more
    (the generator suggests its trial again), so the run is deleted (MLflow keeps it restorable)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    for tid in orphans:
        for run in client.search_runs([exp_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and tags.trial_id = '{tid}'"):
            client.delete_run(run.info.run_id)
