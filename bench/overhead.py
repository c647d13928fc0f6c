"""The service's own overhead: the same trials through the sweep service and through a bare Ray Tune +
OptunaSearch loop, then through the service with each per-iteration cost switched off in turn.

    python bench/overhead.py              # 2 trials x 300 steps of 64x64 frames (GEOMETRY), reporting every 100
    python bench/overhead.py --rounds 3   # more rounds, the median of each variant
    python bench/overhead.py --smoke      # tiny, seconds of training (what the tests run)

Every variant runs the same trials: the smoke preset's GOPC-2, stabilized (stab.out_act=sigmoid,
stab.inner_lr_h=0.1) so that none diverges, with train.seed 0, 1, ..., given to the searcher as start
points; one trial at a time (one core for the trial, one for the driver); FIFO, so none is stopped early.
The report interval is the full preset's (`report_every: 100`), where the target applies.

- bare: a trial function as Ray's examples write one (train, `tune.report` the loss every report_every
  steps, validate once at the end without grids), Ray's OptunaSearch; no MLflow, no checkpoints.
- service: the sweep's own Tuner (gopc/sweep/run.py `build_tuner`): validation, image grids and a
  checkpoint at every iteration, the divergence guard, the MLflow callback, the Optuna study in SQLite.
- service without one of: validation / grids / checkpoint (TuneHooks subclasses below) / MLflow
  (`build_tuner(tracked=False)`); then without all four. The final evaluation (with grids) and the final
  checkpoint stay in every service variant: they are per trial, not per iteration.

steps/s = the steps of all trials / the wall time of `Tuner.fit()` (Ray is started once, before, and
warmed up by one untimed trial; each variant gets fresh storage, MLflow and Optuna databases, created
before the clock starts). `CPU s`: the CPU time that this process and its Ray processes used meanwhile
(CpuMeter), which other work on the machine barely changes; `CPU vs bare` compares steps per CPU second. Variants
are interleaved within each round; the table gives each one's median over the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import torch  # noqa: E402
from ray import tune  # noqa: E402

from gopc.stabilizers import STAYS_FINITE as STABLE  # noqa: E402
from gopc.sweep import settings as S  # noqa: E402
from gopc.sweep.trainable import TuneHooks  # noqa: E402

from common import service_tuner, start_ray, sweep_folder, sweep_settings  # noqa: E402

# The frames of the figures in docs/performance.md (the smoke preset's until it shrank to 32x32)
GEOMETRY = {"data.frame_size": 64, "data.digit_size": 28, "data.seq_len": 10}


class NoGrids(TuneHooks):
    grids_at_every_eval = False


class NoCheckpoint(TuneHooks):
    def set_schedule(self, t, report_every):
        super().set_schedule(t, report_every)
        t.ckpt_every = t.steps  # the last step's only, which the trial's final result carries


class NoValidation(TuneHooks):
    def set_schedule(self, t, report_every):
        super().set_schedule(t, report_every)
        t.eval_every, self.every, self.steps = 0, report_every, t.steps

    def metrics(self, step, metrics, checkpoint):
        super().metrics(step, metrics, checkpoint)
        # the iteration's report without a validation: its objective is the training loss, as the bare
        # loop's; the searcher reads only a trial's last result, which is always a validation
        if step % self.every == 0 and step < self.steps:
            self.report({**self.last_train, "step": step, "objective": metrics["loss"]},
                         with_checkpoint=self.checkpoint is not None)


class NoneOfThem(NoValidation, NoCheckpoint, NoGrids):
    pass


VARIANTS = {  # name: (hooks, MLflow callback); None: the bare loop
    "bare Ray Tune + Optuna": None,
    "service": (TuneHooks, True),
    "service, no validation": (NoValidation, True),
    "service, no grids": (NoGrids, True),
    "service, no checkpoint": (NoCheckpoint, True),
    "service, no MLflow": (TuneHooks, False),
    "service, none of the four": (NoneOfThem, False),
}


def bare_trial(config: dict, base: dict, report_every: int, metric: str) -> None:
    """A trial as Ray's examples write one. Same data, batches, seed and model as the service's."""
    from gopc.data import build_datasets, to_float
    from gopc.evaluate import evaluate
    from gopc.models import build_model
    from gopc.sweep.space import apply
    from gopc.train import batch_indices

    cfg = apply(base, config)
    t = cfg.train
    torch.set_num_threads(1)
    torch.manual_seed(t.seed)
    data = build_datasets(cfg.data)
    train_set, val_set = data["train"], data["val"][: t.eval_size]
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    for step in range(t.steps):
        x = to_float(train_set[batch_indices(t.seed, len(train_set), t.batch_size, step)])
        loss, _ = model(x, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % report_every == 0 and step + 1 < t.steps:
            tune.report({"objective": loss.item(), "step": step + 1})
    metrics, _ = evaluate(model, val_set, cfg, None)
    tune.report({"objective": metrics[metric], "step": t.steps})


def settings(a, folder: str) -> S.Settings:
    return sweep_settings(folder, "overhead", "smoke", [
        f"num_samples={a.trials}", "max_concurrent=1", f"report_every={a.report_every}", f"base.train.steps={a.steps}",
        *(f"base.{k}={v}" for k, v in {**GEOMETRY, **STABLE}.items()), *a.set], seeds=a.trials)


def tuner(variant: str, s: S.Settings):
    """The variant's Tuner; everything it creates (storage, databases, study) exists before fit()."""
    if VARIANTS[variant] is None:
        from ray.tune.search.optuna import OptunaSearch

        from gopc.sweep.space import SearchSpace
        searcher = OptunaSearch(SearchSpace(s.space), metric="objective", mode="min", seed=s.seed,
                                points_to_evaluate=s.start_points)
        trainable = tune.with_resources(tune.with_parameters(
            bare_trial, base=s.base, report_every=s.report_every, metric=s.metric), {"cpu": s.resources.cpu})
        return tune.Tuner(trainable, tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=s.num_samples, max_concurrent_trials=1),
            run_config=tune.RunConfig(name=s.name, storage_path=s.storage_path, verbose=0))
    hooks, tracked = VARIANTS[variant]
    return service_tuner(s, hooks, tracked)


def tree_ticks() -> dict[int, int]:
    """CPU clock ticks (user + system) of this process and each of its descendants, from /proc."""
    procs = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # a process that has just exited
        procs[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        tree[pid] = procs[pid][1] if pid in procs else 0
        todo += [p for p, (ppid, _) in procs.items() if ppid == pid and p not in tree]
    return tree


class CpuMeter(threading.Thread):
    """CPU seconds used by this process and its Ray processes (raylet, workers, the trial actors) while it
    runs: unlike wall time, other work on the cores barely changes it. Sampled from /proc every 0.2 s,
    because Ray's exited workers do not add their time to their parent's; the sampler's own time is
    subtracted, and at most the last 0.2 s of each process that exits is missed. Linux only (else NaN)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.base, self.last, self.own = threading.Event(), {}, {}, 0.0

    def run(self):
        t0 = time.thread_time()
        self.base = self.last = tree_ticks()
        while not self.stop.wait(0.2):
            self.last = {**self.last, **tree_ticks()}
        self.last = {**self.last, **tree_ticks()}
        self.own = time.thread_time() - t0

    def seconds(self) -> float:
        self.stop.set()
        self.join()
        ticks = sum(t - self.base.get(pid, 0) for pid, t in self.last.items())
        return ticks / os.sysconf("SC_CLK_TCK") - self.own


def measure(variant: str, a) -> dict:
    with sweep_folder("gopc_overhead_") as folder:
        s = settings(a, folder)
        tuner_ = tuner(variant, s)
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; this script's table is stdout
            meter = CpuMeter() if os.path.isdir("/proc") else None
            if meter:
                meter.start()
            t0 = time.perf_counter()
            results = tuner_.fit()
            seconds = time.perf_counter() - t0
            cpu = meter.seconds() if meter else float("nan")
    if results.errors:
        raise RuntimeError(f"{variant}: {results.errors[0]}")
    last = [r.metrics for r in results]
    return {"seconds": seconds, "steps": sum(int(m["step"]) for m in last), "trials": len(last),
            "cpu": cpu,
            "objective": statistics.mean(float(m["objective"]) for m in last)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--report-every", type=int, default=100, help="the full preset's (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another sweep setting")
    p.add_argument("--smoke", action="store_true", help="tiny trials: 1 trial x 4 steps of 32x32, 1 round")
    a = p.parse_args(argv)
    if a.smoke:
        a.trials, a.steps, a.report_every, a.rounds = 1, 4, 2, 1
        a.set += ["base.data.frame_size=32", "base.data.seq_len=4", "base.data.n_train=16", "base.data.n_val=4",
                  "base.train.batch_size=4", "base.train.eval_size=4"]
    import ray
    start_ray(2)
    try:
        if not a.smoke:  # the first fit of a Ray session pays for more than its trials (caches, prestarted workers)
            measure(next(iter(VARIANTS)), argparse.Namespace(**{**vars(a), "trials": 1, "steps": a.report_every}))
        runs = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]  # rotate: no fixed slot
            for variant in order:
                runs[variant].append(measure(variant, a))
                print(f"round {r + 1}: {variant}: {runs[variant][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    print(f"date: {datetime.date.today()}   torch threads per trial: 1   load average: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"trials: {a.trials} x {a.steps} steps, report every {a.report_every}, {a.rounds} round(s), one at a time")
    print(f"{'variant':<27} {'steps':>5} {'fit s':>7} {'spread':>7} {'steps/s':>8} {'vs bare':>8} {'CPU s':>7} "
          f"{'CPU vs bare':>11} {'objective':>10}")
    rate, cpu_rate = {}, {}
    for variant, ms in runs.items():
        secs = [m["seconds"] for m in ms]
        fit = statistics.median(secs)
        cpu = statistics.median(m["cpu"] for m in ms)
        rate[variant], cpu_rate[variant] = ms[0]["steps"] / fit, ms[0]["steps"] / cpu
        bare = next(iter(VARIANTS))
        print(f"{variant:<27} {ms[0]['steps']:>5} {fit:>7.1f} {max(secs) - min(secs):>7.1f} {rate[variant]:>8.2f} "
              f"{rate[variant] / rate[bare]:>8.3f} {cpu:>7.1f} {cpu_rate[variant] / cpu_rate[bare]:>11.3f} "
              f"{statistics.mean(m['objective'] for m in ms):>10.5f}")
    slower, cpu_slower = 1 - rate["service"] / rate[bare], 1 - cpu_rate["service"] / cpu_rate[bare]
    print(f"service overhead: {slower:.1%} fewer steps/s than the bare loop "
          f"({'within' if slower <= 0.10 else 'over'} the 10% target); {cpu_slower:.1%} fewer steps per CPU second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
