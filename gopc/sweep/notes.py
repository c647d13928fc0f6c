"""The study as optuna-dashboard shows it: each trial's outcome as a note (Markdown, `optuna_dashboard.save_note`) with
a link to its MLflow run, its last validation's prediction grids as Optuna artifacts, and the study's note (what the
objective is, how many trials ended how, the best learned trial), kept current while the sweep runs.

The searcher calls `Notes.trial` just before it tells Optuna the trial's end: a finished Optuna trial takes no more
attributes, and Tune calls its callbacks only after the searcher. The grids come from the trial's last checkpoint, which
`LastGrids` (a Tune callback on the same driver) notes as Tune hands it over."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState
from ray import tune

from gopc import outcome as O
from gopc.sweep.settings import study_file

# Tune trial id -> the checkpoint of its last validation (not a divergence's: its grids are stale). A
# module-level map because the searcher and the callbacks are pickled and restored apart by Tune.
_LAST_GRIDS: dict[str, object] = {}
# Tune trial id -> (experiment id, run id) of its MLflow run, as the tracker (gopc/sweep/trial_tracking.py) created
# or found it: the note's link without a search of MLflow a trial.
MLFLOW_RUNS: dict[str, tuple[str, str]] = {}
GRIDS = ("inference", "rollout")  # eval/<name>.png in a trial's checkpoint (gopc/evaluate.py), for Optuna and MLflow


class LastGrids(tune.Callback):
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not (trial.last_result or {}).get(O.DIVERGED):
            _LAST_GRIDS[trial.trial_id] = checkpoint


def artifact_dir(study_storage: str) -> str:
    """Optuna's artifacts beside the study's file (optuna-artifacts/), else in the working directory (a
    database server: on a cluster that is the head, where optuna-dashboard runs)."""
    path = study_file(study_storage)
    return os.path.join(os.path.dirname(os.path.abspath(path)) if path else os.getcwd(), "optuna-artifacts")


def ui_address(tracking_uri: str) -> str:
    """Where a user opens the MLflow UI of a tracking URI: the server itself, or for a SQLite file the
    address `mlflow ui` serves it at (what the sweep prints at its end); "" when there is none."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return "http://127.0.0.1:5000" if tracking_uri.startswith("sqlite:///") else ""


def _f(v, spec=".4f") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return format(v, spec) if math.isfinite(v) else "-"


def trial_note(number: int, trial_id: str, status: str, result: dict, metric: str, margin: float,
               run_link: str, grids: list[str]) -> str:
    """A trial's note, in optuna-dashboard's Markdown."""
    r = result or {}
    lines = [f"## Trial {number}: {status}", ""]
    if status == O.DIVERGED:
        step = int(r.get("diverged_step", 0))
        when = ("after validating; its value is its last validation" if r.get("validated_before")
                else "before its first validation, so its value is the blank frame's score")
        lines += [f"**Diverged** at step {step}: non-finite `{r.get('diverged_quantity', '?')}` "
                  f"(max gradient norm before: {_f(r.get('max_grad_norm_before'), '.3g')}). It diverged {when}; "
                  f"the constraint `{O.DIVERGED}` > 0 marks it infeasible.", ""]
    elif status == O.LEARNED:
        lines += [f"**Learned**: the one-step prior's MSE is {_f(r.get('val/prior/skill_mse'), '.0%')} below the better "
                  f"trivial prediction (margin {margin:.0%}).", ""]
    elif status == O.DEGRADED:
        lines += [f"**Degraded**: its one-step prior's MSE skill peaked at {_f(r.get('val/prior/peak_skill_mse'), '+.0%')} "
                  f"(step {int(r.get('val/prior/peak_step', 0))}), then fell to {_f(r.get('val/prior/skill_mse'), '+.0%')} "
                  f"at its end (margin {margin:.0%}, or half the peak): it learned, then unlearned.", ""]
    elif status == O.COLLAPSED:
        lines += [f"**Collapsed**: the one-step prior's MSE is {_f(r.get('val/prior/skill_mse'), '+.0%')} against the "
                  f"better trivial prediction (margin {margin:.0%}): it learned nothing useful; the constraint "
                  f"`{O.COLLAPSED}` > 0 marks it infeasible.", ""]
    elif status == O.STOPPED_EARLY:
        lines += [f"**Stopped early** by ASHA at step {int(r.get('step', 0))}: told PRUNED, with the validations Tune "
                  "passed on before that one as its intermediate values.", ""]
    if "val/prior/mse" in r:
        lines += ["| last validation | value | blank frame | last frame | skill |", "|---|---|---|---|---|",
                  f"| prior MSE (step {int(r.get('step', 0))}) | {_f(r.get('val/prior/mse'))} | {_f(r.get('val/prior/blank_mse'))} "
                  f"| {_f(r.get('val/prior/last_mse'))} | {_f(r.get('val/prior/skill_mse'), '+.2f')} |",
                  f"| prior SSIM | {_f(r.get('val/prior/ssim'), '.3f')} | {_f(r.get('val/prior/blank_ssim'), '.3f')} "
                  f"| {_f(r.get('val/prior/last_ssim'), '.3f')} | {_f(r.get('val/prior/skill_ssim'), '+.2f')} |", ""]
    lines.append(f"MLflow run: [{run_link}]({run_link})" if run_link else
                 f"MLflow run: not found (tag `trial_id` = `{trial_id}`; MLflow may have been away)")
    if grids:
        lines += ["", f"Prediction grids of its last validation, in the artifacts below: {', '.join(grids)}."]
    return "\n".join(lines)


@dataclass
class Tally:
    """The study note's numbers: outcomes counted, and the best learned trial as (number, value)."""
    counts: dict[str, int]
    best: tuple[int, float] | None = None

    def add(self, t: optuna.trial.FrozenTrial, mode: str) -> None:
        status = t.user_attrs.get("status")
        if status in self.counts:
            self.counts[status] += 1
        if t.state == TrialState.COMPLETE and status == O.LEARNED and t.value is not None and (
                self.best is None or (t.value < self.best[1] if mode == "min" else t.value > self.best[1])):
            self.best = (t.number, t.value)


def study_note(study_name: str, tally: Tally, metric: str, mode: str, margin: float) -> str:
    n, best = sum(tally.counts.values()), tally.best
    return "\n".join([
        f"## {study_name}", "",
        f"**Objective**: `{metric}` on the validation split ({mode}imise): the one-step prior's error when the "
        f"metric is `prior/mse`. A trial has **learned** when its prior's MSE beats both a blank frame and the last "
        f"frame by {margin:.0%}; else it **collapsed**, or **degraded** when an earlier validation had learned "
        "(its end fell below the margin, or below half its peak).", "",
        "Every value is a real validation: a diverged trial's value is its last validation (or the blank frame's "
        f"score when it diverged before any), and it is infeasible (`{O.DIVERGED}` > 0), as a collapsed one is "
        f"(`{O.COLLAPSED}` > 0). Trials stopped early by ASHA are PRUNED.", "",
        f"**{n} trials finished**: " + ", ".join(f"{v} {k}" for k, v in tally.counts.items() if v), "",
        f"**Best learned trial**: {best[0]} ({metric} {best[1]:.4f})" if best else
        "**Best learned trial**: none yet (no trial has learned); optuna-dashboard's Best Trial card then shows "
        "the lowest value, whatever its outcome.",
    ])


@dataclass
class Notes:
    """What the searcher needs to write notes and artifacts; plain strings, so it pickles with the searcher."""
    metric: str
    mode: str
    margin: float
    tracking_uri: str = ""
    artifacts: str = ""  # a folder for optuna.artifacts.FileSystemArtifactStore; "" = none
    _tally: Tally | None = field(default=None, init=False, repr=False, compare=False)
    _next_write: float = field(default=0.0, init=False, repr=False, compare=False)
    STUDY_EVERY_S = 10.0

    def trial(self, ot_trial: optuna.Trial, trial_id: str, status: str, result: dict | None) -> None:
        """Outcome, grids and note of a trial that is about to be told (still RUNNING). A failure here
        costs the note, never the tell: a trial left RUNNING would be lost to TPE and to --resume."""
        try:
            self._trial(ot_trial, trial_id, status, result or {})
        except Exception as e:  # noqa: BLE001
            print(f"optuna-dashboard note of trial {ot_trial.number} not written ({type(e).__name__}: {e})",
                  file=sys.stderr)

    def _trial(self, ot_trial: optuna.Trial, trial_id: str, status: str, result: dict) -> None:
        if "diverged_quantity" in result:
            ot_trial.set_user_attr("diverged_quantity", str(result["diverged_quantity"]))
        grids = self.upload_grids(ot_trial, trial_id)
        run = MLFLOW_RUNS.get(trial_id) if self.tracking_uri else None
        link = f"{ui_address(self.tracking_uri)}/#/experiments/{run[0]}/runs/{run[1]}" if run and ui_address(self.tracking_uri) else ""
        if run:
            ot_trial.set_user_attr("mlflow_run_id", run[1])
        save_trial_note(ot_trial, trial_note(ot_trial.number, trial_id, status, result, self.metric, self.margin, link, grids))

    def upload_grids(self, ot_trial: optuna.Trial, trial_id: str) -> list[str]:
        checkpoint = _LAST_GRIDS.pop(trial_id, None)
        if checkpoint is None or not self.artifacts:
            return []
        os.makedirs(self.artifacts, exist_ok=True)
        store = optuna.artifacts.FileSystemArtifactStore(self.artifacts)
        done = []
        with checkpoint.as_directory() as folder:
            for name in GRIDS:
                if os.path.isfile(path := os.path.join(folder, "eval", f"{name}.png")):
                    optuna.artifacts.upload_artifact(artifact_store=store, file_path=path, study_or_trial=ot_trial,
                                                     mimetype="image/png")
                    done.append(f"{name}.png")
        return done

    def study(self, study: optuna.Study, told: optuna.trial.FrozenTrial | None = None) -> None:
        """The study's note, after `told` was told; with no `told`, counted from the whole study and written
        at once (the summary calls it so at the sweep's end). While trials finish it is rewritten at most
        every STUDY_EVERY_S: optuna-dashboard's save_note reads every note of the study, so a rewrite at
        every tell cost O(N) a trial. The tally is counted from the whole study once per driver (a resumed
        sweep's storage may be ahead of the pickle), then kept up trial by trial."""
        try:
            if told is None or self._tally is None:
                self._tally = Tally(dict.fromkeys(O.ALL, 0))
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.FAIL)):
                    self._tally.add(t, self.mode)
            else:
                self._tally.add(told, self.mode)
            if told is not None and time.monotonic() < self._next_write:
                return
            self._next_write = time.monotonic() + self.STUDY_EVERY_S
            save_note(study, study_note(study.study_name, self._tally, self.metric, self.mode, self.margin))
        except Exception as e:  # noqa: BLE001: as for a trial's note
            print(f"optuna-dashboard note of the study not written ({type(e).__name__}: {e})", file=sys.stderr)

    def __getstate__(self):  # the tally and the clock are the driver's, not the snapshot's
        return {**self.__dict__, "_tally": None, "_next_write": 0.0}


def save_note(study_or_trial, body: str) -> None:
    from optuna_dashboard import save_note as save  # the dashboard's own format, which it renders
    save(study_or_trial, body)


NOTE = "gopc:note"  # a trial's own record of its note: [version, chunks]


def save_trial_note(ot_trial: optuna.Trial, body: str) -> None:
    """A trial's note, in the study's system attributes as optuna-dashboard keeps it (a version and the body in
    chunks). Its save_note reads every note of the study to learn the version and the old chunks to blank: O(N)
    a trial. The trial keeps both itself instead (a resumed driver may note a trial again)."""
    from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body
    storage, study_id, trial_id = ot_trial.storage, ot_trial.study._study_id, ot_trial._trial_id
    version, old_chunks = storage.get_trial_system_attrs(trial_id).get(NOTE, (0, 0))
    chunks = split_body(body, trial_id)
    storage.set_study_system_attr(study_id, note_ver_key(trial_id), version + 1)
    for key, text in chunks.items():
        storage.set_study_system_attr(study_id, key, text)
    for i in range(len(chunks), old_chunks):
        storage.set_study_system_attr(study_id, f"{note_str_key_prefix(trial_id)}{i}", "")
    storage.set_trial_system_attr(trial_id, NOTE, [version + 1, len(chunks)])
