"""One Tune trial: the foundation's training loop, reporting through `tune.report`.

Each Tune iteration is `report_every` training steps followed by a validation pass, so ASHA compares trials on the
objective itself. A diverged trial reports once more, in the step its guard fired, with a finite penalty as the
objective and `diverged=1`, then returns: it never raises (FailureConfig would retry it; gopc/sweep/searcher.py). The
penalty is for Tune alone (ASHA must rank a diverged trial last); every report also carries `study_value`, what the
Optuna study is told instead: the last finite validation of the objective (over the sweep's `objective_window`), or the
blank frame's score before there was one. A study's trial (one arm, one seed), having selected nothing on the test
split, is then evaluated on it once, for the verdict."""
from __future__ import annotations

import os
import shutil

import torch
from ray import tune

from gopc import outcome as O
from gopc.disk import no_space
from gopc.evaluate import TEST_DIR, blank_scores, evaluate_saved, validations
from gopc.sweep import full_disk
from gopc.sweep.space import trial_config
from gopc.train import Hooks, train


class TuneHooks(Hooks):
    # ASHA-stopped trials never reach the final evaluation: grids at every validation, so every run shows predictions
    grids_at_every_eval = True

    def __init__(self, metric: str, penalty: float, run_dir: str, margin: float, window: int = 1):
        self.metric, self.penalty, self.run_dir, self.margin, self.window = metric, penalty, run_dir, margin, window
        self.last_train: dict = {}
        self.last_report: dict = {}
        self.checkpoint: str | None = None
        self.cfg = None
        self.last_value: float | None = None  # the last finite validation of the objective

    def started(self, cfg, run_dir, n_params):
        self.cfg = cfg

    def blank_value(self, metrics: dict | None = None) -> float:
        """The blank frame's score on the objective, from a validation's metrics or, before any, computed."""
        section, name = self.metric.split("/")
        if metrics is None:
            from gopc.data import build_datasets
            metrics = blank_scores(build_datasets(self.cfg.data)["val"][: self.cfg.train.eval_size], self.cfg)
        return float(metrics.get(f"{section}/blank_{name}", float("nan")))

    def set_schedule(self, t, report_every: int) -> None:
        """Sets the trial's train config `t` to validate and checkpoint at every Tune iteration; a
        restarted trial resumes from the last one. bench/overhead.py's subclasses change this, one cost at a time."""
        t.eval_every, t.ckpt_every, t.log_every = report_every, report_every, report_every

    def metrics(self, step, metrics, checkpoint):
        self.last_train = {f"train/{k}": v for k, v in metrics.items()}
        self.checkpoint = checkpoint or self.checkpoint

    def evaluated(self, step, metrics, images):
        objective = metrics.get(self.metric, float("nan"))
        finite = objective == objective and abs(objective) != float("inf")
        if finite and self.window > 1:  # the mean of the last `window` validations (train.py kept them)
            recent = [v.get(self.metric, float("nan")) for v in validations(self.run_dir, step)[-self.window:]]
            objective = sum(recent) / len(recent) if recent else objective
            finite = objective == objective and abs(objective) != float("inf")
        if finite:
            self.last_value = float(objective)
        word = O.classify(metrics, self.margin)
        report = {**self.last_train, **{f"val/{k}": v for k, v in metrics.items()}, "step": step,
                  "objective": objective if finite else self.penalty, O.DIVERGED: 0.0,
                  "study_value": self.last_value if self.last_value is not None else self.blank_value(metrics),
                  O.LEARNED: float(word == O.LEARNED), O.DEGRADED: float(word == O.DEGRADED)}
        self.report(report, with_checkpoint=self.checkpoint is not None)

    def diverged(self, record, run_dir):
        # last_train holds the last finite step's loss and norms (train.py reports them just before)
        value = self.last_value if self.last_value is not None else self.blank_value()
        self.report({**self.last_train, "step": record.step, "objective": self.penalty, O.DIVERGED: 1.0,
                     "study_value": value, "validated_before": float(self.last_value is not None),
                     "diverged_step": record.step, "diverged_quantity": record.quantity,
                     "diverged_frame": -1 if record.frame is None else record.frame,
                     "max_grad_norm_before": record.max_grad_norm_before}, with_checkpoint=True)

    def train(self, cfg, run_dir: str, resume_from: str | None):
        """gopc/train.py's loop through these hooks; bench/scale.py's subclass waits instead, to measure the service."""
        # field: what the user set to place the trial's folder (Tune puts it under the sweep's storage)
        return train(cfg, run_dir, self, resume_from=resume_from, progress=False, field="storage")

    def report(self, metrics, with_checkpoint):
        """Tells Tune; with the run folder as the checkpoint when it holds a new one (or must: the end)."""
        self.checkpoint, self.last_report = None, metrics
        checkpoint = tune.Checkpoint.from_directory(self.run_dir) if with_checkpoint else None
        return tune.report(metrics, checkpoint=checkpoint)


def run_trial(config: dict, bases: dict, metric: str, penalty: float, report_every: int, test: bool = False,
              hooks_class: type[TuneHooks] = TuneHooks, window: int = 1) -> None:
    cfg = trial_config(bases, config)
    t = cfg.train
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    run_dir = os.path.join(tune.get_context().get_trial_dir(), "run")
    try:
        _run(cfg, run_dir, hooks_class(metric, penalty, run_dir, t.learned_margin, window), report_every, test)
    except Exception as e:  # its checkpoint, or Tune's copy of it into the storage, found the disk full
        if not no_space(e):
            raise
        full_disk.stand_still(tune.get_context().get_trial_id())  # until the driver stops the sweep


def _run(cfg, run_dir: str, hooks: TuneHooks, report_every: int, test: bool) -> None:
    resume_from = None
    if (restored := tune.get_checkpoint()) is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
        restored.to_directory(run_dir)
        if os.path.exists(ckpt := os.path.join(run_dir, "checkpoint.pt")):
            resume_from = ckpt
    hooks.set_schedule(cfg.train, report_every)
    result = hooks.train(cfg, run_dir, resume_from)
    if test and result.status == "completed":
        metrics = evaluate_saved(run_dir, "test", os.path.join(run_dir, TEST_DIR))
        hooks.report({**hooks.last_report, **{f"test/{k}": v for k, v in metrics.items()}}, with_checkpoint=True)
