"""Repair a Tune snapshot torn by a killed driver, before `Tuner.restore` reads it.

Tune writes its trial list (experiment_state-*.json) and its searcher state (search_gen_state-*.json,
searcher-state-*.pkl) to a staging folder, then copies them to storage one by one. A driver killed
during the copy leaves files from two different moments, in any combination:
- the searcher ahead of the trial list: it counts a trial Tune never recorded, which would never run
  (and its Optuna trial would stay RUNNING forever);
- the trial list ahead of the searcher: Tune resumes a trial the searcher has never heard of, or one
  that finished without the searcher being told, whose Optuna trial would stay RUNNING forever.
The trial list is what Tune restores, so it is taken as the truth and the searcher is brought in line.
A kill before Tune's first snapshot was complete leaves nothing to resume from (and no trial has
finished by then): the snapshot is discarded and the sweep starts over under the same parent run.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import shutil

import cloudpickle
import optuna
from optuna.trial import TrialState, create_trial
from ray.tune.experiment.trial import Trial

from gopc.errors import GopcError
from gopc.sweep.searcher import DivergenceAwareOptunaSearch, saved_searcher
from gopc.sweep.tracking import load_pending, save_pending

SNAPSHOT = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
FINISHED = (Trial.TERMINATED, Trial.ERROR)  # Tune reports neither to the searcher again after a restore


def _newest(folder: str, pattern: str) -> str | None:
    files = sorted(glob.glob(os.path.join(folder, pattern)))  # names end in a timestamp
    return files[-1] if files else None


def _replace(path: str, obj) -> None:
    with open(path + ".tmp", "wb") as f:
        cloudpickle.dump(obj, f)
    os.replace(path + ".tmp", path)


def load_trials(state_path: str) -> list[Trial]:
    """Tune's trial list, in the order the trials were created."""
    with open(state_path) as f:
        entries = json.load(f)["trial_data"]  # [trial, runtime metadata] pairs
    trials = []
    for trial_json, metadata_json in entries:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(metadata_json)
        trials.append(trial)
    return trials


@dataclasses.dataclass
class Repair:
    orphans: list[str] = dataclasses.field(default_factory=list)  # searcher knew, Tune did not: suggested again
    adopted: list[str] = dataclasses.field(default_factory=list)  # Tune knew, the searcher did not
    told: list[str] = dataclasses.field(default_factory=list)  # finished, the searcher had not been told
    changed: bool = False
    restart: bool = False  # the first snapshot was incomplete: it is gone, the sweep starts over

    def __str__(self):
        if self.restart:
            return "the sweep was killed before Tune had recorded it completely; starting it over"
        parts = [f"trial(s) {', '.join(ids)} {what}" for ids, what in
                 ((self.orphans, "will be suggested again"), (self.adopted, "given back to the searcher"),
                  (self.told, "reported to the searcher")) if ids]
        return "repaired a snapshot torn by the kill: " + ("; ".join(parts) or "the trial count now matches Tune's")


def align_snapshot(folder: str) -> Repair:
    """Repairs the snapshot in `folder` in place."""
    paths = state, gen_path, searcher_path = [_newest(folder, p) for p in SNAPSHOT]
    if not all(paths):
        return _discard(folder, paths)
    searcher = saved_searcher(searcher_path)
    with open(gen_path, "rb") as f:
        gen = cloudpickle.load(f)
    repair = align(searcher, gen, load_trials(state))
    if repair.changed:
        searcher.save(searcher_path)
        _replace(gen_path, gen)
    return repair


def _discard(folder: str, paths: list[str | None]) -> Repair:
    """`paths`: the newest file of each SNAPSHOT pattern, None where there is none."""
    state, _, searcher_path = paths
    done = [t.trial_id for t in (load_trials(state) if state else []) if t.status in FINISHED]
    done += sorted(saved_searcher(searcher_path)._completed_trials) if searcher_path else []
    if done:  # not the first snapshot, so not a kill: files were removed by hand
        missing = " and ".join(p for p, path in zip(SNAPSHOT, paths) if not path)
        raise GopcError(f"--resume: the snapshot in {folder} lacks {missing} yet records finished trials "
                        f"({', '.join(done)}); put the file back, or continue under another name with --set name=NEW")
    for entry in os.listdir(folder):
        if entry.startswith("run_trial_") or any(fnmatch.fnmatch(entry, p) for p in SNAPSHOT + ("tuner.pkl",)):
            path = os.path.join(folder, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return Repair(changed=True, restart=True)


def align(searcher: DivergenceAwareOptunaSearch, gen: dict, trials: list[Trial]) -> Repair:
    """Brings the searcher and the trial generator's state in line with Tune's trial list."""
    known = {t.trial_id: t for t in trials}
    before = (set(searcher._ot_trials), set(searcher._completed_trials), gen.get("counter"), gen.get("finished"))

    orphans = [tid for tid in searcher._ot_trials if tid not in known]
    for tid in orphans:
        if tid not in searcher._completed_trials:  # FAIL, which TPE ignores, rather than RUNNING forever
            searcher._ot_study.tell(searcher._ot_trials[tid], state=TrialState.FAIL)
        del searcher._ot_trials[tid]  # the study keeps its record; the next resume must not count it again
        searcher._completed_trials.discard(tid)

    adopted, told = [], []
    for trial in trials:
        if trial.trial_id not in searcher._ot_trials:
            searcher._ot_trials[trial.trial_id] = _adopt(searcher, trial.config)
            adopted.append(trial.trial_id)
        if trial.status in FINISHED and trial.trial_id not in searcher._completed_trials:
            error = trial.status == Trial.ERROR
            searcher.on_trial_complete(trial.trial_id, None if error else trial.last_result, error=error)
            told.append(trial.trial_id)

    gen["counter"] = len(trials)  # so the generator suggests exactly the trials Tune has not got
    if len(trials) < gen["total_samples"]:
        gen["finished"] = False
    limiter = gen.get("name:ConcurrencyLimiter")
    if isinstance(limiter, dict) and "live_trials" in limiter:
        limiter["live_trials"] = {t.trial_id for t in trials if t.status not in FINISHED}
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    after = (set(searcher._ot_trials), set(searcher._completed_trials), gen["counter"], gen["finished"])
    return Repair(orphans, adopted, told, changed=before != after)


def _adopt(searcher: DivergenceAwareOptunaSearch, config: dict) -> optuna.Trial:
    """An Optuna trial for a Tune trial the searcher never saw, with the parameters it ran with."""
    study = searcher._ot_study
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if waiting and waiting[0].system_attrs.get("fixed_params") == config:
        ot_trial = study.ask()  # it ran a start point the stale searcher still queues: take it off the queue
    else:
        template = create_trial(state=TrialState.RUNNING, system_attrs={"fixed_params": config})
        ot_trial = optuna.Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))
    searcher._suggest_from_define_by_run_func(searcher._space, ot_trial)  # records the distributions
    return ot_trial


def forget_orphans(uri: str, parent_run_id: str, repair: Repair, pending_path: str) -> None:
    """An orphan may have opened its MLflow run before the kill; it has no trial behind it any more
    (the generator suggests its trial again), so the run is deleted (MLflow keeps it restorable), and
    its MLflow writes still waiting for the server are dropped. On a restart every trial is an orphan."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    def gone(trial_id) -> bool:
        return repair.restart or trial_id in repair.orphans
    for run in client.search_runs([exp_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
        if gone(run.data.tags.get("trial_id")):
            client.delete_run(run.info.run_id)
    save_pending(pending_path, [op for op in load_pending(pending_path) if not gone(op[1])])  # op: (kind, trial_id, payload)
