"""OptunaSearch that learns from diverged and collapsed trials.

Left alone, Ray + Optuna lose exactly the trials this service exists to study: a NaN objective leaves the Optuna trial
RUNNING forever, and a trial that raises becomes FAIL, which TPE ignores, so the sampler keeps proposing the unstable
region. Here a diverged trial reports a finite value (gopc/sweep/trainable.py) and is told COMPLETE plus a positive
constraint. A trial that ASHA stopped early is told PRUNED rather than COMPLETE with an under-trained value: TPE ranks
pruned trials by how far they got, which is what an early stop means.

Finite is not trained: a `collapsed` trial (gopc/outcome.py) gets a positive constraint too, smaller than any
divergence's. Why a constraint and not the objective: the objective stays the metric itself, so values, plots and
Optuna's importances mean what they say; and Optuna 5's TPE ranks every feasible (learned) trial above every pruned one,
and those above every infeasible one, infeasible ones by their violation. So TPE models "good" as: learned by objective,
then stopped early, then collapsed by how far below the margin (a gradient towards learning even before any trial has
learned), then diverged, later before earlier. The study lives in persistent storage, every ask and tell committed at
once, so it can be read while the sweep runs (optuna-dashboard) and after it without Ray; on a restore it, not the
pickle Tune saved, says which Optuna trial is which Tune trial. Notes: gopc/sweep/notes.py, before each tell."""
from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import warnings

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from gopc import dbfile, locks
from gopc import outcome as O
from gopc.console import library_level
from gopc.errors import GopcError
from gopc.sweep.notes import Notes
from gopc.sweep.settings import study_file

optuna.logging.set_verbosity(library_level())  # "A new study created": with --verbose only

TUNE_ID = "tune_trial_id"  # user attr of each Optuna trial
ORPHANS = "orphans"  # study user attr: numbers of the trials whose Tune trial a kill lost (see recovery.py)


def open_storage(url: str, read_only: bool = False) -> optuna.storages.BaseStorage:
    """A path (ending in .log) is Optuna's JournalStorage, anything else a SQLAlchemy URL. A held SQLite file is waited
    for up to GOPC_BUSY_WAIT, not pysqlite's 5 s; `read_only` (gopc best) creates no tables."""
    if "://" in url:
        kwargs = {"connect_args": {"timeout": dbfile.busy_wait()}} if url.startswith("sqlite:") else {}
        with locks.creating(study_file(url)):  # a new file's tables are made once (gopc/locks.py)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=read_only)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


def check_study_storage(url: str, name: str, resume: bool, field: str = "optuna_storage") -> None:
    """Before anything is written: the study's file can be written and is not damaged (gopc/dbfile.py), and on
    --resume it holds the study to continue: Optuna would create its tables and a new study in an empty or missing
    file, and the resume would fail only after that."""
    path = study_file(url)
    if path is None:
        return  # a database server: nothing here can check it without writing
    path = os.path.abspath(path)
    if "://" in url:
        tables = dbfile.check(path, field, "an Optuna study database", f"point {field} elsewhere")
        if tables and "studies" not in tables:
            raise GopcError(f"{field}: {path} is an SQLite file but not an Optuna study database; move it away "
                            f"or point {field} elsewhere")
    elif os.path.exists(path) and not os.access(path, os.W_OK):  # a JournalStorage file
        raise GopcError(f"{field}: {path} is read-only; make it writable (chmod u+w {path}), or point {field} elsewhere")
    else:
        tables = {"studies"} if os.path.exists(path) else None
    if not resume:
        return
    if tables is None:
        raise GopcError(f"{field}: there is no {path} to resume sweep {name!r} from; resume with the "
                        f"optuna_storage the sweep started with")
    if "://" in url and not _has_study(path, name):
        raise GopcError(f"{field}: {path} holds no Optuna study {name!r} to resume"
                        f"{' (the file is empty)' if not tables else ''}; resume with the optuna_storage the "
                        f"sweep started with, or restore it from a backup")


def _has_study(path: str, name: str) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=dbfile.busy_wait())) as db:
        try:
            return db.execute("select 1 from studies where study_name = ?", (name,)).fetchone() is not None
        except sqlite3.OperationalError:  # no studies table: an empty file
            return False


def open_study(name: str, url: str) -> optuna.Study:
    """A sweep's study, read from its storage (never created: a missing file is not made empty)."""
    try:
        if path := study_file(url):
            if "://" in url:  # damaged or held: one line (gopc best only reads, so read-only will do)
                tables = dbfile.check(path, "--optuna-storage", "an Optuna study database",
                                      "point --optuna-storage elsewhere", write=False)
                if not tables or "studies" not in tables:
                    raise KeyError(path)
            elif not os.path.exists(path):
                raise KeyError(path)
        return optuna.load_study(study_name=name, storage=open_storage(url, read_only=True))
    except KeyError:
        raise GopcError(f"--sweep: no sweep named {name!r} (no Optuna study named {name!r} in {url}); "
                        "check the sweep name, or pass its storage (--optuna-storage, optuna_storage)") from None


def ran_to_the_end(t: optuna.trial.FrozenTrial) -> bool:
    """Complete and not diverged: its value is what its config trained to, not a validation from before a
    blow-up (a collapsed trial is infeasible for TPE, yet its value is as real as a learned one's)."""
    return t.state == TrialState.COMPLETE and t.constraints.get(O.DIVERGED, 0.0) <= 0


def validation(result: dict, metric: str) -> float | None:
    """The objective of a result that is a real validation: finite, not a divergence's report."""
    value = result.get(f"val/{metric}")
    return None if result.get(O.DIVERGED) or value is None or not math.isfinite(float(value)) else float(value)


class DivergenceAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, total_steps: int, margin: float = 0.1, objective_name: str = "prior/mse",
                 notes: Notes | None = None, **kwargs):
        # before OptunaSearch's __init__, which sets the study up (_setup_study) when given its space
        self.total_steps, self.margin, self.objective_name, self.notes = total_steps, margin, objective_name, notes
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names([self.objective_name])  # the dashboard's axis, not "Objective 0"

    def suggest(self, trial_id: str):
        asked = trial_id in self._ot_trials
        config = super().suggest(trial_id)
        if not asked:
            self._ot_trials[trial_id].set_user_attr(TUNE_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict):
        """Optuna's intermediate values: the validations, at their step (never a penalty)."""
        ot_trial = self._ot_trials.get(trial_id)
        value = validation(result, self.objective_name)
        step = int(result.get("step", 0))
        if ot_trial is not None and value is not None and trial_id not in self._completed_trials \
                and step not in ot_trial._cached_frozen_trial.intermediate_values:  # a retried trial repeats steps
            ot_trial.report(value, step)

    def restore(self, checkpoint_path: str):
        """Tune's --resume: the pickle restores sampler and storage; the trials are read from the (newer) storage."""
        super().restore(checkpoint_path)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                           sampler=self._ot_study.sampler, pruner=self._ot_study.pruner)
        self.reload_trials()

    def reload_trials(self):
        """Which Optuna trial is which Tune trial, and which were told, as the storage records it."""
        self._ot_trials, self._completed_trials = {}, set()
        for t in self._ot_study.get_trials(deepcopy=False):
            if tid := t.user_attrs.get(TUNE_ID):
                self._ot_trials[tid] = optuna.Trial(self._ot_study, t._trial_id)
                if t.state.is_finished():
                    self._completed_trials.add(tid)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        status = O.of_trial(result, error, self.total_steps)
        ot_trial.set_user_attr("status", status)
        ot_trial.set_user_attr(O.DIVERGED, float(status == O.DIVERGED))
        if result and "val/prior/skill_mse" in result:
            ot_trial.set_user_attr("prior_skill_mse", float(result["val/prior/skill_mse"]))
        if result and "val/prior/peak_skill_mse" in result:  # `degraded`: how high it was, and when
            ot_trial.set_user_attr("peak_skill_mse", float(result["val/prior/peak_skill_mse"]))
            ot_trial.set_user_attr("peak_step", int(result["val/prior/peak_step"]))
        if status == O.DIVERGED:
            ot_trial.set_user_attr("diverged_step", int(result["step"]))
            ot_trial.set_constraint(O.DIVERGED, O.divergence_constraint(int(result["step"]), self.total_steps))
        else:
            ot_trial.set_constraint(O.DIVERGED, 0.0)
        if status in O.TRAINED or status == O.STOPPED_EARLY:
            ot_trial.set_constraint(O.COLLAPSED, O.collapse_constraint(result or {}, self.margin))
        if self.notes is not None:
            self.notes.trial(ot_trial, trial_id, status, result)
        if status == O.STOPPED_EARLY:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
        else:
            # Tune passes no trial-ending result (ASHA's max_t) to the searcher: a trial that trained to the end gets
            # its last validation as an intermediate value here. Not a pruned one: TPE ranks those by their last.
            if (value := validation(result or {}, self.objective_name)) is not None \
                    and int(result.get("step", 0)) not in ot_trial._cached_frozen_trial.intermediate_values:
                ot_trial.report(value, int(result.get("step", 0)))
            if result and "study_value" in result:  # the honest value, not Tune's penalty
                result = {**result, self.metric: result["study_value"]}
            super().on_trial_complete(trial_id, result, error)
        if self.notes is not None:
            self.notes.study(self._ot_study, self._ot_study._storage.get_trial(ot_trial._trial_id))
        return None
