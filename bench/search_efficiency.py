"""Searcher efficiency: the service's divergence-aware TPE against plain OptunaSearch and random search,
on a small GOPC-2 problem that diverges often.

    python bench/search_efficiency.py                 # 5 seeds x 3 searchers x 30 trials
    python bench/search_efficiency.py --seeds 0,1 --save a.json   # some seeds (two processes split the work),
    python bench/search_efficiency.py --load a.json b.json        # then the tables of both
    python bench/search_efficiency.py --smoke         # 1 seed x 3 searchers x 3 tiny trials (the tests)

Every searcher gets the same problem: the sweep's own search space (sweeps/gopc2_stability.yaml) over a
GOPC-2 small enough for a CPU (PROBLEM below), the same trial function with the divergence guard, and the
same seed; trials run one at a time, so each proposal has seen every earlier result. No start points
(they would hand every searcher the thesis' configs), FIFO (no early stopping: the searcher alone differs).

- service: `make_searcher` of gopc/sweep/search.py, DivergenceAwareOptunaSearch: a diverged trial is told
  COMPLETE with its last validation (or the blank frame's error) and a `diverged` constraint, a collapsed
  one a smaller `collapsed` constraint. (Until issue 23 the diverged value was a 1e6 penalty; TPE ranks
  infeasible trials by their violation alone, so the searches should not change: docs/performance.md.)
- plain: Ray's OptunaSearch(space, metric, mode, seed) as Ray's examples wire it; a diverged trial reports
  its metric as it is, NaN (the guard still stops it in the same step, so it costs what it costs above).
- random: Ray's OptunaSearch with Optuna's RandomSampler(seed).
- service@K (only when asked, --searchers): the service's searcher with `n_startup_trials` = K instead of
  its default, 5 (TPE samples at random until that many trials are complete; Optuna's own default is 10).

Per run: the trials until the first *learned* one (gopc/outcome.py classify(): the one-step prior beats
both trivial predictions by train.learned_margin), until the first *finite* one (trained to the end
without diverging, learned or collapsed), and the fractions of finite and learned trials among the N.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import optuna  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import FIFOScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from gopc import config as C  # noqa: E402
from gopc.sweep import run as R, search as sweep_kind, settings as S  # noqa: E402
from gopc import outcome as O  # noqa: E402
from gopc.sweep.space import SearchSpace  # noqa: E402
from gopc.sweep.trainable import TuneHooks  # noqa: E402

from common import start_ray, sweep_folder, sweep_settings  # noqa: E402

# On the smoke preset's model and data at 64x64 (28-px digits, as before the preset shrank): frames, sequence
# length and steps, chosen so that random
# configurations of the sweep's space diverge often and a few learn (docs/performance.md).
PROBLEM = {"base.data.frame_size": 64, "base.data.digit_size": 28, "base.data.seq_len": 10, "base.train.steps": 100}
SMOKE = {"base.data.frame_size": 32, "base.data.seq_len": 4, "base.train.steps": 4, "base.data.n_train": 16,
         "base.data.n_val": 4, "base.train.batch_size": 4, "base.train.eval_size": 4}
SEARCHERS = "service,plain,random"


class NaNOnDivergence(TuneHooks):
    """A trial that knows nothing of divergence: its objective is the metric as it is, NaN once diverged."""

    def __init__(self, metric, penalty, run_dir, margin):
        super().__init__(metric, float("nan"), run_dir, margin)


def settings(problem: dict, folder: str, seed: int, n: int) -> S.Settings:
    return sweep_settings(folder, f"search_s{seed}", "smoke", [
        f"num_samples={n}", "max_concurrent=1", f"seed={seed}", f"report_every={problem['base.train.steps']}",
        *(f"{k}={v}" for k, v in problem.items())])


def searcher(name: str, s: S.Settings):
    if name.startswith("service"):
        if "@" in name:
            s.n_startup_trials = int(name.split("@")[1])
        return sweep_kind.make_searcher(s, [])
    space = SearchSpace(s.space)
    if name == "plain":
        return OptunaSearch(space, metric="objective", mode=s.mode, seed=s.seed)
    return OptunaSearch(space, metric="objective", mode=s.mode, sampler=optuna.samplers.RandomSampler(seed=s.seed))


def search(name: str, problem: dict, seed: int, n: int) -> dict:
    with sweep_folder("gopc_search_") as folder:
        s = settings(problem, folder, seed, n)
        alg = searcher(name, s)
        hooks = NaNOnDivergence if name == "plain" else None
        tuner = tune.Tuner(R.make_trainable(s, sweep_kind.SWEEP, hooks), tune_config=tune.TuneConfig(
            search_alg=alg, scheduler=FIFOScheduler(), num_samples=n, max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(name=s.name, storage_path=s.storage_path, verbose=0))
        with contextlib.redirect_stdout(sys.stderr):
            results = tuner.fit()
        steps = C.from_dict(s.base).train.steps
        # in the order Tune created them: the counter after the (random) trial id in each trial's folder name
        ordered = sorted(results, key=lambda r: int(re.search(r"_[0-9a-f]{8}_(\d+)_", os.path.basename(r.path))[1]))
        statuses = [O.of_trial(r.metrics, r.error is not None, steps) for r in ordered]
        states = [t.state.name for t in alg._ot_study.get_trials(deepcopy=False)]  # the searcher's own study
    first = lambda ok: next((i + 1 for i, st in enumerate(statuses) if st in ok), None)  # noqa: E731
    return {"statuses": statuses, "first_learned": first({O.LEARNED}), "first_finite": first(set(O.TRAINED)),
            "finite": sum(st in O.TRAINED for st in statuses) / n,
            "learned": statuses.count("learned") / n, "optuna": {k: states.count(k) for k in sorted(set(states))}}


def fmt(x) -> str:
    return "-" if x is None else str(x)


def report(runs: list[dict], problem: dict, n: int) -> None:
    """The tables, from the runs of one or more processes (--save, --load)."""
    names = list(dict.fromkeys(r["searcher"] for r in runs))
    dates = sorted({r.get("date", "?") for r in runs})  # trials are counted, not timed: the load does not matter
    print(f"date: {dates[0]}{f' to {dates[-1]}' if len(dates) > 1 else ''}")
    print(f"problem: {' '.join(f'{k.split(chr(46), 1)[1]}={v}' for k, v in problem.items())}; N = {n} trials a search")
    print(f"{'seed':<5} {'searcher':<10} {'1st learned':>11} {'1st finite':>10} {'finite/N':>8} {'learned/N':>9}  "
          f"trials (l learned, c collapsed, d diverged)   Optuna states")
    for r in sorted(runs, key=lambda r: (r["seed"], names.index(r["searcher"]))):
        print(f"{r['seed']:<5} {r['searcher']:<10} {fmt(r['first_learned']):>11} {fmt(r['first_finite']):>10} "
              f"{r['finite']:>8.2f} {r['learned']:>9.2f}  {''.join(st[0] for st in r['statuses']):<{max(n, 42)}}  {r['optuna']}")
    # a search that never learned counts as N + 1 trials: those means are then lower bounds
    print(f"\n{'searcher':<10} {'1st learned':>11} {'learned in':>10} {'1st finite':>10} {'finite/N':>8} {'learned/N':>9}")
    mean, finite = {}, {}
    for name in names:
        rs = [r for r in runs if r["searcher"] == name]
        mean[name] = statistics.mean(r["first_learned"] or n + 1 for r in rs)
        finite[name] = statistics.mean(r["first_finite"] or n + 1 for r in rs)
        print(f"{name:<10} {mean[name]:>11.1f} {sum(r['first_learned'] is not None for r in rs):>5}/{len(rs):<4} "
              f"{finite[name]:>10.1f} "
              f"{statistics.mean(r['finite'] for r in rs):>8.2f} {statistics.mean(r['learned'] for r in rs):>9.2f}")
    if "service" in names and "random" in names:
        ratio = mean["service"] / mean["random"]
        print(f"trials to the first learned config, service / random: {ratio:.2f} "
              f"({'meets' if ratio <= 0.5 else 'misses'} the target of 0.5)")
        print(f"trials to the first finite config, service / random: {finite['service'] / finite['random']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--trials", type=int, default=30, help="N, trials per search (default: %(default)s)")
    p.add_argument("--searchers", default=SEARCHERS, help="of service, plain, random, service@K (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the problem, e.g. base.train.steps=60")
    p.add_argument("--save", metavar="JSON", help="also write the runs here")
    p.add_argument("--load", nargs="+", metavar="JSON", help="run nothing: the tables of runs saved by --save")
    p.add_argument("--smoke", action="store_true", help="1 seed, 3 trials of a tiny problem")
    a = p.parse_args(argv)
    if a.load:
        saved = [json.load(open(path)) for path in a.load]
        report([r for d in saved for r in d["runs"]], saved[0]["problem"], saved[0]["trials"])
        return 0
    problem, seeds = dict(PROBLEM), [int(x) for x in a.seeds.split(",")]
    if a.smoke:
        problem, seeds, a.trials = {**problem, **SMOKE}, seeds[:1], 3
    problem.update(item.split("=", 1) for item in a.set)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import ray
    start_ray(2)
    runs = []
    try:
        for seed in seeds:
            for name in a.searchers.split(","):
                runs.append({"searcher": name, "seed": seed, "date": str(datetime.date.today()),
                             **search(name, problem, seed, a.trials)})
                print(f"seed {seed} {name}: {' '.join(st[0] for st in runs[-1]['statuses'])}", file=sys.stderr, flush=True)
                if a.save:  # after every search: a long run killed half-way keeps what it did
                    with open(a.save, "w") as f:
                        json.dump({"problem": problem, "trials": a.trials, "runs": runs}, f)
    finally:
        ray.shutdown()
    report(runs, problem, a.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
