"""The service at scale: N short trials through the sweep service and through a bare Ray Tune loop, as Ray
Tune's own release test "bookkeeping overhead" runs them (trials that wait, many logical CPUs), so that the
2 real cores measure the bookkeeping and not the training.

    python bench/scale.py                       # N = 100, 300, 1000: trials of 5 s reporting 3 times, 16 at once
    python bench/scale.py --n 100,300,1000,3000
    python bench/scale.py --smoke               # N = 8 trials of 1 s, 4 at once (what the tests run)
    python bench/scale.py --placement           # 8 logical gpu_worker nodes (cluster/gpu.yaml), the sweep's resources, 64 trials
    python bench/scale.py --placement --smoke   # 2 nodes, 12 trials

- bare: a function trainable that sleeps its length and reports `--reports` times (Ray's `timed_tune_run`),
  Tune's default searcher, no MLflow, no checkpoints.
- service: the sweep driver itself (gopc/sweep/run.py `run`): the Optuna searcher and study in SQLite,
  the MLflow parent, a child run per trial with its metrics and prediction grids, the optuna-dashboard
  notes, a checkpoint at every report, recovery bookkeeping, the summary and the saved view. Only the
  training inside the trial is replaced (`Waiting`, through the trial's hooks as bench/overhead.py swaps
  them): it waits its share of the trial's length, then copies in the checkpoint and grids of one real
  run made before the clock starts, and reports that run's metrics (its objective moved by the trial's lr,
  so that TPE sees a slope).

Both loops: Ray started with `--cpus` logical CPUs, each trial asking for 1, FIFO, Tune's reuse_actors.
Each (loop, N) runs in a process of its own (fresh Ray, fresh databases; its peak RSS its own).
Printed per N: wall time against the theoretical N x length / concurrency; service / bare; the driver's
CPU seconds per trial; the median and 95th percentile of one ask (`suggest`) and one tell
(`on_trial_complete`); MLflow client calls per trial and their time; optuna.db and mlflow.db sizes; peak RSS.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from gopc.console import library_level, quiet_libraries  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the smoke preset's data and model, shrunk: the template run is made once, and its files are what
# every trial copies (a checkpoint of the smoke model's size, real grids)
BASE = ["base.data.seq_len=4", "base.data.n_train=32", "base.data.n_val=4", "base.train.eval_size=4"]


# --- the trial: the service's hooks, its training replaced by waiting --------------------------------

def waiting_hooks(seconds: float, template: str, placement_log: str = ""):
    """A TuneHooks subclass whose trial waits `seconds` in all instead of training, and reports as a real
    one: each iteration, the template run's checkpoint and grids copied into the run folder, its metrics
    reported and its validation recorded. With `placement_log`, each trial appends its node, logical GPU
    and waiting interval there (one JSON line)."""
    from gopc.sweep.trainable import TuneHooks

    class Waiting(TuneHooks):
        def train(self, cfg, run_dir, resume_from):
            import ray

            from gopc import config as C
            from gopc import outcome as O
            from gopc.evaluate import add_validation
            from gopc.train import Result
            with open(os.path.join(template, "metrics.json")) as f:
                saved = json.load(f)
            t, os_ = cfg.train, os.path
            iterations = -(-t.steps // t.eval_every)
            os.makedirs(run_dir, exist_ok=True)
            C.save(cfg, os_.join(run_dir, "config.yaml"))
            self.started(cfg, run_dir, 0)
            history, start = [], time.time()
            for i in range(1, iterations + 1):
                time.sleep(seconds / iterations)
                step = min(i * t.eval_every, t.steps)
                ckpt = shutil.copy(os_.join(template, "checkpoint.pt"), os_.join(run_dir, "checkpoint.pt"))
                shutil.copytree(os_.join(template, "eval"), os_.join(run_dir, "eval"), dirs_exist_ok=True)
                metrics = dict(saved["val"])  # the objective moved by lr: best near 1e-3
                metrics[self.metric] *= 1 + 0.1 * math.log10(t.lr / 1e-3) ** 2 + 0.01 * (iterations - i)
                self.metrics(step, saved["train"], ckpt)
                add_validation(run_dir, history, step, metrics)
                self.evaluated(step, metrics, {})
            if placement_log:
                line = {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                        "start": start, "end": time.time()}
                with open(placement_log, "a") as f:  # one short append: whole lines from every trial
                    f.write(json.dumps(line) + "\n")
            result = Result(O.COMPLETED, t.steps, eval=metrics, run_dir=run_dir, outcome=O.classify(metrics, t.learned_margin))
            self.finished(result)
            return result

    return Waiting


def make_template(folder: str, settings) -> str:
    """One real run of the sweep's base (a few steps): its checkpoint, grids and metrics, which every
    waiting trial copies."""
    from gopc import config as C
    from gopc.sweep.space import trial_config
    from gopc.train import Hooks, train

    class Keep(Hooks):
        last = {}

        def metrics(self, step, metrics, checkpoint):
            self.last = metrics

    cfg = trial_config(settings.bases, {})
    cfg = C.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "steps": 2, "device": "cpu"}})
    hooks = Keep()
    result = train(cfg, folder, hooks, progress=False)  # its final evaluation draws eval/*.png
    assert result.status == "completed", result
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"train": hooks.last, "val": result.eval}, f)
    return folder


# --- one measurement, in its own process -------------------------------------------------------------

class Timed:
    """Wraps methods of a class: the count and durations of the outermost calls (a wrapped method that
    calls another wrapped one counts once)."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}
        self._depth = threading.local()

    def wrap(self, cls, names, label=None):
        for name in names:
            original = getattr(cls, name)

            @functools.wraps(original)
            def timed(*args, _original=original, _key=label or name, **kwargs):
                depth = getattr(self._depth, "n", 0)
                self._depth.n = depth + 1
                t0 = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self._depth.n = depth
                    if depth == 0:
                        self.calls.setdefault(_key, []).append(time.perf_counter() - t0)
            setattr(cls, name, timed)


def bare_trial(config, seconds: float, reports: int):
    from ray import tune
    for i in range(1, reports + 1):
        time.sleep(seconds / reports)
        tune.report({"objective": config["x"], "step": i})


def measure_bare(a, folder: str) -> dict:
    from ray import tune
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(bare_trial, seconds=a.seconds, reports=a.reports), {"cpu": 1}),
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(num_samples=a.n, max_concurrent_trials=a.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name="bare", storage_path=os.path.join(folder, "sweep_results"), verbose=1))
    return {"fit": timed_fit(tuner.fit)}


def timed_fit(fit) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; the bench's table is stdout
        fit()
    return time.perf_counter() - t0


def service_settings(a, folder: str, resources: list[str]):
    from common import sweep_settings
    steps = 10 * a.reports
    return sweep_settings(folder, "scale", "smoke", [
        f"num_samples={a.n}", f"max_concurrent={a.concurrency}", f"report_every={steps // a.reports}",
        f"base.train.steps={steps}", *resources, "base.train.device=cpu", *BASE])


def measure_service(a, folder: str, resources=("resources.cpu=1", "resources.gpu=0"), placement_log: str = "") -> dict:
    import mlflow

    from gopc.sweep import run as R
    from gopc.sweep import search
    from gopc.sweep.searcher import DivergenceAwareOptunaSearch
    s = service_settings(a, folder, list(resources))
    template = make_template(os.path.join(folder, "template"), s)
    kind = dataclasses.replace(search.SWEEP, hooks=waiting_hooks(a.seconds, template, placement_log))
    timed = Timed()
    timed.wrap(DivergenceAwareOptunaSearch, ["suggest"], "ask")
    timed.wrap(DivergenceAwareOptunaSearch, ["on_trial_complete"], "tell")
    mlflow_calls = [n for n in ("create_run", "get_run", "search_runs", "log_batch", "log_image", "log_text",
                                "log_dict", "log_artifacts", "set_tag", "set_terminated", "update_run")]
    timed.wrap(mlflow.MlflowClient, mlflow_calls, "mlflow")
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        R.run(s, False, "", kind)
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    size = {name: os.path.getsize(os.path.join(folder, name)) for name in ("optuna.db", "mlflow.db")}
    m = {"fit": wall, "driver_cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
         "ask": timed.calls.get("ask", []), "tell": timed.calls.get("tell", []),
         "mlflow": timed.calls.get("mlflow", []), **size}
    return {**m, **what_users_see(s, folder), "cpu": s.resources.cpu, "gpu": s.resources.gpu}


def what_users_see(s, folder: str) -> dict:
    """After the sweep: the saved view's query (the MLflow UI's runs table: the sweep's trials, sorted by
    the objective), how many trial runs it finds with a final status, and `gopc best` from the shell."""
    import mlflow

    from gopc.outcome import MLFLOW_STATUS
    client = mlflow.MlflowClient(s.mlflow_uri)
    exp_id = client.get_experiment_by_name(s.mlflow_experiment).experiment_id
    t0 = time.perf_counter()
    runs = client.search_runs([exp_id], f"tags.sweep = '{s.name}' and tags.role = 'trial'",
                              order_by=["metrics.`val/prior/mse` ASC"], max_results=50000)
    view = time.perf_counter() - t0
    gopc = os.path.join(os.path.dirname(sys.executable), "gopc")
    t0 = time.perf_counter()
    best = subprocess.run([gopc, "best", "--sweep", s.name, "--tracking-uri", s.mlflow_uri, "--top", "3",
                           "-o", os.path.join(folder, "exported")], capture_output=True, text=True)
    best_s = time.perf_counter() - t0
    if best.returncode != 0:
        raise SystemExit(f"gopc best failed: {best.stderr.strip()}")
    return {"view_s": view, "best_s": best_s,
            "runs": sum(r.data.tags.get("status") in MLFLOW_STATUS for r in runs)}


def one(a) -> int:
    """The child process: one loop at one N; its measurements as JSON on the last line of stdout."""
    sys.path.insert(0, HERE)
    import ray
    with tempfile.TemporaryDirectory(prefix="gopc_scale_") as folder, contextlib.chdir(folder):
        ray.init(address="local", num_cpus=a.concurrency, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 logging_level=library_level())
        try:
            m = measure_bare(a, folder) if a.one == "bare" else measure_service(a, folder)
        finally:
            ray.shutdown()
    m["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(m))
    return 0


def run_one(loop: str, n: int, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", loop, "--n", str(n), "--seconds", str(a.seconds),
           "--reports", str(a.reports), "--concurrency", str(a.concurrency)] + (["--verbose"] if a.verbose else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"bench/scale.py: {loop} at N={n} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pct(xs, q) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))


def scale(a) -> int:
    rows = []
    for n in a.ns:
        bare, service = run_one("bare", n, a), run_one("service", n, a)
        ideal = n * a.seconds / a.concurrency
        rows.append((n, ideal, bare, service))
        print(f"N={n}: bare {bare['fit']:.1f} s, service {service['fit']:.1f} s", file=sys.stderr, flush=True)
    print(f"date: {datetime.date.today()}   trials of {a.seconds:g} s reporting {a.reports} times, "
          f"{a.concurrency} at once on {a.concurrency} logical CPUs ({os.cpu_count()} cores)   load average: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'N':>5} {'ideal s':>8} {'bare s':>7} {'/ideal':>6} {'service s':>9} {'/ideal':>6} {'svc/bare':>8} "
          f"{'over s/trial':>12} {'driver CPU s/trial':>18} {'ask ms p50/p95':>15} {'tell ms p50/p95':>16} "
          f"{'MLflow calls/trial':>18} {'MLflow s/trial':>14} {'optuna.db MB':>12} {'mlflow.db MB':>12} {'RSS MB':>7} "
          f"{'runs':>5} {'view s':>6} {'best s':>6}")
    for n, ideal, bare, svc in rows:
        ms = lambda xs, q: 1000 * pct(xs, q)  # noqa: E731
        print(f"{n:>5} {ideal:>8.1f} {bare['fit']:>7.1f} {bare['fit'] / ideal:>6.2f} {svc['fit']:>9.1f} "
              f"{svc['fit'] / ideal:>6.2f} {svc['fit'] / bare['fit']:>8.2f} {(svc['fit'] - bare['fit']) / n:>12.3f} "
              f"{svc['driver_cpu'] / n:>18.3f} {ms(svc['ask'], 50):>7.1f}/{ms(svc['ask'], 95):<7.1f} "
              f"{ms(svc['tell'], 50):>7.1f}/{ms(svc['tell'], 95):<8.1f} {len(svc['mlflow']) / n:>18.1f} "
              f"{sum(svc['mlflow']) / n:>14.3f} {svc['optuna.db'] / 2**20:>12.2f} {svc['mlflow.db'] / 2**20:>12.2f} "
              f"{svc['rss_mb']:>7.0f} {svc['runs']:>5} {svc['view_s']:>6.2f} {svc['best_s']:>6.1f}")
    if a.plot:
        plot(rows, a)
    return 0


def plot(rows, a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ns, [r[2]["fit"] / r[0] for r in rows], "o-", label="bare Ray Tune")
    ax.plot(ns, [r[3]["fit"] / r[0] for r in rows], "o-", label="service")
    ax.plot(ns, [r[3]["driver_cpu"] / r[0] for r in rows], "s--", label="service: driver CPU")
    ax.axhline(a.seconds / a.concurrency, color="grey", lw=1, ls=":", label="ideal (length / concurrency)")
    ax.set_xscale("log")
    ax.set_xlabel("trials (N)")
    ax.set_ylabel("seconds per trial")
    ax.set_title(f"trials of {a.seconds:g} s, {a.concurrency} at once")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=110)
    print(f"plot: {a.plot}")


# --- placement: fractional GPUs on many logical nodes ------------------------------------------------

class PlacementWatch(threading.Thread):
    """How many trials each node's GPU holds at once, as Ray's scheduler placed them: Tune gives each trial
    a placement group (its `resources`), and the GCS's table says on which node each one is created.
    Sampled every 0.1 s while the sweep runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.most = threading.Event(), {}

    def run(self):
        from ray.util import placement_group_table
        while not self.stop.wait(0.1):
            held: dict[str, int] = {}  # node -> trials holding a share of its GPU
            for pg in placement_group_table().values():
                if pg["state"] == "CREATED":
                    for i, bundle in pg["bundles"].items():
                        if bundle.get("GPU", 0) > 0:
                            node = pg["bundles_to_node_id"][i]
                            held[node] = held.get(node, 0) + 1
            for node, k in held.items():
                self.most[node] = max(self.most.get(node, 0), k)


def placement(a) -> int:
    """As configured: `nodes` logical nodes of cluster/gpu.yaml's gpu_worker shape, trials asking for the
    sweep's own `resources` (sweeps/gopc2_stability.yaml), more trials than fit at once."""
    import ray
    import yaml
    from ray.cluster_utils import Cluster
    sys.path.insert(0, HERE)
    with open(os.path.join(ROOT, "cluster", "gpu.yaml")) as f:
        node = yaml.safe_load(f)["available_node_types"]["gpu_worker"]["resources"]
    with open(os.path.join(ROOT, "sweeps", "gopc2_stability.yaml")) as f:  # the full preset's, not smoke's
        trial = yaml.safe_load(f)["resources"]
    with tempfile.TemporaryDirectory(prefix="gopc_placement_") as folder, contextlib.chdir(folder):
        cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0})
        for _ in range(a.nodes):
            cluster.add_node(num_cpus=node["CPU"], num_gpus=node["GPU"])
        cluster.wait_for_nodes()
        log, watch = os.path.join(folder, "placement.jsonl"), PlacementWatch()
        watch.start()
        try:
            s = measure_service(a, folder, resources=[f"resources.{k}={v}" for k, v in trial.items()], placement_log=log)
        finally:
            watch.stop.set()
            watch.join()
            ray.shutdown()
            cluster.shutdown()
        with open(log) as f:
            records = [json.loads(line) for line in f]
    print(f"date: {datetime.date.today()}   {a.nodes} logical nodes of cluster/gpu.yaml's gpu_worker ({node['CPU']} CPUs, "
          f"{node['GPU']} GPU), trials asking for the sweep's resources (cpu {s['cpu']:g}, gpu {s['gpu']:g}), "
          f"{a.n} trials of {a.seconds:g} s, up to {a.concurrency} at once")
    gpus = {(r["node"], tuple(r["gpus"])) for r in records}
    print(f"trials that ran: {len(records)}, on {len({r['node'] for r in records})} nodes; "
          f"the logical GPUs they were given: {sorted({g for r in records for g in r['gpus']})} ({len(gpus)} node x GPU)")
    for node, k in sorted(watch.most.items()):
        print(f"node {node[:8]}: at most {k} trials on its GPU at once")
    print(f"most trials on one GPU at once: {max(watch.most.values(), default=0)} (configured: {1 / s['gpu']:g}); "
          f"fewest at a node's fullest: {min(watch.most.values(), default=0)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="100,300,1000", help="trial counts, comma-separated (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="each trial's length (default: %(default)s)")
    p.add_argument("--reports", type=int, default=3, help="reports per trial (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="logical CPUs = trials at once (default: %(default)s)")
    p.add_argument("--plot", default="", help="write the seconds-per-trial plot here (PNG)")
    p.add_argument("--placement", action="store_true", help="the many-node fractional-GPU run instead")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="small and quick (the tests)")
    p.add_argument("--verbose", action="store_true", help="MLflow's, Ray's and Optuna's INFO lines too")
    p.add_argument("--one", choices=["bare", "service"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quiet_libraries(a.verbose)  # as the sweep's own command does: run.run, called here, leaves it to main
    if a.one:
        a.n = int(a.n)
        return one(a)
    if a.placement:
        a.n, a.concurrency = (12, 16) if a.smoke else (64, 64)
        a.nodes = 2 if a.smoke else a.nodes
        a.seconds = 2.0 if a.smoke else a.seconds
        return placement(a)
    if a.smoke:
        a.n, a.seconds, a.concurrency = "8", 1.0, 4
    a.ns = [int(x) for x in str(a.n).split(",")]
    return scale(a)


if __name__ == "__main__":
    sys.exit(main())
