"""A sweep: an Optuna search (TPE with the divergence constraints) over GOPC-2 stabilizers, run as Tune
trials by the one driver (gopc/sweep/run.py), summarised into the best config, Optuna's views and the
trials' MLflow view grouped by a searched stabilizer. The study (gopc/sweep/study.py) is the other kind."""
from __future__ import annotations

from gopc import config as C
from gopc.errors import GopcError
from gopc.sweep import run as R
from gopc.sweep import settings as S


def make_searcher(s: S.Settings, start_points: list):
    """The searcher on the sweep's study (created, or loaded as it is); `start_points` are queued in it."""
    import optuna

    from gopc.sweep.notes import Notes, artifact_dir
    from gopc.sweep.searcher import DivergenceAwareOptunaSearch, open_storage
    from gopc.sweep.space import SearchSpace
    base = C.from_dict(s.base)
    tpe = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    notes = Notes(s.metric, s.mode, base.train.learned_margin, s.mlflow_uri, artifact_dir(s.study_storage))
    return DivergenceAwareOptunaSearch(space=SearchSpace(s.space), metric="objective", mode=s.mode, sampler=tpe,
                                       total_steps=base.train.steps, margin=base.train.learned_margin,
                                       objective_name=s.metric, notes=notes,
                                       points_to_evaluate=start_points or None,
                                       storage=open_storage(s.study_storage), study_name=s.name)


def check(s: S.Settings, resume: bool) -> None:
    """The study storage answers; a new sweep must not add its trials to an older study of the same name."""
    from gopc.sweep.searcher import check_study_storage, open_storage
    check_study_storage(s.study_storage, s.name, resume)
    if not resume and s.name in {st.study_name for st in open_storage(s.study_storage).get_all_studies()}:
        raise GopcError(f"an Optuna study named {s.name!r} already exists in {s.study_storage}; pass --resume "
                        f"to continue it, or --set name=NEW to start another")


def realign(s: S.Settings, experiment_path: str):
    from gopc.sweep.recovery import align_snapshot
    return align_snapshot(experiment_path, make_searcher(s, []))


def tune_setup(s: S.Settings):
    """A search: TPE proposes trials, ASHA stops slow-but-finite ones. A finished trial's process takes the next
    (reuse_actors, off by default in Ray 2.60): a new one would re-import torch and the project, seconds of CPU each."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    iterations = -(-C.from_dict(s.base).train.steps // s.report_every)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=iterations, grace_period=s.scheduler.grace_period,
                               reduction_factor=s.scheduler.reduction_factor)
                 if s.scheduler.type == "asha" else FIFOScheduler())
    config = tune.TuneConfig(metric="objective", mode=s.mode, search_alg=make_searcher(s, s.start_points),
                             scheduler=scheduler, num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent,
                             reuse_actors=True)
    # conditional parameters are absent from some trials, which the progress table cannot show
    return config, None, {p.name: p.name.split(".")[1] for p in s.space if not p.when}


def parent_params(s: S.Settings) -> dict:
    """The base config, each searched key shown by its range (its base value was never used as such)."""
    searched = {p.name: f"searched: {p.choices if p.choices is not None else f'{p.low:g}..{p.high:g}'}" for p in s.space}
    return {"sweep." + k: v for k, v in {**C.from_dict(s.base).flat(), **searched, "metric": s.metric, "mode": s.mode,
                                         "num_samples": s.num_samples, "seed": s.seed}.items()}


def view(s: S.Settings) -> tuple[list[str], str | None]:
    """The searched params, grouped by the first searched choice that every trial has."""
    return [p.name for p in s.space], next((p.name for p in s.space if p.choices is not None and not p.when), None)


def finish(s, results, parent):
    from gopc.sweep.summary import summarise_sweep
    return [f"best config: {summarise_sweep(s, results, parent)}"]


SWEEP = R.Kind("gopc2_stability", "Ray Tune + Optuna sweep over GOPC-2 stabilizers, tracked in MLflow",
               S.load, tune_setup, finish, parent_params, lambda s: s.num_samples, view, check=check,
               lock_keys=lambda s: [f"{s.study_storage}#{s.name}"], realign=realign)


def main(argv=None, default_config: str = "sweeps/gopc2_stability.yaml") -> int:
    return R.main(argv, default_config, SWEEP)
