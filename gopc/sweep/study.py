"""A study: the final training, done right. Each arm (GOPC-2 from a sweep's best configs, the GOPC-1 and VAE-1
baselines) trains over the same seeds, on the same data and budget, as one Tune trial per arm x seed with the divergence
guard, on the sweep's Ray and MLflow machinery (gopc/sweep/run.py). Trials validate on the validation split and are
judged once on the test split, which no sweep has seen; gopc/sweep/verdict.py turns them into the verdict.

    arms:
      - {name: gopc2, sweep: gopc2_stability}        # the sweep's best config, read back from MLflow
      - {name: gopc2-file, config: best/best-1.yaml}  # or a YAML file `gopc best` wrote
      - {name: gopc1, set: {model.kind: gopc1}}       # or the study's base with overrides
    allow: [train.steps]                              # data or budget fields the arms may differ in
                                                      # (everything else, e.g. train.lr, may differ anyway)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from gopc import config as C
from gopc.errors import ConfigError, GopcError
from gopc.sweep import run as R
from gopc.sweep import settings as S

# The data and the budget: what every arm must share for the comparison to be fair.
FAIR = tuple(f"data.{k}" for k in C.DataConfig.__dataclass_fields__) + ("train.steps", "train.batch_size")
ARM_KEYS = {"name", "sweep", "top", "config", "set"}


@dataclass
class StudySettings(S.Common):
    name: str = "gopc2_study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    arms: list = field(default_factory=list)  # as written; resolved into `arm_configs`
    allow: list[str] = field(default_factory=list)  # FAIR fields the arms may differ in
    primary: str = ""  # the verdict's primary metric; "" = the sweep objective (metric)
    equivalence: float = 0.05  # a margin: a fraction of the better trivial prediction's error (README: why 0.05)
    arm_configs: dict = field(default_factory=dict)  # arm name -> run config (dict), resolved at load

    @property
    def bases(self) -> dict[str, dict]:
        return self.arm_configs


def _is_field(key: str) -> bool:  # key: section.name
    section, _, name = key.partition(".")
    part = getattr(C.Config(), section, None)
    return dataclasses.is_dataclass(part) and name in {f.name for f in dataclasses.fields(part)}


def load(path: str, preset: str | None = None, overrides: list[str] | None = None) -> StudySettings:
    raw = S.resolve(C.load_yaml(path), preset, overrides, StudySettings, "study")
    s = S.parse_common(raw, StudySettings, "study", ("seeds", "arms", "allow", "arm_configs"))
    s.seeds = C.coerce("study.seeds", list[int], raw.get("seeds", s.seeds))
    if not s.seeds or len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
        raise ConfigError(f"study.seeds: {s.seeds} must be distinct non-negative integers, e.g. [0, 1, 2, 3, 4]")
    s.allow = C.coerce("study.allow", list[str], raw.get("allow") or [])
    if bad := [f for f in s.allow if f not in FAIR]:
        why = ("needs no allow: only the data and the budget must match across arms" if _is_field(bad[0])
               else "is not a config field")
        raise ConfigError(f"study.allow: {bad[0]!r} {why}; list only some of {', '.join(FAIR)}, or leave allow empty")
    from gopc.sweep.verdict import METRICS
    s.primary = s.primary or s.metric
    if s.primary not in METRICS:
        raise ConfigError(f"study.primary: {s.primary!r} is not a verdict metric; give one of {METRICS}, e.g. prior/mse")
    if not 0 < s.equivalence < 1:
        raise ConfigError(f"study.equivalence: {s.equivalence!r} must be a fraction between 0 and 1 of the trivial "
                          "prediction's error, e.g. 0.05")
    s.arms = raw.get("arms") or []
    s.arm_configs = resolve_arms(s)
    return s


def resolve_arms(s: StudySettings) -> dict[str, dict]:
    """Each arm's full run config, checked, then checked for fairness against the study's base."""
    if not isinstance(s.arms, list) or not s.arms:
        raise ConfigError("study.arms: give a list of arms, e.g. - {name: gopc1, set: {model.kind: gopc1}}")
    for i, arm in enumerate(s.arms):  # every arm's shape and name before any arm reads a sweep or a file
        where = f"arms[{i}]"
        if not isinstance(arm, dict) or "name" not in arm:
            raise ConfigError(f"{where}: expected a mapping with a name, e.g. {{name: vae1, set: {{model.kind: vae1}}}}")
        S.check_name(arm["name"], f"{where}.name")  # it names MLflow runs and parameter keys
        if unknown := set(arm) - ARM_KEYS:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; an arm takes {sorted(ARM_KEYS)}")
        if "sweep" in arm and "config" in arm:
            raise ConfigError(f"{where}: give either sweep or config, not both")
    configs = {}
    for i, arm in enumerate(s.arms):
        where = f"arms[{i}]"
        for name, cfg in _arm_sources(s, arm, where):
            if name in configs:
                raise ConfigError(f"{where}.name: {name!r} names two arms; give each a name of its own")
            overrides = arm.get("set") or {}
            if not isinstance(overrides, dict):
                raise ConfigError(f"{where}.set: expected a mapping of section.key: value")
            for key, value in overrides.items():
                section, _, k = str(key).partition(".")
                if not k:
                    raise ConfigError(f"{where}.set.{key}: expected section.key, e.g. model.kind")
                cfg.setdefault(section, {})[k] = value
            try:
                configs[name] = C.from_dict(cfg).to_dict()
            except ConfigError as e:
                raise ConfigError(f"{where} ({name}): {e}") from None
    check_fair(s, configs)
    return configs


def _arm_sources(s: StudySettings, arm: dict, where: str) -> list[tuple[str, dict]]:
    """(name, run config as a dict) for each config the arm stands for: top-K of a sweep, a file, or the base."""
    if "sweep" in arm:
        top = arm.get("top", 1)
        if not isinstance(top, int) or top < 1:
            raise ConfigError(f"{where}.top: {top!r} must be a whole number of at least 1")
        from gopc.sweep.export import NothingToExport, best_configs
        try:
            found = best_configs(arm["sweep"], top, s.tracking_uri)
        except NothingToExport as e:  # gopc best's fix (resume, search again) is not all a study can do
            raise ConfigError(f"{where}.sweep: sweep {arm['sweep']!r} has no trial that trained to the end "
                              f"({e.tally}); resume the sweep if it is unfinished, run one whose trials survive, "
                              "or give this arm set: or config: instead of sweep:") from None
        except GopcError as e:  # a study has no --sweep option: its arm's sweep key is the field
            raise ConfigError(f"{where}.sweep: {str(e).removeprefix('--sweep: ')}") from None
        if len(found) < top:
            raise ConfigError(f"{where}.top: {top} configs asked, but sweep {arm['sweep']!r} has only {len(found)} "
                              f"trial(s) that trained to the end; set top to at most {len(found)}")
        return [(arm["name"] if top == 1 else f"{arm['name']}-{i}", cfg.to_dict()) for i, (_, cfg, _) in enumerate(found, 1)]
    if "config" in arm:
        return [(arm["name"], C.load_yaml(os.path.expanduser(arm["config"]), f"{where}.config"))]
    return [(arm["name"], yaml.safe_load(yaml.safe_dump(s.base)) or {})]  # a deep copy


def check_fair(s: StudySettings, configs: dict[str, dict]) -> None:
    """Every arm trains on the base's data and budget, unless the study allows a field to differ."""
    reference = C.from_dict(s.base).flat()
    for name, cfg in configs.items():
        flat = C.from_dict(cfg).flat()
        for key in FAIR:
            if key not in s.allow and flat[key] != reference[key]:
                raise ConfigError(f"arms ({name}): {key} is {flat[key]!r} but the study's base has {reference[key]!r}; "
                                  f"train every arm on the same data and budget, or list {key} under allow")


def tune_setup(s: StudySettings):
    """Every arm x seed once: Tune's grid search, no searcher, no early stopping (a verdict needs whole runs)."""
    from ray import tune
    config = tune.TuneConfig(num_samples=1, max_concurrent_trials=s.max_concurrent, reuse_actors=True)  # as a sweep
    space = {"arm": tune.grid_search(list(s.arm_configs)), "train.seed": tune.grid_search(s.seeds)}
    return config, space, {"arm": "arm", "train.seed": "seed"}


def parent_params(s: StudySettings) -> dict:
    params = {"study.seeds": s.seeds, "study.allow": s.allow, "study.arms": list(s.arm_configs)}
    defaults = C.from_dict({}).flat()
    for name, cfg in s.arm_configs.items():  # each arm by what differs from the defaults
        params[f"arm.{name}"] = ", ".join(f"{k}={v}" for k, v in C.from_dict(cfg).flat().items() if v != defaults[k])
    return params


def finish(s: StudySettings, results, parent: str) -> list[str]:
    from gopc.sweep.verdict import write_verdict
    return write_verdict(s, results, parent)


STUDY = R.Kind("gopc2_study", "Final training: every arm over every seed on Ray, then the verdict on the test split",
               load, tune_setup, finish, parent_params, lambda s: len(s.arm_configs) * len(s.seeds),
               lambda s: (["model.kind", "train.seed"], "model.kind"), test=True, noun="study")


def main(argv=None, default_config: str = "sweeps/gopc2_study.yaml") -> int:
    return R.main(argv, default_config, STUDY)
