"""Experiment settings (sweeps/*.yaml): a sweep's, a study's (gopc/sweep/study.py), and what they share."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from gopc import config as C
from gopc.errors import ConfigError
from gopc.sweep.space import Param, apply, parse_space
from gopc.run_tracking import resolve_uri

OBJECTIVES = [f"{s}/{m}" for s in ("posterior", "prior", "rollout") for m in ("mse", "bce", "psnr", "ssim")]


@dataclass
class Scheduler:
    type: str = C.choice("asha", "asha", "fifo")  # ASHA stops slow-but-finite trials early
    grace_period: int = C.bounded(2, 1)  # reports before a trial can be stopped
    reduction_factor: int = C.bounded(3, 2)


@dataclass
class Resources:
    cpu: float = C.bounded(1.0, 0.0)
    gpu: float = C.bounded(0.0, 0.0)  # fractional: 0.25 packs four trials on a GPU


@dataclass
class Common:
    """What every experiment run on Ray has: a name, where results go, how trials run and retry."""
    name: str = "gopc2_stability"
    metric: str = "prior/mse"  # the objective: a validation metric of the run's evaluation
    mode: str = C.choice("min", "min", "max")
    max_concurrent: int = C.bounded(4, 1)
    report_every: int = C.bounded(20, 1)  # training steps per Tune iteration (each ends in validation)
    max_failures: int = C.bounded(2, -1)  # retries of a trial whose worker died (-1: forever)
    # Tune's num_to_keep. Tune snapshots the experiment (O(N)) when a trial has written this many checkpoints since the
    # last: at 2, short trials forced one every few seconds, O(N^2) in all (docs/performance.md, "Scale"); costs disk
    keep_checkpoints: int = C.bounded(4, 1)
    storage: str = ""  # Tune's storage_path; "" = $GOPC_STORAGE or ./sweep_results
    tracking_uri: str = ""  # "" = $GOPC_TRACKING_URI or sqlite:///./mlflow.db
    experiment: str = ""  # MLflow experiment; "" = the sweep name
    # a sweep's Optuna study; "" = $GOPC_OPTUNA_STORAGE or optuna.db beside mlflow.db (see study_storage).
    # The driver keeps its queued MLflow writes beside it, for a study (no Optuna) too.
    optuna_storage: str = ""
    resources: Resources = field(default_factory=Resources)
    base: dict = field(default_factory=dict)  # run config shared by every trial

    @property
    def bases(self) -> dict[str, dict]:
        """Each arm's run config (see space.trial_config); a sweep has one, named ""."""
        return {"": self.base}

    @property
    def storage_path(self) -> str:
        path = self.storage or os.environ.get("GOPC_STORAGE") or "sweep_results"
        return path if "://" in path else os.path.abspath(os.path.expanduser(path))

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def mlflow_uri(self) -> str:
        return resolve_uri(self.tracking_uri or os.environ.get("GOPC_TRACKING_URI", ""))

    @property
    def study_storage(self) -> str:
        return study_storage(self.optuna_storage, self.mlflow_uri)

    @property
    def mlflow_experiment(self) -> str:
        return self.experiment or self.name

    @property
    def penalty(self) -> float:
        """The objective told to Optuna for a diverged trial: worse than any real value."""
        return 1e6 if self.mode == "min" else -1e6


@dataclass
class Settings(Common):
    num_samples: int = C.bounded(32, 1)
    seed: int = C.bounded(0, 0)  # Optuna's sampler refuses a negative seed, but only once Ray runs
    # TPE samples at random until this many trials are complete (start points count): Optuna's 10 was random search
    # up to trial 11; 5 found a learned config sooner on every seed of bench/search_efficiency.py (docs/performance.md).
    n_startup_trials: int = C.bounded(5, 1)
    # The objective a trial reports: the mean of its last k validations (1: the latest alone). k > 1 holds out for
    # the long run: a `degraded` trial scores its decline, not its peak (docs/verdict.md, "Late collapse").
    objective_window: int = C.bounded(1, 1)
    scheduler: Scheduler = field(default_factory=Scheduler)
    start_points: list = field(default_factory=list)  # evaluated first: overrides of the base's values
    space: list[Param] = field(default_factory=list)


def study_storage(setting: str, mlflow_uri: str) -> str:
    """Where the Optuna study lives: any SQLAlchemy URL, or a path ending in .log for Optuna's
    JournalStorage (the same string opens it in optuna-dashboard). By default a SQLite file beside the
    MLflow database, else in the working directory (cluster/gpu.yaml puts it on the head's disk)."""
    folder = os.path.dirname(mlflow_uri[len("sqlite:///"):]) if mlflow_uri.startswith("sqlite:///") else "."
    return setting or os.environ.get("GOPC_OPTUNA_STORAGE") or f"sqlite:///{os.path.abspath(folder)}/optuna.db"


def study_file(url: str) -> str | None:
    """The local file behind a study storage URL; None for a database server."""
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else None if "://" in url else url


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(raw: dict, preset: str | None, overrides: list[str] | None, cls, what: str) -> dict:
    """The settings file with its preset merged in and the --set overrides applied, keys checked against cls."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: expected a mapping of settings")
    presets = raw.pop("presets", {}) or {}
    if preset:
        if preset not in presets:
            raise ConfigError(f"--preset: {preset!r} is not defined; this file has {sorted(presets) or 'none'}")
        if not isinstance(presets[preset], dict):
            raise ConfigError(f"presets.{preset}: expected a mapping of settings, got {presets[preset]!r}")
        raw = _merge(raw, presets[preset])
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. num_samples=16")
        node = raw
        *parents, last = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parents[:i + 1])} is {node!r}, not a mapping")
        try:
            node[last] = C.parse_yaml(value)
        except yaml.YAMLError:
            node[last] = value  # as for the run config's --set: the field's own check names the problem
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := [k for k in raw if k not in known]:
        raise ConfigError(f"{what}.{unknown[0]}: unknown setting; known: {', '.join(sorted(known))}")
    return raw


NAME_CHARS = "letters, digits, '-' and '_'"


def check_name(name, field: str) -> None:
    """Names that become MLflow run names, parameter keys and folders: not empty, NAME_CHARS only."""
    if name is None or name == "":  # `--set name=` reads as None, `name: ''` as ""
        raise ConfigError(f"{field}: empty; give a name of {NAME_CHARS}, e.g. gopc2-stable")
    if not isinstance(name, str):
        raise ConfigError(f"{field}: expected a name, got {name!r}; give a name of {NAME_CHARS}, e.g. gopc2-stable")
    if not name.replace("_", "").replace("-", "").isalnum() or not name.isascii():
        raise ConfigError(f"{field}: {name!r} may hold only {NAME_CHARS}; rename it, e.g. gopc2-stable")


def parse_common(raw: dict, cls, what: str, nested: tuple[str, ...]) -> Common:
    """The scalar settings of `cls`, its resources and its checked base; `nested` names the keys the caller parses."""
    check_name(raw.get("name", cls.name), f"{what}.name")  # first: the type check would only say "no value given"
    s = C.section(cls, what, {k: v for k, v in raw.items() if k not in ("resources", "base") + nested})
    s.resources = C.section(Resources, "resources", raw.get("resources"))
    base = raw.get("base") or {}
    try:
        C.from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"base.{e}") from None
    if keys := list((base.get("mlflow") or {})):  # the driver tracks the trials, not the run config's MLflow section
        own = {"tracking_uri": "tracking_uri", "experiment": "experiment"}.get(keys[0])
        raise ConfigError(f"base.mlflow.{keys[0]}: a {what}'s trials are tracked by its own settings, not the run "
                          "config's; " + (f"set {own} instead (--set {own}=...)" if own else "remove it"))
    s.base = base
    if s.resources.cpu <= 0 and s.resources.gpu <= 0:
        raise ConfigError("resources: a trial needs some cpu or gpu; set resources.cpu: 1")
    if s.metric not in OBJECTIVES:
        raise ConfigError(f"{what}.metric: {s.metric!r} is not one of {OBJECTIVES}")
    return s


def parse(raw: dict, preset: str | None = None, overrides: list[str] | None = None) -> Settings:
    raw = resolve(raw, preset, overrides, Settings, "sweep")
    s = parse_common(raw, Settings, "sweep", ("scheduler", "space", "start_points"))
    s.scheduler = C.section(Scheduler, "scheduler", raw.get("scheduler"))
    base = s.base
    s.space = parse_space(raw.get("space"), base)
    for p in s.space:  # here, not in space.py, whose owner changes it in parallel (issue 11)
        if p.choices is not None and len({repr(c) for c in p.choices}) < len(p.choices):
            repeated = next(c for i, c in enumerate(p.choices) if c in p.choices[:i])
            raise ConfigError(f"space.{p.name}.choices: {repeated!r} is listed twice; list each value once")
    s.start_points = parse_start_points(raw.get("start_points") or [], s.space, base)
    iterations = -(-C.from_dict(base).train.steps // s.report_every)
    if s.scheduler.type == "asha" and s.scheduler.grace_period > iterations:
        raise ConfigError(f"scheduler.grace_period: {s.scheduler.grace_period} iterations, but a trial has only "
                          f"{iterations} (base.train.steps / report_every); lower it or train longer")
    return s


def parse_start_points(points, space: list[Param], base: dict) -> list[dict]:
    """Each start point: the base's value of every searched parameter, with the listed overrides; conditional ones
    switched off are left out, as Optuna would. What Optuna or a trial would refuse once Ray runs is refused here."""
    if not isinstance(points, list):
        raise ConfigError("sweep.start_points: expected a list of {parameter: value} mappings")
    flat, names, out = C.from_dict(base).flat(), {p.name: p for p in space}, []
    for i, overrides in enumerate(points):
        where = f"sweep.start_points[{i}]"
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: expected a mapping of parameter: value")
        for key, value in overrides.items():
            if key not in names:
                raise ConfigError(f"{where}.{key}: not a parameter of the space")
            p = names[key]
            if p.type == "int" and p.choices is None and isinstance(value, float) and value != int(value):
                raise ConfigError(f"{where}.{key}: {value!r} is not a whole number, and {key} is an int "
                                  f"parameter; give e.g. {int(value)}")
            if not _in_space(p, value):
                raise ConfigError(f"{where}.{key}: {value!r} is outside the space's range for it")
        point = {}
        for p in space:
            if p.when:
                ((parent, values),) = p.when.items()
                if point.get(parent) not in values:
                    if p.name in overrides:  # Optuna would never suggest it: the value would be lost
                        raise ConfigError(f"{where}.{p.name}: switched off by its when ({parent} is "
                                          f"{point.get(parent)!r}); drop it or set {parent} to one of {values}")
                    continue
            point[p.name] = overrides.get(p.name, flat[p.name])
        try:
            apply(base, point)
        except ConfigError as e:  # values fine alone, impossible together (or with the base)
            raise ConfigError(f"{where}: {e}") from None
        if point in out:
            raise ConfigError(f"{where}: the same point as start_points[{out.index(point)}]; list each once")
        out.append(point)
    return out


def _in_space(p: Param, value) -> bool:
    if p.choices is not None:
        return value in p.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return p.low <= value <= p.high and (p.type != "int" or value == int(value))


def load(path: str, preset: str | None = None, overrides: list[str] | None = None) -> Settings:
    return parse(C.load_yaml(path), preset, overrides)
