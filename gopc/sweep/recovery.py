"""Repair a Tune snapshot torn by a killed driver, before `Tuner.restore` reads it.

Tune copies its snapshot into the storage file by file (gopc/sweep/snapshot.py), while the Optuna study commits every
ask and tell at once. After a kill the study is ahead of the snapshot:
- an Optuna trial asked (even told) for a Tune trial the snapshot never recorded: it would stay RUNNING for ever, and
  the generator may count it, so a trial would never run;
- a Tune trial that finished without the study being told, which Tune will not report again.
The trial list is what Tune restores, so it is taken as the truth: such an Optuna trial is set FAIL if still RUNNING
and listed in the study's "orphans" attr, its trial is suggested anew (a start point is queued again); finished trials
are told, and the generator counts exactly the trials Tune has. The searcher itself reads its trials back from the
study (searcher.restore). A kill before Tune's first snapshot was complete leaves nothing to resume from (and no trial
has finished by then): the snapshot and the study are discarded and the sweep starts over under the same parent run.
The experiment may be a local folder or a URI (s3://...): files go through pyarrow.fs, as Tune's own do."""
from __future__ import annotations

import dataclasses
import fnmatch
import json

import cloudpickle
import optuna
from optuna.trial import TrialState
from pyarrow import fs as pafs
from ray.tune.experiment.trial import Trial

from gopc.errors import GopcError
from gopc.run_tracking import every_run
from gopc.sweep.searcher import ORPHANS, TUNE_ID, DivergenceAwareOptunaSearch
from gopc.sweep.snapshot import GOOD, SNAPSHOT
from gopc.sweep.trial_tracking import load_pending, save_pending

FINISHED = (Trial.TERMINATED, Trial.ERROR)  # Tune reports neither to the searcher again after a restore


def load_trials(state: bytes) -> list[Trial]:
    """Tune's trial list (an experiment_state file's content), in the order the trials were created."""
    trials = []
    for trial_json, metadata_json in json.loads(state)["trial_data"]:  # [trial, runtime metadata] pairs
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(metadata_json)
        trials.append(trial)
    return trials


@dataclasses.dataclass
class Repair:
    orphans: list[str] = dataclasses.field(default_factory=list)  # in the study, not in Tune's list: set FAIL
    told: list[str] = dataclasses.field(default_factory=list)  # finished, the study had not been told
    changed: bool = False
    restart: bool = False  # the first snapshot was incomplete: it is gone, the sweep starts over

    def __str__(self):
        if self.restart:
            return "the sweep was killed before Tune had recorded it completely; starting it over"
        parts = [f"trial(s) {', '.join(ids)} {what}" for ids, what in
                 ((self.orphans, "will be suggested again"), (self.told, "reported to the searcher")) if ids]
        return "repaired a snapshot torn by the kill: " + ("; ".join(parts) or "the trial count now matches Tune's")


def align_snapshot(experiment: str, searcher: DivergenceAwareOptunaSearch) -> Repair:
    """Repairs the snapshot at `experiment` (a folder or URI) in place; `searcher` is on the sweep's study."""
    filesystem, folder = pafs.FileSystem.from_uri(experiment)
    names = [f.base_name for f in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))]
    state, gen_file, searcher_file = [max(fnmatch.filter(names, p), default=None) for p in SNAPSHOT]  # names end in a time
    trials = load_trials(filesystem.open_input_stream(f"{folder}/{state}").readall()) if state else []
    if not (state and gen_file and searcher_file):
        return _discard(filesystem, folder, names, trials, searcher)
    gen = cloudpickle.loads(filesystem.open_input_stream(f"{folder}/{gen_file}").readall())
    repair = align(searcher, gen, trials)
    if repair.changed:
        with filesystem.open_output_stream(f"{folder}/{gen_file}") as f:
            f.write(cloudpickle.dumps(gen))
    return repair


def _discard(filesystem, folder: str, names: list[str], trials: list[Trial], searcher) -> Repair:
    study = searcher._ot_study
    done = [t.trial_id for t in trials if t.status in FINISHED]
    done += [t.user_attrs.get(TUNE_ID, f"#{t.number}") for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if done:  # not the first snapshot, so not a kill: files were removed by hand
        missing = " and ".join(p for p in SNAPSHOT if not fnmatch.filter(names, p))
        raise GopcError(f"--resume: the snapshot in {folder} lacks {missing} yet records finished trials "
                        f"({', '.join(sorted(set(done)))}); put the file back, or continue under another name with --set name=NEW")
    for name in names:
        if name.startswith("run_trial_") or name == GOOD:  # GOOD: copies of the snapshot discarded here
            filesystem.delete_dir(f"{folder}/{name}")
        elif any(fnmatch.fnmatch(name, p) for p in SNAPSHOT + ("tuner.pkl",)):
            filesystem.delete_file(f"{folder}/{name}")
    optuna.delete_study(study_name=study.study_name, storage=searcher._storage)  # the new start queues its start points again
    return Repair(changed=True, restart=True)


def align(searcher: DivergenceAwareOptunaSearch, gen: dict, trials: list[Trial]) -> Repair:
    """Brings the study and the trial generator's state in line with Tune's trial list."""
    study, known = searcher._ot_study, {t.trial_id for t in trials}
    searcher.reload_trials()
    if unknown := known - set(searcher._ot_trials):
        raise GopcError(f"--resume: the Optuna study {study.study_name!r} has no trial(s) {', '.join(sorted(unknown))} "
                        "of this sweep; resume with the optuna_storage the sweep started with")
    orphans, lost = [], set(study.user_attrs.get(ORPHANS, []))
    for ot in study.get_trials(deepcopy=False):
        if ot.user_attrs.get(TUNE_ID) in known or ot.number in lost or ot.state == TrialState.WAITING:
            continue
        if ot.state == TrialState.RUNNING:
            study.tell(ot.number, state=TrialState.FAIL)  # which TPE ignores, rather than RUNNING for ever
        if "fixed_params" in ot.system_attrs:  # a start point: it must still run
            study.enqueue_trial(ot.system_attrs["fixed_params"])
        orphans.append(ot.user_attrs.get(TUNE_ID, f"#{ot.number}"))  # no tune id: killed between ask and attr
        lost.add(ot.number)
    if orphans:  # a finished trial cannot be changed, so the study lists them (and gopc best skips them)
        study.set_user_attr(ORPHANS, sorted(lost))
    told = []
    for trial in trials:
        if trial.status in FINISHED and trial.trial_id not in searcher._completed_trials:
            error = trial.status == Trial.ERROR
            searcher.on_trial_complete(trial.trial_id, None if error else trial.last_result, error=error)
            told.append(trial.trial_id)

    limiter = gen.get("name:ConcurrencyLimiter") or {}
    before = (gen["counter"], gen["finished"], limiter.get("live_trials"))
    gen["counter"] = len(trials)  # so the generator suggests exactly the trials Tune has not got
    if len(trials) < gen["total_samples"]:
        gen["finished"] = False
    if "live_trials" in limiter:
        limiter["live_trials"] = {t.trial_id for t in trials if t.status not in FINISHED}
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    after = (gen["counter"], gen["finished"], limiter.get("live_trials"))
    return Repair(orphans, told, changed=bool(orphans or told) or before != after)


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
    for run in every_run(client, exp_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
        if gone(run.data.tags.get("trial_id")):
            client.delete_run(run.info.run_id)
    save_pending(pending_path, [op for op in load_pending(pending_path) if not gone(op[1])])  # op: (kind, trial_id, payload)
