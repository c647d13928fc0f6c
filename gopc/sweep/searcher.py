"""OptunaSearch that learns from diverged trials.

Left alone, Ray + Optuna lose exactly the trials this service exists to study: a NaN objective leaves
the Optuna trial RUNNING forever, and a trial that raises becomes FAIL, which TPE ignores, so the
sampler keeps proposing the unstable region. Here a diverged trial reports a finite penalty (it never
raises), and this searcher tells Optuna COMPLETE(penalty) plus a positive constraint. Optuna 5's TPE
ranks every infeasible trial below every feasible one whatever the values, and infeasible ones among
themselves by the constraint, which we make larger the earlier the trial diverged. A trial that ASHA
stopped early is told PRUNED rather than COMPLETE with an under-trained value: TPE ranks pruned
trials by how far they got, which is what an early stop means.

The study lives in persistent storage (settings.study_storage), where every ask and tell is committed
at once, so it can be read while the sweep runs (optuna.load_study, optuna-dashboard) and after it
without Ray. Each Optuna trial carries its Tune trial id, and on a restore the storage, not the pickle
Tune saved, says which Optuna trial belongs to which Tune trial.
"""
from __future__ import annotations

import os

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from gopc.errors import GopcError
from gopc.sweep.settings import study_file

TUNE_ID = "tune_trial_id"  # user attr of each Optuna trial
ORPHANS = "orphans"  # study user attr: numbers of the trials whose Tune trial a kill lost (see recovery.py)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A path (ending in .log) is Optuna's JournalStorage, anything else a SQLAlchemy URL."""
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


def open_study(name: str, url: str) -> optuna.Study:
    """A sweep's study, read from its storage (never created: a missing file is not made empty)."""
    try:
        if (path := study_file(url)) and not os.path.exists(path):
            raise KeyError(path)
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise GopcError(f"no Optuna study named {name!r} in {url}; check the sweep name or optuna_storage") from None


def divergence_constraint(diverged_step: int, total_steps: int) -> float:
    """> 0 means infeasible; 1 for a trial that diverged on its last step, up to 2 on its first."""
    return 1.0 + max(0.0, 1.0 - diverged_step / max(total_steps, 1))


def feasible(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts for "best": complete, every constraint met."""
    return t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())


class DivergenceAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, total_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.total_steps = total_steps

    def suggest(self, trial_id: str):
        asked = trial_id in self._ot_trials
        config = super().suggest(trial_id)
        if not asked:
            self._ot_trials[trial_id].set_user_attr(TUNE_ID, trial_id)
        return config

    def restore(self, checkpoint_path: str):
        """Tune's --resume: the pickle brings back the sampler (its random state) and the storage; the
        trials are read from the storage, which may be ahead of the pickle."""
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
        status = trial_status(result, error, self.total_steps)
        ot_trial.set_user_attr("status", status)
        ot_trial.set_user_attr("diverged", float(status == "diverged"))
        if status == "diverged":
            ot_trial.set_user_attr("diverged_step", int(result["step"]))
            ot_trial.set_constraint("diverged", divergence_constraint(int(result["step"]), self.total_steps))
        else:
            ot_trial.set_constraint("diverged", 0.0)
        if status == "stopped early":
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)


def trial_status(result: dict | None, error: bool, total_steps: int) -> str:
    """completed / diverged / stopped early / errored: the status tag of a finished trial."""
    if error:
        return "errored"
    if not result:  # stopped before it ever reported
        return "stopped early"
    if result.get("diverged"):
        return "diverged"
    if result.get("step", 0) < total_steps:
        return "stopped early"
    return "completed"
