"""The one driver of every experiment on Ray: a sweep (an Optuna search, sweeps/gopc2_stability.py)
or a study (arms x seeds, the verdict, sweeps/gopc2_study.py). The same script runs on a laptop (Ray
starts locally, MLflow in a SQLite file) and on a cluster (`ray submit cluster/gpu.yaml sweeps/...`:
it joins the running cluster). What differs between kinds of experiment is a `Kind`, each in a module of
its own (gopc/sweep/search.py, gopc/sweep/study.py); the trainable, the MLflow tracker, fault tolerance
and resume are shared. Ray, Tune and MLflow are imported inside the functions that use them, so a bad
setting is refused before they load.

    python sweeps/gopc2_stability.py [--config sweeps/gopc2_stability.yaml] [--preset smoke]
                                     [--set num_samples=64] [--resume]
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import yaml

# Tune's classic reporter: one compact table of chosen columns instead of every metric of every trial.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# An unreachable tracking server must cost seconds, not MLflow's default minutes of retries: the
# driver queues what it cannot write (gopc/sweep/trial_tracking.py) and tries again later.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
# SIGINT and SIGTERM are gopc/sweep/interrupt.py's, which hands the first to Tune's stop itself.
os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
# Tune's result files (result.json, progress.csv: what its ExperimentAnalysis reads) are passed explicitly,
# without its TensorBoard files: MLflow is the record, and writing them cost the driver ~20 ms a trial.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

from gopc import config as C
from gopc import locks
from gopc import outcome as O
from gopc.console import library_level, quiet_libraries
from gopc.disk import DiskFull, no_space, reason
from gopc.errors import ArgumentParser, ConfigError, GopcError
from gopc.sweep import full_disk, interrupt
from gopc.sweep import settings as S


@dataclass(frozen=True)
class Kind:
    """A kind of experiment: what differs between a sweep and a study. A third kind is a module that builds
    one and calls `main` with it; nothing here changes."""
    prog: str
    description: str
    load: Callable  # (path, preset, overrides) -> settings
    tune_setup: Callable  # (settings) -> (TuneConfig, param_space or None, parameter columns for the progress table)
    finish: Callable  # (settings, results, parent_run_id) -> ["label: path", ...] for the end of the output
    parent_params: Callable  # (settings) -> params of the MLflow parent run
    n_trials: Callable  # (settings) -> how many trials the experiment runs
    view: Callable  # (settings) -> (params shown in the MLflow view of the trials, the param they are grouped by)
    check: Callable = lambda s, resume: None  # before anything is written: the kind's own storage
    lock_keys: Callable = lambda s: []  # what else one driver at a time holds (the study of a searcher)
    realign: Callable | None = None  # (settings, experiment path) -> Repair: --resume puts a searcher's
    # snapshot in line with the trial list (gopc/sweep/recovery.py)
    test: bool = False  # trials are evaluated on the test split at the end (a study's verdict)
    noun: str = "sweep"  # what the user calls it
    hooks: type | None = None  # the trials' TuneHooks subclass (None: TuneHooks); bench/scale.py's waits


def parse_args(argv, default_config: str, kind: Kind):
    p = ArgumentParser(prog=kind.prog, description=kind.description)
    p.add_argument("--config", default=default_config, help="sweep settings YAML (default: %(default)s)")
    p.add_argument("--preset", help="a preset of the settings file, e.g. smoke")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. num_samples=64")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this name after a crash or kill")
    p.add_argument("--verbose", action="store_true", help="also show MLflow's and Ray's INFO lines")
    return p.parse_args(argv)


def connect_ray() -> None:
    """Join the cluster this driver runs on (RAY_ADDRESS, or the address `ray start` recorded), else
    start Ray locally. A recorded address whose GCS no longer answers is what a killed cluster leaves
    behind; ray.init would hang on it, so it is removed first."""
    import ray
    from ray._private.utils import get_ray_address_file, read_ray_address  # no public API for this file

    recorded = None if os.environ.get("RAY_ADDRESS") else read_ray_address()
    if recorded and not _answers(recorded):
        print(f"removing stale Ray cluster address {recorded} ({get_ray_address_file(None)})", file=sys.stderr)
        os.remove(get_ray_address_file(None))
    ray.init(ignore_reinit_error=True, log_to_driver=False, logging_level=library_level())


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False


def cluster_limits() -> tuple[float, float]:
    """The largest CPU and GPU counts of any node, including node types the autoscaler may still add
    (the launcher leaves its config at ~/ray_bootstrap_config.yaml on the head)."""
    import ray
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    gpus = [n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]]
    bootstrap = os.path.expanduser("~/ray_bootstrap_config.yaml")
    if os.path.exists(bootstrap):
        with open(bootstrap) as f:
            for node_type in (yaml.safe_load(f) or {}).get("available_node_types", {}).values():
                cpus.append(node_type.get("resources", {}).get("CPU", 0))
                gpus.append(node_type.get("resources", {}).get("GPU", 0))
    return max(cpus, default=0), max(gpus, default=0)


def check_resources(s: S.Settings) -> None:
    cpu, gpu = cluster_limits()
    if s.resources.gpu > gpu:
        raise ConfigError(f"resources.gpu: a trial asks {s.resources.gpu} GPUs but the largest node has {gpu:g}; "
                          "lower it (fractions such as 0.25 share a GPU)")
    if s.resources.cpu > cpu:
        raise ConfigError(f"resources.cpu: a trial asks {s.resources.cpu} CPUs but the largest node has {cpu:g}; lower it")


def pending_path(s: S.Settings) -> str:
    """Where MLflow writes wait while the server is away: on the driver's disk, whatever Tune's storage,
    beside the Optuna study when that is a local file (by default beside mlflow.db), else here."""
    local = S.study_file(s.study_storage)
    return os.path.join(os.path.dirname(os.path.abspath(local)) if local else os.getcwd(), f"mlflow_pending-{s.name}.pkl")


def check_storage(s: S.Settings) -> None:
    """A storage path Tune cannot create fails only once Ray runs and the parent run exists."""
    if "://" not in s.storage_path:
        C.check_creatable(s.storage_path, "storage")


def make_trainable(s: S.Common, kind: Kind, hooks_class=None):
    """The trial function; `hooks_class` (a TuneHooks subclass) is for bench/overhead.py only."""
    from ray import tune

    from gopc.sweep.trainable import TuneHooks, run_trial
    return tune.with_resources(
        tune.with_parameters(run_trial, bases=s.bases, metric=s.metric, penalty=s.penalty,
                             report_every=s.report_every, test=kind.test,
                             hooks_class=hooks_class or kind.hooks or TuneHooks,
                             window=getattr(s, "objective_window", 1)),
        {"cpu": s.resources.cpu, "gpu": s.resources.gpu})


def build_tuner(s: S.Common, parent_run_id: str, kind: Kind, hooks_class=None, tracked: bool = True):
    """The sweep's Tuner. bench/overhead.py alone passes `hooks_class` (per-iteration costs switched off)
    and `tracked=False` (no MLflow callback), to measure what each costs; the service uses the defaults."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from gopc.sweep.notes import LastGrids
    from gopc.sweep.snapshot import KeepGoodCopies
    from gopc.sweep.trial_tracking import SweepTracker

    steps = C.from_dict(s.base).train.steps
    tune_config, param_space, columns = kind.tune_setup(s)
    return tune.Tuner(
        make_trainable(s, kind, hooks_class), param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(
            name=s.name, storage_path=s.storage_path, verbose=1,
            progress_reporter=tune.CLIReporter(
                metric_columns={"step": "step", "objective": s.metric, "val/prior/skill_mse": "skill",
                                **{word: word for word in (O.LEARNED, O.DEGRADED, O.DIVERGED)}},
                parameter_columns=columns, max_report_frequency=30),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), interrupt.StopOnSignal(), full_disk.StopOnFullDisk(),
                       KeepGoodCopies(s.experiment_path), LastGrids()] + ([SweepTracker(s.mlflow_uri, parent_run_id, s.name, s.bases, steps,
                                                     pending_path(s))] if tracked else [])),
    )


@contextlib.contextmanager
def one_driver(s: S.Common, kind: Kind):
    """One driver per experiment, as one `gopc train` per run folder: a second sweep of the same name, or
    a --resume while it still runs, would share its Tune state, Optuna study and MLflow parent."""
    def refuse(pid: str) -> GopcError:
        return GopcError(f"name: {kind.noun} {s.name!r} is being run by another driver (pid {pid}); wait for it "
                         f"to end, or stop it (kill -INT {pid}) and continue it with --resume")
    with contextlib.ExitStack() as held:
        for key in [s.experiment_path] + kind.lock_keys(s):
            held.enter_context(locks.held(locks.outside(key), refuse))
        yield


class Interrupted(Exception):
    """A signal stopped the experiment; the message is the one line the driver prints."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def run(s: S.Common, resume: bool, raw_yaml: str, kind: Kind, resume_command: str = "") -> list[str]:
    """Runs the experiment; returns the lines that say where to look, then the parent run's id. Raises
    Interrupted after a SIGINT or SIGTERM, the experiment's state saved and its runs marked."""
    from ray import tune

    from gopc.sweep import snapshot
    from gopc.sweep.recovery import Repair, forget_orphans
    from gopc.sweep.parent_run import kill_parent, start_parent
    from gopc.run_tracking import check_tracking, create_store

    check_storage(s)
    exists = tune.Tuner.can_restore(s.experiment_path)
    if resume and not exists:
        raise GopcError(f"--resume: no sweep at {s.experiment_path}; start it without --resume")
    if exists and not resume:
        raise GopcError(f"sweep {s.name!r} already exists at {s.experiment_path}; "
                        "pass --resume to continue it, or --set name=NEW to start another")
    check_tracking(s.mlflow_uri, "tracking_uri")  # refused before anything: trials would train unrecorded
    kind.check(s, resume)
    try:
        connect_ray()
    except SystemExit as e:  # SIGTERM during ray.init, whose own handler turns it into an exit
        if e.code != signal.SIGTERM:
            raise
        interrupt.record(signal.SIGTERM)
    interrupt.install(kind.prog)  # again: ray.init installs a SIGTERM handler that aborts the driver
    check_resources(s)
    if sig := interrupt.received():  # before anything was written: the same command starts it
        raise Interrupted(sig, f"{_name(sig)}: {kind.noun} {s.name!r} stopped before it started; nothing was written")
    if resume and (put_back := snapshot.repair(s.experiment_path)):  # before anything reads the snapshot
        print(f"put back the last good copy of {', '.join(put_back)}, cut short when the disk filled", file=sys.stderr)
    create_store(s.mlflow_uri)
    parent = start_parent(s.mlflow_uri, s.mlflow_experiment, s.name, resume, kind.parent_params(s), raw_yaml,
                          saved_view(s, kind))
    full_disk.reset()
    full_disk.quiet_tune()
    results = None
    try:
        if resume:  # finished trials are kept, unfinished ones continue from their last checkpoint
            repair = kind.realign(s, s.experiment_path) if kind.realign else Repair()
            if repair.changed:
                print(repair, file=sys.stderr)
                forget_orphans(s.mlflow_uri, parent, repair, pending_path(s))
            tuner = build_tuner(s, parent, kind) if repair.restart else tune.Tuner.restore(
                s.experiment_path, trainable=make_trainable(s, kind), resume_unfinished=True, resume_errored=False)
        else:
            tuner = build_tuner(s, parent, kind)
        results = tuner.fit()
        if sig := interrupt.received():  # Tune saved its state; no summary or verdict of an incomplete run
            kill_parent(s.mlflow_uri, parent)
            raise Interrupted(sig, f"{_name(sig)}: {kind.noun} {s.name!r} stopped with {_done(results)} of "
                                   f"{kind.n_trials(s)} trials finished; state saved, resume with: {resume_command}")
        if full_disk.reported():  # a trial found the storage full; Tune stopped as for a signal
            raise DiskFull(f"trial(s) {', '.join(full_disk.reported())} found the disk full")
        return kind.finish(s, results, parent) + [parent]
    except Exception as e:  # the trials' full disk, or the driver's own (Tune's files, the summary)
        if not no_space(e):
            raise
        kill_parent(s.mlflow_uri, parent, "disk full")
        finished = f" with {_done(results)} of {kind.n_trials(s)} trials finished" if results is not None else ""
        raise DiskFull(f"storage: {reason(e)} in {s.experiment_path}; {kind.noun} {s.name!r} stopped{finished}, "
                       f"its last good state kept: free space, then resume with: {resume_command}") from None


def _done(results) -> int:
    """Trials that finished (completed, stopped early or errored) in Tune's results."""
    return sum(bool((r.metrics or {}).get("done")) or r.error is not None for r in results)


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def saved_view(s: S.Common, kind: Kind) -> tuple[list[str], str | None]:
    """The MLflow UI view of the trials (gopc/sweep/parent_run.py: save_view): outcome and score columns,
    then the kind's params, grouped as the kind says."""
    section = "test" if kind.test else "val"
    params, group = kind.view(s)
    columns = [f"metrics.`{O.DIVERGED}`", f"metrics.`{O.LEARNED}`"]
    columns += [f"metrics.`{section}/prior/{k}`" for k in ("skill_mse", "mse", "blank_mse", "last_mse")]
    return columns + [f"params.`{p}`" for p in params if p != group] + ["tags.`status`"], group


def resume_command(kind: Kind, argv) -> str:
    """The command that continues this experiment: the same script and arguments, with --resume."""
    import shlex
    script = sys.argv[0] if sys.argv[0].endswith(".py") else f"sweeps/{kind.prog}.py"
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    return shlex.join(["python", script, *args, "--resume"])


def main(argv, default_config: str, kind: Kind) -> int:
    from gopc.sweep.notes import ui_address
    from gopc.sweep.parent_run import view_link
    try:
        args = parse_args(argv, default_config, kind)
        quiet_libraries(args.verbose)
        raw_yaml = open(args.config).read() if os.path.exists(args.config) else ""
        s = kind.load(args.config, args.preset, args.set)
        with interrupt.catching(kind.prog), one_driver(s, kind):
            where = run(s, args.resume, raw_yaml, kind, resume_command(kind, argv))
    except GopcError as e:
        print(f"{kind.prog}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{kind.prog}: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    uri = s.mlflow_uri
    ui = (f"mlflow ui --backend-store-uri {uri} --port 5000" if uri.startswith("sqlite")
          else f"open {uri} (on a cluster: ray dashboard cluster/gpu.yaml --port 5000 --remote-port 5000)")
    address = ui_address(uri) or uri.rstrip("/")
    view = view_link(uri, where.pop(), s.name)
    print("\n" + "\n".join(where + [f"MLflow UI: {ui}"] + [f"then the trials' view: {address}/{view}"] * bool(view)) + "\n")
    return 0
