"""What became of a run or a trial, in one vocabulary: the words, how a run is classified against the trivial
predictions (a blank frame, the last frame), and what each word is to MLflow (run status, colour) and to Optuna
(constraints). Every other module uses these names; none spells the words itself.

A finished run `learned` when its one-step prior's MSE beats the better trivial prediction by at least
`train.learned_margin` (skill 0.1 = 10% lower error), else it `collapsed`. MSE, because a model that has learned only
the mean image (a grey blur) still beats a blank frame on BCE by far, but on MSE by a few percent at most. It `degraded`
when an earlier validation cleared the margin but this one is below it, or below half that peak: it learned, then
unlearned (docs/verdict.md, "Late collapse")."""
from __future__ import annotations

LEARNED, DEGRADED, COLLAPSED = "learned", "degraded", "collapsed"
DIVERGED, STOPPED_EARLY, ERRORED = "diverged", "stopped early", "errored"
INTERRUPTED = "interrupted"  # a signal to the driver
TRAINED = (LEARNED, DEGRADED, COLLAPSED)  # to the end; the order `gopc best` ranks in
ALL = (*TRAINED, STOPPED_EARLY, DIVERGED, ERRORED)  # every finished trial is one of these

# `gopc train`'s Result.status: how the loop ended, before any judgment of what it learned
COMPLETED, KILLED = "completed", "killed"

MLFLOW_STATUS = {LEARNED: "FINISHED", DEGRADED: "FINISHED", COLLAPSED: "FINISHED", DIVERGED: "FAILED",
                 ERRORED: "FAILED", STOPPED_EARLY: "KILLED", INTERRUPTED: "KILLED", KILLED: "KILLED"}
COLOUR = {LEARNED: "tab:green", DEGRADED: "tab:olive", COLLAPSED: "tab:orange", STOPPED_EARLY: "tab:gray",
          DIVERGED: "tab:red"}  # bottom to top in the stacked bars of a sweep's outcomes


def classify(metrics: dict, margin: float) -> str:
    """learned / degraded / collapsed from `prior/skill_mse` and its peak so far (evaluate.add_validation)."""
    final = metrics.get("prior/skill_mse", float("nan"))
    peak = metrics.get("prior/peak_skill_mse", float("nan"))
    if peak >= margin and not (final >= margin and final >= peak / 2):
        return DEGRADED
    return LEARNED if final >= margin else COLLAPSED


def of_trial(result: dict | None, error: bool, total_steps: int) -> str:
    """A finished Tune trial's word, from its last result (the flags gopc/sweep/trainable.py reports)."""
    if error:
        return ERRORED
    if not result:  # stopped before it ever reported
        return STOPPED_EARLY
    if result.get(DIVERGED):
        return DIVERGED
    if result.get("step", 0) < total_steps:
        return STOPPED_EARLY
    return LEARNED if result.get(LEARNED) else DEGRADED if result.get(DEGRADED) else COLLAPSED


def divergence_constraint(diverged_step: int, total_steps: int) -> float:
    """Optuna's constraint `diverged` (> 0: infeasible): 1 if it diverged on its last step, up to 2 on its first."""
    return 1.0 + max(0.0, 1.0 - diverged_step / max(total_steps, 1))


def collapse_constraint(result: dict, margin: float) -> float:
    """Optuna's constraint `collapsed`: 0 for a trial whose last validation learned; else in (0, 1), growing with how
    far its prior skill fell short of the margin, so every collapsed trial ranks above every diverged one."""
    if result.get(LEARNED):
        return 0.0
    gap = margin - float(result.get("val/prior/skill_mse", float("nan")))
    return gap / (1 + gap) if gap == gap else 0.999  # NaN skill: as bad as collapsing gets
