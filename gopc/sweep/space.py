"""The search space: YAML entries -> an Optuna define-by-run function, checked before any trial starts.

    space:
      stab.out_act:    {choices: [none, sigmoid, layernorm]}
      stab.inner_lr_h: {low: 0.01, high: 1.0, log: true}
      stab.n_steps_h:  {low: 1, high: 3, type: int}
      stab.h_grad_limit: {low: 0.1, high: 10, log: true, when: {stab.h_grad: [clip_norm, clip_value]}}

Keys are run-config fields (`section.key`). `when` makes a parameter conditional, the way Optuna expresses it: it is
only suggested when the named earlier parameter took one of the listed values."""
from __future__ import annotations

import dataclasses
from typing import get_type_hints

from gopc import config as C
from gopc.errors import ConfigError

_KEYS = {"choices", "low", "high", "log", "type", "step", "when"}


@dataclasses.dataclass
class Param:
    name: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    type: str = "float"
    step: float | None = None
    when: dict | None = None  # {parent param: [values that switch this one on]}


def _fields() -> dict[str, dataclasses.Field]:
    return {f"{s}.{f.name}": f for s, cls in C.SECTIONS.items() for f in dataclasses.fields(cls)}


def parse_space(raw, base: dict) -> list[Param]:
    """Validate every entry against the run config; each error names the entry and the fix."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("space: empty or not a mapping; give at least one parameter, e.g. stab.out_act: {choices: [none, sigmoid]}")
    known, params = _fields(), []
    for name, spec in raw.items():
        where = f"space.{name}"
        if name not in known:
            raise ConfigError(f"{where}: unknown parameter; use a run-config field such as stab.out_act or train.lr")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping like {{choices: [...]}} or {{low: .., high: ..}}")
        if unknown := set(spec) - _KEYS:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: {sorted(_KEYS)}")
        p = Param(name, **spec)
        if p.choices is not None:
            if not isinstance(p.choices, list) or not p.choices:
                raise ConfigError(f"{where}.choices: empty; give at least one value")
            for value in p.choices:
                _check_value(where, name, value, base)
        else:
            if p.low is None or p.high is None:
                raise ConfigError(f"{where}: needs either choices or both low and high")
            p.low, p.high = C.coerce(f"{where}.low", float, p.low), C.coerce(f"{where}.high", float, p.high)
            if p.type not in ("float", "int"):
                raise ConfigError(f"{where}.type: {p.type!r} is not float or int")
            if p.low >= p.high:
                raise ConfigError(f"{where}: low {p.low} is not below high {p.high}; swap them")
            if p.log and p.low <= 0:
                raise ConfigError(f"{where}: a log range needs low > 0 (got {p.low})")
            if p.type == "int" and (p.low != int(p.low) or p.high != int(p.high)):
                raise ConfigError(f"{where}: an int range needs whole-number low and high")
            if p.step is not None:  # Optuna would refuse these only once the sweep has started
                p.step = C.coerce(f"{where}.step", float, p.step)
                if p.step <= 0 or (p.type == "int" and p.step != int(p.step)):
                    raise ConfigError(f"{where}.step: {p.step:g} must be a positive{' whole' if p.type == 'int' else ''} number")
                if p.log:
                    raise ConfigError(f"{where}.step: a log range takes no step; drop step or log")
            field_type = get_type_hints(C.SECTIONS[name.split(".")[0]])[name.split(".")[1]]
            if field_type not in (float, int) or (field_type is int and p.type != "int"):
                raise ConfigError(f"{where}: {name} is {getattr(field_type, '__name__', field_type)}; "
                                  f"use choices{', or type: int' if field_type is int else ''}")
            for value in (p.low, p.high):
                _check_value(where, name, int(value) if p.type == "int" else value, base)
        if p.when is not None:
            _check_when(where, p, params)
        params.append(p)
    return params


def _check_value(where, name, value, base):
    try:
        apply(base, {name: value})
    except ConfigError as e:
        raise ConfigError(f"{where}: value {value!r} is refused by the run config ({e})") from None


def _check_when(where, p: Param, earlier: list[Param]):
    if not isinstance(p.when, dict) or len(p.when) != 1:
        raise ConfigError(f"{where}.when: expected one entry {{parent: [values]}}")
    ((parent, values),) = p.when.items()
    match = next((q for q in earlier if q.name == parent), None)
    if match is None or match.choices is None:
        raise ConfigError(f"{where}.when: {parent} is not a categorical parameter listed before it in this space")
    values = values if isinstance(values, list) else [values]
    if missing := [v for v in values if v not in match.choices]:
        raise ConfigError(f"{where}.when: {missing[0]!r} is not among {parent}'s choices {match.choices}")
    p.when = {parent: values}


class SearchSpace:
    """Optuna define-by-run function. A picklable instance, because Tune pickles the searcher."""

    def __init__(self, params: list[Param]):
        self.params = params

    def __call__(self, trial) -> None:
        for p in self.params:
            if p.when:
                ((parent, values),) = p.when.items()
                if trial.params.get(parent) not in values:
                    continue
            if p.choices is not None:
                trial.suggest_categorical(p.name, p.choices)
            elif p.type == "int":
                trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            else:
                trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)


def trial_config(bases: dict[str, dict], config: dict) -> C.Config:
    """A Tune trial's run config: its arm's base (a sweep has one arm, named "") with the trial's values."""
    return apply(bases[config.get("arm", "")], {k: v for k, v in config.items() if k != "arm"})


def apply(base: dict, sampled: dict) -> C.Config:
    """The trial's full run config: the sweep's base with the sampled `section.key` values on top."""
    raw = {s: dict(v or {}) for s, v in base.items()}
    for name, value in sampled.items():
        section, key = name.split(".")
        raw.setdefault(section, {})[key] = value
    return C.from_dict(raw)
