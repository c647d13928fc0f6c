"""Bad input, one table: every way a user can get the input wrong that we know of, and what they get back.

Project rule: bad input (run config, search space, sweep settings, data path, cluster file, command line)
gets ONE line that names the field and the fix, a non-zero exit (2), and nothing half-written.

Each row of ROWS is (id, what the user did, how the test triggers it, fragments the message must hold;
the first fragment is the field). One parametrized test runs every row and checks:
  * CLI rows (`gopc ...` through gopc.cli.main, the sweep entry through gopc.sweep.run.main), run in a
    fresh temp working dir: exit code 2, exactly one line on stderr (`PROG: error: ...`), nothing on
    stdout, the folder's recursive listing unchanged, every file's size and modification time included
    (no run folder, no mlflow.db, no sweep_results, nothing overwritten), and no MLflow run that appeared,
    vanished or changed (its row, tags, params, metrics) in any SQLite database of the folder;
  * function rows: the expected exception type, its message on one line.
docs/bad_input.md shows the same table with the messages these rows produce.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import gzip
import io
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from conftest import mlflow_rows
from dbfaults import cut, damage, read_only, real_db
from gopc.errors import ConfigError, GopcError

ROOT = Path(__file__).resolve().parent.parent
SWEEP_YAML = str(ROOT / "sweeps" / "gopc2_stability.yaml")
GPU_YAML = ROOT / "cluster" / "gpu.yaml"

# A run that would finish in seconds if a row were wrongly accepted (TINY of test_train.py, 5 steps).
TINY = {
    "data": {"frame_size": 32, "seq_len": 6, "n_train": 64, "n_val": 8, "n_test": 8,
             "speed_min": 1.0, "speed_max": 2.0},
    "model": {"kind": "gopc1", "r_dim": 16, "lstm_dim": 32, "ngf": 8},
    "train": {"steps": 5, "batch_size": 8, "log_every": 1, "ckpt_every": 5, "eval_size": 8},
}


# ------------------------------------------------------------------ inputs the rows write

def _idx(arr, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, np.uint8)
    magic = 0x800 | arr.ndim if magic is None else magic
    return (magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            + arr.tobytes())


def mnist(damage: str | None = None, per_class: int = 3) -> dict[str, bytes]:
    """A tiny folder `mnist/` of the four MNIST IDX files (10 * per_class digits per part), optionally
    with its train images file damaged: truncate | magic | gzip (a cut-off .gz) | count (fewer images
    than labels) | empty (no images at all), or its train labels file: label (a label 12 at index 3)."""
    labels = np.tile(np.arange(10), per_class)
    files = {}
    for part in ("train", "t10k"):
        files[f"mnist/{part}-images-idx3-ubyte"] = _idx(np.zeros((len(labels), 28, 28)))
        files[f"mnist/{part}-labels-idx1-ubyte"] = _idx(labels)
    name = "mnist/train-images-idx3-ubyte"
    if damage == "truncate":
        files[name] = files[name][:100]
    elif damage == "magic":
        files[name] = (0x1234).to_bytes(4, "big") + files[name][4:]
    elif damage == "gzip":
        files[name + ".gz"] = gzip.compress(files.pop(name))[:60]
    elif damage == "gzip-inside":  # whole length, one byte of the deflate stream flipped
        packed = bytearray(gzip.compress(files.pop(name), mtime=0))
        packed[len(packed) // 2] ^= 0xFF
        files[name + ".gz"] = bytes(packed)
    elif damage == "count":
        files[name] = _idx(np.zeros((len(labels) - 1, 28, 28)))
    elif damage == "empty":
        files[name] = _idx(np.zeros((0, 28, 28)))
    elif damage == "label":
        wrong = labels.copy()
        wrong[3] = 12
        files["mnist/train-labels-idx1-ubyte"] = _idx(wrong)
    return files


def run_yaml(**sections) -> dict[str, str]:
    """run.yaml: TINY with these sections merged in."""
    raw = {s: dict(v) for s, v in TINY.items()}
    for s, v in sections.items():
        raw[s] = {**raw.get(s, {}), **v} if isinstance(v, dict) else v
    return {"run.yaml": yaml.safe_dump(raw)}


def sweep_yaml(space, **settings) -> dict[str, str]:
    """bad_input.yaml: a small sweep over a GOPC-2 base with this search space."""
    raw = {"name": "bad_input", "num_samples": 2, "resources": {"cpu": 1, "gpu": 0},
           "base": {"model": {"kind": "gopc2"}, "train": {"steps": 4}}, "space": space, **settings}
    return {"bad_input.yaml": yaml.safe_dump(raw)}


ARMS = [{"name": "gopc1", "set": {"model.kind": "gopc1"}}, {"name": "vae1", "set": {"model.kind": "vae1"}}]


def study_yaml(arms=ARMS, **settings) -> dict[str, str]:
    """study.yaml: a study of these arms over the TINY base."""
    return {"study.yaml": yaml.safe_dump({"base": TINY, "arms": arms, **settings})}


def empty_dir(name: str) -> dict[str, None]:
    return {f"{name}/": None}


def mlflow_db_without_the_sweep(tmp: Path) -> None:
    import mlflow
    mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db").create_experiment("some_other_sweep")


_TRAINED: dict[str, str] = {}


def _trained_once(key: str, train_sets: dict | None = None) -> str:
    """The folder of a TINY run (with `train_sets` merged into its train section), trained once per session."""
    if key not in _TRAINED:
        from gopc import config as C
        from gopc.train import train as train_run
        cache = tempfile.mkdtemp(prefix="gopc-bad-input-")
        atexit.register(shutil.rmtree, cache, True)
        train_run(C.from_dict({**TINY, "train": {**TINY["train"], **(train_sets or {})}}), os.path.join(cache, "r"),
                  progress=False)
        _TRAINED[key] = os.path.join(cache, "r")
    return _TRAINED[key]


def trained_run(name: str = "r", drop: tuple[str, ...] = (), config: dict | None = None):
    """Setup: a copy of a real finished TINY run (5 steps, trained once per session, no MLflow) at
    `name`/, without the files in `drop`, with `config` merged into its config.yaml."""
    def setup(tmp: Path) -> None:
        shutil.copytree(_trained_once("run"), tmp / name, ignore=shutil.ignore_patterns(".lock"))
        for f in drop:
            shutil.rmtree(tmp / name / f) if (tmp / name / f).is_dir() else (tmp / name / f).unlink()
        if config:
            raw = yaml.safe_load((tmp / name / "config.yaml").read_text())
            for section, values in config.items():
                raw[section].update(values)
            (tmp / name / "config.yaml").write_text(yaml.safe_dump(raw))
    return setup


def diverged_before_its_first_checkpoint(tmp: Path) -> None:
    """r/: a TINY run whose loss went NaN at step 2 (train.inject), before its first checkpoint (step 5)."""
    shutil.copytree(_trained_once("diverged", {"inject": "loss@2:nan"}), tmp / "r",
                    ignore=shutil.ignore_patterns(".lock"))


def sweep_whose_trials_all_diverged(tmp: Path) -> None:
    """./mlflow.db and ./optuna.db hold sweep 'gone_wrong' (its parent run, its study) whose 4 trials all diverged."""
    import mlflow
    import optuna
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    client.create_run(client.create_experiment("gone_wrong"), run_name="gone_wrong",
                      tags={"sweep": "gone_wrong", "role": "parent"})
    study = optuna.create_study(study_name="gone_wrong", storage=f"sqlite:///{tmp}/optuna.db")
    for _ in range(4):
        trial = study.ask()
        trial.set_user_attr("status", "diverged")
        study.tell(trial, 1e6)


def foreign_checkpoint(tmp: Path) -> None:
    """r/: a TINY config.yaml beside a checkpoint.pt that torch reads but gopc never wrote."""
    import torch
    (tmp / "r").mkdir()
    (tmp / "r" / "config.yaml").write_text(yaml.safe_dump(TINY))
    torch.save({"weights": torch.zeros(3)}, tmp / "r" / "checkpoint.pt")


def truncated_checkpoint(tmp: Path) -> None:
    trained_run(drop=("eval",))(tmp)
    path = tmp / "r" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])


def held_by_another_run(folder: str, *then: Callable[[Path], None]):
    """Setup: `folder` is in use: its lock is held, as a running `gopc train` holds it (released after the row)."""
    def setup(tmp: Path):
        for step in then:
            step(tmp)
        (tmp / folder).mkdir(exist_ok=True)
        fd = os.open(tmp / folder / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242")
        return lambda: os.close(fd)
    return setup


def driver_running(load: Callable[[], object]):
    """Setup: the experiment that `load()` (its settings) names is held, as its running driver holds it."""
    def setup(tmp: Path):
        from gopc import locks
        fd = os.open(locks.outside(load().experiment_path), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242")
        return lambda: os.close(fd)
    return setup


def a_sweep():
    from gopc.sweep.settings import load
    return load(SWEEP_YAML)


def a_study():
    from gopc.sweep.study import load
    return load("study.yaml")


def recorded_tracking_uri_gone(tmp: Path) -> None:
    """r/ was trained with MLflow in a folder whose mlflow.db has since gone."""
    trained_run(drop=("eval",))(tmp)
    (tmp / "r" / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")
    (tmp / "r" / "mlflow_tracking_uri").write_text(f"sqlite:///{tmp}/gone/mlflow.db")


def no_cuda(tmp: Path):
    """Setup: torch sees no CUDA (as on a CPU-only machine), for this row only."""
    import torch
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    return lambda: setattr(torch.cuda, "is_available", real)


def sqlite_without_mlflow(tmp: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp / "mlflow.db")) as db:
        db.execute("create table notes (text)")
        db.commit()


def _fault(path: Path, fault: str | None):
    """`fault` done to the database at `path` (tests/dbfaults.py); returns its undo, if it has one."""
    if fault == "read-only":
        return read_only(path)
    if fault == "cut":
        cut(path)
    elif fault == "damaged":
        damage(path)
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "missing":
        path.unlink()
    return None


def tracking_db(fault: str):
    """Setup: ./mlflow.db, a real MLflow database, with `fault`."""
    return lambda tmp: _fault(real_db("mlflow", tmp / "mlflow.db"), fault)


def study_db(fault: str, resumable: bool = False):
    """Setup: ./mlflow.db and ./optuna.db of sweep gopc2_stability (its KILLED parent run, its study), with
    `fault` done to optuna.db; `resumable`: Tune's tuner.pkl too, as an interrupted sweep leaves it
    (all that Tuner.can_restore reads: the rows are refused before anything reads more)."""
    def setup(tmp: Path):
        if resumable:
            (tmp / "sweep_results" / "gopc2_stability").mkdir(parents=True)
            (tmp / "sweep_results" / "gopc2_stability" / "tuner.pkl").write_bytes(b"")
        real_db("mlflow", tmp / "mlflow.db")
        return _fault(real_db("optuna", tmp / "optuna.db"), fault)
    return setup


# Tracking servers for the hang rows, held for the module: a port where nothing listens (refused at
# once), and one that accepts connections but never answers (only MLflow's bounded timeout ends it).
_CLOSED = socket.socket()
_CLOSED.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
_SILENT = socket.socket()
_SILENT.bind(("127.0.0.1", 0))
_SILENT.listen(16)  # the kernel completes the handshake; nobody ever reads or answers
CLOSED_URI = f"http://127.0.0.1:{_CLOSED.getsockname()[1]}"
SILENT_URI = f"http://127.0.0.1:{_SILENT.getsockname()[1]}"


# ------------------------------------------------------------------ how a row is triggered

@dataclass
class Outcome:
    message: str  # the one line the user reads (CLI: stderr, PROG: error: included)
    lines: int  # how many lines the user got
    code: int | None = None  # CLI exit code
    exc: type | None = None  # function rows: the exception raised
    changed: set = field(default_factory=set)  # CLI rows: paths that appeared, vanished or were rewritten
    runs_changed: set = field(default_factory=set)  # CLI rows: MLflow run rows that appeared, vanished or changed


def _write(tmp: Path, files: dict) -> None:
    for name, content in files.items():
        path = tmp / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def listing(tmp: Path) -> set[str]:
    """Every path, and for files their size and modification time: a file rewritten in place counts too."""
    return {str(p.relative_to(tmp)) + ("/" if p.is_dir() else f" {p.stat().st_size} {p.stat().st_mtime_ns}")
            for p in tmp.rglob("*")}


def mlflow_runs(tmp: Path) -> set[tuple]:
    """What the MLflow SQLite databases of the folder say of their runs: each row of their runs, tags,
    params and metrics tables, with its database and table (read-only: reading writes nothing). A run
    that appears or vanishes changes it, and so does one rewritten in place (its status, its end time)."""
    rows = set()
    for path in tmp.rglob("*.db"):
        for table in ("runs", "tags", "params", "metrics"):
            try:
                found = mlflow_rows(path, f"select * from {table}", timeout=5) or []
            except sqlite3.DatabaseError:  # held by a row's writer, or damaged past its table list
                found = []
            rows |= {(str(path.relative_to(tmp)), table, *row) for row in found}
    return rows


@dataclass
class Cli:
    """`PROG ARGV` in the temp working dir, after writing `files` (and running `setup`)."""
    prog: str  # "gopc" (gopc.cli.main), "gopc2_stability" (gopc.sweep.run.main, sweeps/gopc2_stability.py)
    # or "gopc2_study" (gopc.sweep.study.main, sweeps/gopc2_study.py)
    argv: tuple
    files: dict = field(default_factory=dict)
    setup: Callable[[Path], Callable[[], None] | None] | None = None  # may return its own cleanup

    def __str__(self):
        prog = "gopc" if self.prog == "gopc" else f"python sweeps/{self.prog}.py"
        argv = " ".join(self.argv).replace(f"{ROOT}{os.sep}", "")
        written = sorted({n.split("/")[0] + "/" if "/" in n else n for n in self.files})
        return f"`{prog} {argv}`" + (f" [with {', '.join(written)}]" if written else "")

    def fire(self, tmp: Path) -> Outcome:
        _write(tmp, self.files)
        cleanup = self.setup(tmp) if self.setup else None
        if self.prog == "gopc":
            from gopc.cli import main
        elif self.prog == "gopc2_study":
            from gopc.sweep.study import main
        else:
            from gopc.sweep.search import main
        before, runs_before = listing(tmp), mlflow_runs(tmp)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(self.argv))
                except SystemExit as e:  # argparse's way out: usage + message, not the one line
                    code = e.code
        finally:
            if cleanup:
                cleanup()
        lines = err.getvalue().strip().splitlines() + out.getvalue().strip().splitlines()
        return Outcome(message=lines[0] if lines else "", lines=len(lines), code=code,
                       changed=listing(tmp) ^ before, runs_changed=mlflow_runs(tmp) ^ runs_before)


@dataclass
class Call:
    """A function of the project called directly (no CLI reaches it without a cluster)."""
    what: str
    fn: Callable[[Path], object]
    files: dict = field(default_factory=dict)
    ray: bool = False  # needs the module's local Ray (started once, for these rows only)

    def __str__(self):
        return self.what

    def fire(self, tmp: Path) -> Outcome:
        _write(tmp, self.files)
        try:
            self.fn(tmp)
        except Exception as e:  # noqa: BLE001 - the row says which type it expects
            text = str(e).strip()
            return Outcome(message=text.splitlines()[0] if text else "", lines=len(text.splitlines()),
                           exc=type(e))
        return Outcome(message="", lines=0)


def gopc(*argv, files=None, setup=None) -> Cli:
    return Cli("gopc", argv, files or {}, setup)


def train(*sets, files=None) -> Cli:
    """`gopc train --config run.yaml --quiet --set S ...` (run.yaml: TINY unless `files` says otherwise)."""
    argv = ("train", "--config", "run.yaml", "--quiet") + sum((("--set", s) for s in sets), ())
    return gopc(*argv, files={**run_yaml(), **(files or {})})


def sweep(*argv, files=None, setup=None) -> Cli:
    return Cli("gopc2_stability", argv, files or {}, setup)


def study(*argv, files=None, setup=None) -> Cli:
    """`python sweeps/gopc2_study.py --config study.yaml ARGV` (study.yaml: study_yaml() unless `files` has one)."""
    return Cli("gopc2_study", ("--config", "study.yaml") + argv, {**study_yaml(), **(files or {})}, setup)


def space(spec, **settings) -> Cli:
    return sweep("--config", "bad_input.yaml", files=sweep_yaml(spec, **settings))


def settings_with(*sets, preset="smoke") -> Cli:
    argv = ("--config", SWEEP_YAML) + (("--preset", preset) if preset else ())
    return sweep(*argv, *sum((("--set", s) for s in sets), ()))


# ------------------------------------------------------------------ function rows

def _check_resources(*sets):
    def fn(tmp):
        from gopc.sweep import settings as S
        from gopc.sweep.run import check_resources
        check_resources(S.load(SWEEP_YAML, "smoke", list(sets)))
    return fn


def _fractional_gpu_cluster() -> dict[str, str]:
    cfg = yaml.safe_load(GPU_YAML.read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    return {"gpu.yaml": yaml.safe_dump(cfg)}


def _train_into_a_folder_held_after_its_check(tmp: Path) -> None:
    """Two `gopc train --out r` at once: both pass the check of r/, then one holds it; train() refuses the other."""
    from gopc import config as C
    from gopc.train import train as train_run
    release = held_by_another_run("r")(tmp)
    try:
        train_run(C.from_dict(TINY), "r", progress=False, field="--out")
    finally:
        release()


# stab.h_grad_limit only counts when stab.h_grad clips (a `when`)
GATED_SPACE = {"stab.h_grad": {"choices": ["none", "clip_norm"]},
               "stab.h_grad_limit": {"low": 0.1, "high": 10.0, "when": {"stab.h_grad": ["clip_norm"]}}}


@dataclass
class Row:
    id: str
    did: str  # what the user did
    how: Cli | Call  # how the test triggers it
    expect: tuple[str, ...]  # fragments of the message; the first is the field it names
    exc: type | Callable[[], type] = ConfigError  # function rows only


# ------------------------------------------------------------------ THE table

ROWS = [
    # ---- run config (YAML file and --set), through `gopc train`
    Row("config-yaml-syntax", "run YAML with a key indented one space too far on line 4",
        gopc("train", "--config", "run.yaml", files={"run.yaml": "model:\n  kind: gopc1\n  ngf: 8\n   r_dim: 16\n"}),
        ("--config", "not valid YAML at line 4")),
    Row("config-file-missing", "--config names a file that does not exist",
        gopc("train", "--config", "nosuch.yaml"), ("--config", "'nosuch.yaml' not found")),
    Row("config-unknown-key", "misspelt key model.colour in the run YAML",
        gopc("train", "--config", "run.yaml", files=run_yaml(model={"colour": "red"})),
        ("model.colour", "unknown key", "known keys are")),
    Row("config-unknown-section", "section `optimiser:` that the run config does not have",
        gopc("train", "--config", "run.yaml", files=run_yaml(optimiser={"lr": 0.1})),
        ("optimiser", "unknown section", "known sections are")),
    Row("config-section-not-mapping", "`train: 5` (a section given a value instead of keys)",
        gopc("train", "--config", "run.yaml", files={"run.yaml": "train: 5\n"}),
        ("train", "expected a mapping")),
    Row("config-not-a-mapping", "run YAML that is a list, plus a --set",
        gopc("train", "--config", "run.yaml", "--set", "train.lr=0.1", files={"run.yaml": "- 1\n- 2\n"}),
        ("config", "expected a mapping with sections")),
    Row("config-wrong-type", "--set train.steps=many", train("train.steps=many"),
        ("train.steps", "expected int", "'many'")),
    Row("config-wrong-type-list", "--set data.classes=3 (a number, not a list)", train("data.classes=3"),
        ("data.classes", "expected a list")),
    Row("config-digit-size", "--set data.digit_size=30", train("data.digit_size=30"),
        ("data.digit_size", "not one of [14, 28, 32]")),
    Row("config-negative-lr", "--set train.lr=-1", train("train.lr=-1"),
        ("train.lr", "below the minimum")),
    Row("config-nan-lr", "--set train.lr=.nan (YAML's NaN)", train("train.lr=.nan"),
        ("train.lr", "not a finite number")),
    Row("config-inf-speed", "--set data.speed_max=.inf", train("data.speed_max=.inf"),
        ("data.speed_max", "not a finite number")),
    Row("config-frame-size", "--set data.frame_size=48", train("data.frame_size=48"),
        ("data.frame_size", "must be 32, 64, 128 or 256")),
    Row("config-digit-fills-frame", "--set data.digit_size=32 (run.yaml has data.frame_size=32)",
        train("data.digit_size=32"), ("data.digit_size", "does not fit in data.frame_size")),
    Row("config-speed-inverted", "--set data.speed_min=5 (above data.speed_max=2)", train("data.speed_min=5"),
        ("data.speed_min", "swap them")),
    Row("config-classes-repeated", "--set data.classes=[3,3]", train("data.classes=[3,3]"),
        ("data.classes", "distinct digits 0-9")),
    Row("config-mixture-act-full", "stab.mixture_act=softmax with model.kind=gopc2, model.hyper_form=full",
        train("model.kind=gopc2", "stab.mixture_act=softmax"), ("stab.mixture_act", "model.hyper_form=mixture")),
    Row("config-out-act-gopc1", "stab.out_act=sigmoid with model.kind=gopc1", train("stab.out_act=sigmoid"),
        ("stab.out_act", "model.kind=gopc2")),
    Row("config-set-no-equals", "--set train.lr (no =value)", train("train.lr"),
        ("--set", "section.key=value")),
    Row("config-set-no-section", "--set lr=0.1 (no section)", train("lr=0.1"),
        ("--set", "section.key=value")),
    Row("config-bad-inject", "--set train.inject=loss@soon", train("train.inject=loss@soon"),
        ("train.inject", "SITE@STEP")),
    Row("config-bad-device", "--set train.device=gpu", train("train.device=gpu"),
        ("train.device", "cuda:N")),
    Row("config-model-name", "--set mlflow.register_as=team/gopc2 (a name MLflow refuses)",
        train("mlflow.register_as=team/gopc2"), ("mlflow.register_as", "no '/', ':'")),

    # ---- search space (the sweep's `space:`), through the sweep entry
    Row("space-empty", "`space: {}`", space({}), ("space", "at least one parameter")),
    Row("space-empty-choices", "stab.out_act: {choices: []}", space({"stab.out_act": {"choices": []}}),
        ("space.stab.out_act.choices", "at least one value")),
    Row("space-inverted-range", "train.lr: {low: 0.01, high: 0.001}",
        space({"train.lr": {"low": 0.01, "high": 0.001}}), ("space.train.lr", "swap them")),
    Row("space-log-nonpositive", "train.lr: {low: 0, high: 0.01, log: true}",
        space({"train.lr": {"low": 0, "high": 0.01, "log": True}}), ("space.train.lr", "low > 0")),
    Row("space-unknown-param", "stab.nonsense: {choices: [1]}", space({"stab.nonsense": {"choices": [1]}}),
        ("space.stab.nonsense", "unknown parameter")),
    Row("space-unknown-spec-key", "stab.out_act: {choices: [none], typo: 1}",
        space({"stab.out_act": {"choices": ["none"], "typo": 1}}), ("space.stab.out_act", "unknown key 'typo'")),
    Row("space-range-on-text", "stab.out_act: {low: 1, high: 2} (a range over a text field)",
        space({"stab.out_act": {"low": 1, "high": 2}}), ("space.stab.out_act", "use choices")),
    Row("space-when-nowhere", "stab.h_grad_limit: {..., when: {stab.h_grad: [clip_norm]}}, stab.h_grad not searched",
        space({"stab.h_grad_limit": {"low": 0.1, "high": 1, "when": {"stab.h_grad": ["clip_norm"]}}}),
        ("space.stab.h_grad_limit.when", "not a categorical parameter listed before it")),
    Row("space-when-impossible", "when: {stab.h_grad: [sqrt]}; stab.h_grad's choices are [none, clip_norm]",
        space({"stab.h_grad": {"choices": ["none", "clip_norm"]},
               "stab.h_grad_limit": {"low": 0.1, "high": 1, "when": {"stab.h_grad": ["sqrt"]}}}),
        ("space.stab.h_grad_limit.when", "'sqrt' is not among")),
    Row("space-choice-not-allowed", "stab.out_act: {choices: [none, relu6]}",
        space({"stab.out_act": {"choices": ["none", "relu6"]}}), ("space.stab.out_act", "'relu6'", "refused")),
    Row("space-choice-conflicts-base", "stab.mixture_act: {choices: [none, softmax]} over a hyper_form=full base",
        space({"stab.mixture_act": {"choices": ["none", "softmax"]}}),
        ("space.stab.mixture_act", "'softmax'", "model.hyper_form=mixture")),
    Row("space-step-with-log", "train.lr: {low: 0.0001, high: 0.01, log: true, step: 0.0001}",
        space({"train.lr": {"low": 0.0001, "high": 0.01, "log": True, "step": 0.0001}}),
        ("space.train.lr.step", "a log range takes no step")),
    Row("space-step-not-positive", "stab.n_steps_h: {low: 1, high: 3, type: int, step: 0}",
        space({"stab.n_steps_h": {"low": 1, "high": 3, "type": "int", "step": 0}}),
        ("space.stab.n_steps_h.step", "positive whole number")),
    Row("space-range-beyond-field", "train.lr_decay: {low: 0.5, high: 2} (the field's maximum is 1)",
        space({"train.lr_decay": {"low": 0.5, "high": 2}}), ("space.train.lr_decay", "above the maximum")),

    # ---- sweep settings (sweeps/gopc2_stability.yaml, --preset, --set)
    Row("sweep-unknown-setting", "--set num_sample=3 (typo)", settings_with("num_sample=3"),
        ("sweep.num_sample", "unknown setting")),
    Row("sweep-base-mlflow-experiment", "--set base.mlflow.experiment=mine (the run config's MLflow section)",
        settings_with("base.mlflow.experiment=mine"), ("base.mlflow.experiment", "set experiment instead")),
    Row("sweep-unknown-preset", "--preset nosuch", settings_with(preset="nosuch"),
        ("--preset", "'nosuch' is not defined", "smoke")),
    Row("sweep-unknown-metric", "--set metric=prior/accuracy", settings_with("metric=prior/accuracy"),
        ("sweep.metric", "is not one of")),
    Row("sweep-bad-scheduler", "--set scheduler.type=hyperband", settings_with("scheduler.type=hyperband"),
        ("scheduler.type", "not one of")),
    Row("sweep-no-resources", "--set resources.cpu=0 (and gpu 0 in the smoke preset)",
        settings_with("resources.cpu=0"), ("resources", "resources.cpu: 1")),
    Row("sweep-bad-base", "--set base.train.lr=-1", settings_with("base.train.lr=-1"),
        ("base.train.lr", "below the minimum")),
    Row("sweep-set-into-value", "--set resources.gpu.count=1 (resources.gpu is a number)",
        settings_with("resources.gpu.count=1"), ("--set", "resources.gpu", "not a mapping")),
    Row("sweep-set-bad-yaml", "--set num_samples=[8 (unclosed bracket)", settings_with("num_samples=[8"),
        ("sweep.num_samples", "expected int")),
    Row("sweep-preset-not-mapping", "presets: {smoke: 5} in the sweep file, --preset smoke",
        sweep("--config", "bad_input.yaml", "--preset", "smoke",
              files=sweep_yaml({"stab.out_act": {"choices": ["none"]}}, presets={"smoke": 5})),
        ("presets.smoke", "expected a mapping")),
    Row("sweep-name-empty", "--set name= (no value: the sweep's name names its MLflow runs and folders)",
        settings_with("name="), ("sweep.name", "empty", "letters, digits, '-' and '_'")),

    # ---- study settings (sweeps/gopc2_study.yaml, --set), through the study entry
    Row("study-name-empty", "--set name= (no value)", study("--set", "name="),
        ("study.name", "empty", "letters, digits, '-' and '_'")),
    Row("study-arm-name-path", "an arm named ../../pwn (arm names become MLflow parameter keys and run names)",
        study(files=study_yaml([{"name": "../../pwn", "set": {"model.kind": "gopc1"}}])),
        ("arms[0].name", "may hold only letters, digits, '-' and '_'")),
    Row("study-arm-name-empty",
        "arms[1] named '', after an arm taken from a sweep (names are checked before any sweep is read)",
        study(files=study_yaml([{"name": "gopc2", "sweep": "nosuch"}, {"name": "", "set": {"model.kind": "gopc1"}}])),
        ("arms[1].name", "empty", "letters, digits, '-' and '_'")),
    Row("study-arm-sweep-all-diverged", "an arm from sweep gone_wrong, whose 4 trials all diverged",
        study(files=study_yaml([{"name": "gopc2", "sweep": "gone_wrong"}, ARMS[0]]),
              setup=sweep_whose_trials_all_diverged),
        ("arms[0].sweep", "4 trials: 4 diverged", "set: or config: instead")),

    # ---- data (data.source), through `gopc train`; the tiny IDX files are written by the row
    Row("data-missing-folder", "--set data.source=no_such_folder", train("data.source=no_such_folder"),
        ("data.source", "does not exist")),
    Row("data-no-mnist-files", "data.source is an empty folder", train("data.source=mnist", files=empty_dir("mnist")),
        ("data.source", "has no train-images-idx3-ubyte")),
    Row("data-truncated-idx", "train-images-idx3-ubyte cut off after 100 bytes",
        train("data.source=mnist", files=mnist("truncate")), ("data.source", "is truncated")),
    Row("data-wrong-magic", "train-images-idx3-ubyte with magic 0x00001234",
        train("data.source=mnist", files=mnist("magic")), ("data.source", "not an MNIST IDX file")),
    Row("data-damaged-gzip", "train-images-idx3-ubyte.gz cut off after 60 bytes",
        train("data.source=mnist", files=mnist("gzip")), ("data.source", "damaged gzip")),
    Row("data-count-mismatch", "29 images but 30 labels in the train part",
        train("data.source=mnist", files=mnist("count")), ("data.source", "29 images but", "30 labels")),
    Row("data-too-few-digits", "data.classes=[3] over a 60-digit IDX set (6 threes: no val/test digit)",
        train("data.source=mnist", "data.classes=[3]", files=mnist()), ("data.classes", "too few")),
    Row("data-no-images", "train-images-idx3-ubyte whose header counts 0 images",
        train("data.source=mnist", files=mnist("empty")), ("data.source", "holds no images")),
    Row("data-label-above-9", "train-labels-idx1-ubyte with a label 12",
        train("data.source=mnist", files=mnist("label")), ("data.source", "label 12 at index 3", "digits 0-9")),

    # ---- resources (needs Ray: one local Ray, num_cpus=2, num_gpus=0, for these rows)
    Row("resources-gpu", "resources.gpu=2 on a cluster whose largest node has no GPU",
        Call("gopc.sweep.run.check_resources(S.load(sweep, 'smoke', ['resources.gpu=2']))",
             _check_resources("resources.gpu=2"), ray=True), ("resources.gpu", "largest node has 0")),
    Row("resources-cpu", "resources.cpu=64 on a cluster whose largest node has 2 CPUs",
        Call("gopc.sweep.run.check_resources(S.load(sweep, 'smoke', ['resources.cpu=64']))",
             _check_resources("resources.cpu=64"), ray=True), ("resources.cpu", "largest node has 2")),

    # ---- cluster YAML (Ray's own validator, through gopc check-cluster)
    Row("cluster-fractional-gpu", "cluster/gpu.yaml with gpu_worker resources GPU: 0.5",
        gopc("check-cluster", "gpu.yaml", files=_fractional_gpu_cluster()),
        ("available_node_types.gpu_worker.resources.GPU", "0.5 is not of type 'integer'")),

    # ---- command line
    Row("cli-best-no-mlflow", "`gopc best` in a folder without mlflow.db", gopc("best", "--sweep", "nosuch"),
        ("--sweep", "no MLflow database")),
    Row("cli-best-unknown-sweep", "`gopc best --sweep nosuch` next to an mlflow.db that lacks it",
        gopc("best", "--sweep", "nosuch", setup=mlflow_db_without_the_sweep), ("--sweep", "no sweep named 'nosuch'")),
    Row("cli-sweep-resume-nothing", "sweep --resume in a folder that holds no sweep",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--resume"),
        ("--resume", "no sweep at", "without --resume")),
    Row("cli-train-resume-no-checkpoint", "`gopc train --resume empty/`",
        gopc("train", "--resume", "empty", files=empty_dir("empty")), ("--resume", "holds no checkpoint.pt")),
    Row("cli-eval-no-checkpoint", "`gopc eval empty/`", gopc("eval", "empty", files=empty_dir("empty")),
        ("run", "holds no checkpoint.pt")),
    Row("eval-diverged-before-checkpoint", "`gopc eval r` where r diverged at step 2, before its first checkpoint",
        gopc("eval", "r", setup=diverged_before_its_first_checkpoint),
        ("run", "diverged at step 2, before its first checkpoint")),
    Row("resume-diverged-before-checkpoint", "`gopc train --resume r` where r diverged before its first checkpoint",
        gopc("train", "--resume", "r", "--quiet", setup=diverged_before_its_first_checkpoint),
        ("--resume", "diverged at step 2, before its first checkpoint")),
    Row("cli-seeds-garbage", "`gopc train --seeds a,b`", gopc("train", "--seeds", "a,b"),
        ("--seeds", "'a,b' is not a comma-separated list of integers")),
    Row("cli-seeds-empty", "`gopc train --seeds ,`", gopc("train", "--seeds", ","),
        ("--seeds", "is not a comma-separated list of integers")),
    Row("cli-unknown-option", "`gopc train --stpes 5` (typo)", gopc("train", "--stpes", "5"),
        ("--stpes", "unrecognized arguments")),
    Row("cli-bad-choice", "`gopc eval empty/ --split train`", gopc("eval", "empty", "--split", "train"),
        ("--split", "invalid choice: 'train'")),
    Row("cli-sweep-unknown-option", "sweep entry with --presets smoke (typo)",
        sweep("--config", SWEEP_YAML, "--presets", "smoke"), ("--presets", "unrecognized arguments")),

    # ---- run folders: a run never lands on another one (data loss)
    Row("out-existing-run", "`--out r` where r/ already holds a finished run",
        gopc("train", "--config", "run.yaml", "--quiet", "--out", "r", files=run_yaml(), setup=trained_run()),
        ("--out", "already holds a run", "--resume r")),
    Row("out-in-use", "`--out r` while another run holds r/",
        gopc("train", "--config", "run.yaml", "--quiet", "--out", "r", files=run_yaml(),
             setup=held_by_another_run("r")),
        ("--out", "in use by another run (pid 4242)")),
    Row("resume-in-use", "`--resume r` while another run holds r/",
        gopc("train", "--resume", "r", "--quiet", setup=held_by_another_run("r", trained_run(drop=("eval",)))),
        ("--resume", "in use by another run (pid 4242)")),
    Row("sweep-in-use", "a second driver of a running sweep (one of its name, started again)",
        sweep("--config", SWEEP_YAML, setup=driver_running(a_sweep)),
        ("name: sweep 'gopc2_stability' is being run by another driver (pid 4242)", "kill -INT 4242")),
    Row("sweep-resume-in-use", "`--resume` while the sweep's driver still runs",
        sweep("--config", SWEEP_YAML, "--resume", setup=driver_running(a_sweep)), ("another driver (pid 4242)", "--resume")),
    Row("study-in-use", "a second driver of a running study",
        study(setup=driver_running(a_study)), ("name: study 'gopc2_study' is being run by another driver (pid 4242)",)),
    Row("seeds-repeated", "`--seeds 0,0` (one seed twice: two runs into one folder)",
        gopc("train", "--config", "run.yaml", "--seeds", "0,0", files=run_yaml()), ("--seeds", "names a seed twice")),
    Row("seeds-negative", "`--seeds 0,-1`", gopc("train", "--config", "run.yaml", "--seeds", "0,-1", files=run_yaml()),
        ("--seeds", "negative seed")),
    Row("out-under-a-file", "`--out run.yaml/r` (a folder inside a file)",
        gopc("train", "--config", "run.yaml", "--quiet", "--out", "run.yaml/r", files=run_yaml()),
        ("--out", "run.yaml is a file")),
    Row("out-dir-under-a-file", "--set train.out_dir=run.yaml/runs", train("train.out_dir=run.yaml/runs"),
        ("train.out_dir", "run.yaml is a file")),
    Row("out-held-after-the-check", "two `gopc train --out r` at once: the second finds r/ held when it takes it",
        Call("gopc.train.train(cfg, 'r', field='--out') while another run holds r/",
             _train_into_a_folder_held_after_its_check), ("--out", "in use by another run (pid 4242)"), exc=GopcError),

    # ---- tracking servers that do not answer: refused within MLflow's bounded wait (no hang)
    Row("tracking-refused", "mlflow.tracking_uri at a port where nothing listens",
        train(f"mlflow.tracking_uri={CLOSED_URI}"), ("mlflow.tracking_uri", "does not answer")),
    Row("tracking-silent", "mlflow.tracking_uri at a server that accepts but never answers",
        train(f"mlflow.tracking_uri={SILENT_URI}"), ("mlflow.tracking_uri", "does not answer")),
    Row("best-tracking-refused", "`gopc best --tracking-uri` at a port where nothing listens",
        gopc("best", "--sweep", "s", "--tracking-uri", CLOSED_URI), ("--tracking-uri", "does not answer")),
    Row("best-tracking-silent", "`gopc best --tracking-uri` at a server that never answers",
        gopc("best", "--sweep", "s", "--tracking-uri", SILENT_URI), ("--tracking-uri", "does not answer")),
    Row("tracking-garbage-db", "./mlflow.db holds garbage, `gopc train` logs there by default",
        train(files={"mlflow.db": b"garbage, not SQLite" * 100}), ("mlflow.tracking_uri", "not an MLflow database")),
    Row("tracking-foreign-sqlite", "./mlflow.db is another program's SQLite database",
        gopc("train", "--config", "run.yaml", "--quiet", files=run_yaml(), setup=sqlite_without_mlflow),
        ("mlflow.tracking_uri", "not an MLflow database")),
    Row("best-garbage-db", "`gopc best` next to an mlflow.db that holds garbage",
        gopc("best", "--sweep", "s", files={"mlflow.db": b"garbage, not SQLite" * 100}),
        ("--tracking-uri", "not an MLflow database")),

    # ---- --resume: what it would ignore or contradict
    Row("resume-with-config", "`--resume r --config run.yaml` (the run folder has its own config)",
        gopc("train", "--resume", "r", "--config", "run.yaml", files=run_yaml(), setup=trained_run(drop=("eval",))),
        ("--config", "cannot be combined with --resume")),
    Row("resume-with-out", "`--resume r --out s`",
        gopc("train", "--resume", "r", "--out", "s", setup=trained_run(drop=("eval",))),
        ("--out", "cannot be combined with --resume")),
    Row("resume-with-seeds", "`--resume r --seeds 1`",
        gopc("train", "--resume", "r", "--seeds", "1", setup=trained_run(drop=("eval",))),
        ("--seeds", "cannot be combined with --resume")),
    Row("resume-steps-below-checkpoint", "`--resume r --set train.steps=3`, r's checkpoint is at step 5",
        gopc("train", "--resume", "r", "--quiet", "--set", "train.steps=3", setup=trained_run(drop=("eval",))),
        ("train.steps", "below the checkpoint's step 5")),
    Row("resume-completed", "`--resume r` where r completed its 5 steps",
        gopc("train", "--resume", "r", "--quiet", setup=trained_run()), ("--resume", "completed its 5 steps")),
    Row("resume-tracking-gone", "`--resume r` after the mlflow.db r logged to has gone",
        gopc("train", "--resume", "r", "--quiet", setup=recorded_tracking_uri_gone),
        ("mlflow.tracking_uri", "no MLflow database", "continue run")),

    # ---- YAML that PyYAML would read quietly wrong, and files that are not YAML
    Row("config-duplicate-section", "run YAML with a `train:` section written twice",
        gopc("train", "--config", "run.yaml", files={"run.yaml": yaml.safe_dump(TINY) + "train: {steps: 7}\n"}),
        ("--config", "'train' is written twice")),
    Row("config-duplicate-key", "run YAML with model.r_dim written twice in one section",
        gopc("train", "--config", "run.yaml", files={"run.yaml": "model: {r_dim: 8, ngf: 4, r_dim: 16}\n"}),
        ("--config", "'r_dim' is written twice")),
    Row("config-binary", "`--config` names a binary file",
        gopc("train", "--config", "run.yaml", files={"run.yaml": bytes(range(256))}),
        ("--config", "not a text YAML file")),
    Row("config-directory", "`--config` names a folder", gopc("train", "--config", "cfg", files=empty_dir("cfg")),
        ("--config", "is a folder")),
    Row("sweep-duplicate-setting", "sweep file with num_samples written twice",
        sweep("--config", "bad_input.yaml", files={"bad_input.yaml": "num_samples: 2\nnum_samples: 3\n"}),
        ("--config", "'num_samples' is written twice")),

    # ---- numbers at their edges
    Row("config-negative-seed", "--set train.seed=-1", train("train.seed=-1"), ("train.seed", "below the minimum 0")),
    Row("config-negative-data-seed", "--set data.seed=-3", train("data.seed=-3"), ("data.seed", "below the minimum 0")),
    Row("config-batch-beyond-data", "--set train.batch_size=65 (data.n_train is 64)", train("train.batch_size=65"),
        ("train.batch_size", "more than data.n_train 64")),
    Row("config-eval-beyond-data", "--set train.eval_size=9 (data.n_val is 8)", train("train.eval_size=9"),
        ("train.eval_size", "more than data.n_val 8")),
    Row("config-cuda-missing", "--set train.device=cuda on a machine without CUDA",
        gopc("train", "--config", "run.yaml", "--quiet", "--set", "train.device=cuda", files=run_yaml(), setup=no_cuda),
        ("train.device", "no CUDA GPU")),
    Row("config-cuda-index", "--set train.device=cuda:99", train("train.device=cuda:99"), ("train.device", "cuda:99")),
    Row("eval-n-zero", "`gopc eval r --n 0`", gopc("eval", "r", "--n", "0"), ("--n", "'0' is not a whole number of 1")),
    Row("eval-n-negative", "`gopc eval r --n -3`", gopc("eval", "r", "--n=-3"),
        ("--n", "'-3' is not a whole number of 1")),
    Row("eval-n-beyond-split", "`gopc eval r --n 9` (r's test split has 8 sequences)",
        gopc("eval", "r", "--n", "9", setup=trained_run()), ("--n", "more than the 8 sequences")),
    Row("best-output-holds-export", "`gopc best --sweep s -o out` where out/ holds an earlier best-1.yaml",
        gopc("best", "--sweep", "s", "-o", "out", files={"out/best-1.yaml": "# an earlier export\n"}),
        ("--output", "already holds best-1.yaml", "choose a new folder")),
    Row("best-top-zero", "`gopc best --sweep s --top 0`", gopc("best", "--sweep", "s", "--top", "0"),
        ("--top", "'0' is not a whole number of 1")),

    # ---- damaged or foreign checkpoints
    Row("resume-truncated-checkpoint", "`--resume r`, r/checkpoint.pt cut off after 1,000 bytes",
        gopc("train", "--resume", "r", "--quiet", setup=truncated_checkpoint),
        ("--resume", "not a readable gopc checkpoint")),
    Row("resume-garbage-checkpoint", "`--resume r`, r/checkpoint.pt holds garbage",
        gopc("train", "--resume", "r", "--quiet", files={"r/checkpoint.pt": b"\x80\x02garbage" * 50,
                                                      "r/config.yaml": yaml.safe_dump(TINY)}),
        ("--resume", "not a readable gopc checkpoint")),
    Row("resume-foreign-checkpoint", "`--resume r`, r/checkpoint.pt is torch's but not gopc's",
        gopc("train", "--resume", "r", "--quiet", setup=foreign_checkpoint), ("--resume", "not a gopc checkpoint")),
    Row("resume-other-model-size", "`--resume r --set model.r_dim=32` (r's model has r_dim 16)",
        gopc("train", "--resume", "r", "--quiet", "--set", "model.r_dim=32", setup=trained_run(drop=("eval",))),
        ("model.r_dim", "holds a model with model.r_dim=16")),
    Row("resume-other-model-kind", "`--resume r`, r/config.yaml edited to model.kind=vae1",
        gopc("train", "--resume", "r", "--quiet",
             setup=trained_run(drop=("eval",), config={"model": {"kind": "vae1"}})),
        ("model.kind", "holds a model with model.kind='gopc1'")),
    Row("eval-truncated-checkpoint", "`gopc eval r`, r/checkpoint.pt cut off after 1,000 bytes",
        gopc("eval", "r", setup=truncated_checkpoint), ("run", "not a readable gopc checkpoint")),
    Row("eval-foreign-checkpoint", "`gopc eval r`, r/checkpoint.pt is torch's but not gopc's",
        gopc("eval", "r", setup=foreign_checkpoint), ("run", "not a gopc checkpoint")),
    Row("eval-other-model-size", "`gopc eval r --set model.ngf=4` (r's model has ngf 8)",
        gopc("eval", "r", "--set", "model.ngf=4", setup=trained_run()),
        ("model.ngf", "holds a model with model.ngf=8")),
    Row("data-damaged-gzip-inside", "train-images-idx3-ubyte.gz with one byte flipped inside (full length)",
        train("data.source=mnist", files=mnist("gzip-inside")), ("data.source", "damaged gzip")),

    # ---- sweep settings that used to fail only after Ray had started (parent run left RUNNING)
    Row("sweep-negative-seed", "--set seed=-1", settings_with("seed=-1"), ("sweep.seed", "below the minimum 0")),
    Row("sweep-no-startup-trials", "--set n_startup_trials=0", settings_with("n_startup_trials=0"),
        ("sweep.n_startup_trials", "below the minimum 1")),
    Row("sweep-storage-under-file", "--set storage=blocker/results, blocker is a file",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--set", "storage=blocker/results", files={"blocker": "x"}),
        ("storage", "blocker is a file")),
    Row("sweep-tracking-garbage-db", "--set tracking_uri=sqlite:///bad.db, bad.db holds garbage",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--set", "tracking_uri=sqlite:///bad.db",
              files={"bad.db": b"garbage" * 100}), ("tracking_uri", "not an MLflow database")),
    # ---- databases that are read-only, cut off or damaged (issue 22, class 3): refused before anything is written
    Row("tracking-read-only-db", "./mlflow.db is read-only (chmod 444, its folder writable)",
        gopc("train", "--config", "run.yaml", "--quiet", files=run_yaml(), setup=tracking_db("read-only")),
        ("mlflow.tracking_uri", "is read-only", "chmod u+w")),
    Row("tracking-cut-off-db", "./mlflow.db cut off after half its bytes",
        gopc("train", "--config", "run.yaml", "--quiet", files=run_yaml(), setup=tracking_db("cut")),
        ("mlflow.tracking_uri", "is damaged (cut off", "restore it from a backup")),
    Row("tracking-damaged-db", "./mlflow.db with its second quarter overwritten (length unchanged)",
        gopc("train", "--config", "run.yaml", "--quiet", files=run_yaml(), setup=tracking_db("damaged")),
        ("mlflow.tracking_uri", "is damaged (database disk image is malformed)")),
    Row("sweep-tracking-read-only-db", "a sweep next to a read-only ./mlflow.db",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", setup=tracking_db("read-only")),
        ("tracking_uri", "is read-only")),
    Row("sweep-optuna-read-only", "a new sweep next to a read-only ./optuna.db (another sweep's study in it)",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--set", "name=fresh", setup=study_db("read-only")),
        ("optuna_storage", "is read-only", "chmod u+w")),
    Row("sweep-optuna-garbage", "a new sweep next to an ./optuna.db that holds garbage",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", files={"optuna.db": b"garbage, not SQLite" * 100}),
        ("optuna_storage", "not an Optuna study database")),
    Row("resume-optuna-damaged", "`--resume` of an interrupted sweep whose ./optuna.db has its second quarter overwritten",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--resume", setup=study_db("damaged", resumable=True)),
        ("optuna_storage", "is damaged (database disk image is malformed)")),
    Row("resume-optuna-cut-off", "`--resume` of an interrupted sweep whose ./optuna.db is cut off after half its bytes",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--resume", setup=study_db("cut", resumable=True)),
        ("optuna_storage", "is damaged (cut off")),
    Row("resume-optuna-read-only", "`--resume` of an interrupted sweep whose ./optuna.db is read-only",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--resume", setup=study_db("read-only", resumable=True)),
        ("optuna_storage", "is read-only")),
    Row("resume-optuna-empty", "`--resume` of an interrupted sweep whose ./optuna.db is empty (0 bytes)",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--resume", setup=study_db("empty", resumable=True)),
        ("optuna_storage", "holds no Optuna study 'gopc2_stability' to resume (the file is empty)")),
    Row("resume-optuna-missing", "`--resume` of an interrupted sweep whose ./optuna.db has gone",
        sweep("--config", SWEEP_YAML, "--preset", "smoke", "--resume", setup=study_db("missing", resumable=True)),
        ("optuna_storage", "there is no", "to resume sweep 'gopc2_stability' from")),
    Row("best-optuna-damaged", "`gopc best` next to an ./optuna.db with its second quarter overwritten",
        gopc("best", "--sweep", "gopc2_stability", setup=study_db("damaged")),
        ("--optuna-storage", "is damaged (database disk image is malformed)")),
    Row("start-point-switched-off", "start point sets stab.h_grad_limit while its when (stab.h_grad) is off",
        space(GATED_SPACE, start_points=[{"stab.h_grad_limit": 2.0}]),
        ("sweep.start_points[0].stab.h_grad_limit", "switched off by its when")),
    Row("start-point-fractional-int", "start point stab.n_steps_h: 1.5 (an int parameter)",
        space({"stab.n_steps_h": {"low": 1, "high": 3, "type": "int"}}, start_points=[{"stab.n_steps_h": 1.5}]),
        ("sweep.start_points[0].stab.n_steps_h", "not a whole number")),
    Row("start-point-repeated", "the same start point listed twice",
        space({"stab.out_act": {"choices": ["none", "sigmoid"]}},
              start_points=[{"stab.out_act": "sigmoid"}, {"stab.out_act": "sigmoid"}]),
        ("sweep.start_points[1]", "same point as start_points[0]")),
    Row("start-point-impossible", "start point {h_grad: clip_norm, h_grad_limit: 0}: fine alone, impossible together",
        space(GATED_SPACE | {"stab.h_grad_limit": {"choices": [0.0, 1.0]}},
              start_points=[{"stab.h_grad": "clip_norm", "stab.h_grad_limit": 0.0}]),
        ("sweep.start_points[0]", "stab.h_grad_limit", "must be positive")),
    Row("space-duplicate-choices", "stab.out_act: {choices: [none, sigmoid, none]}",
        space({"stab.out_act": {"choices": ["none", "sigmoid", "none"]}}),
        ("space.stab.out_act.choices", "'none' is listed twice")),
]


# ------------------------------------------------------------------ the one test

@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the resources rows only (2 CPUs, no GPU), stopped when the module ends."""
    import ray
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _param(row: Row):
    return pytest.param(row, id=row.id)


def test_the_table_is_sound():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 117  # rows are added, never dropped


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_bad_input_gets_one_line_naming_the_field_and_leaves_nothing(row, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    for var in ("GOPC_TRACKING_URI", "GOPC_STORAGE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    if getattr(row.how, "ray", False):
        request.getfixturevalue("local_ray")
        monkeypatch.setenv("HOME", str(tmp_path))  # check_resources also reads ~/ray_bootstrap_config.yaml
    out = row.how.fire(tmp_path)
    if isinstance(row.how, Cli):
        assert out.code == 2, out
        assert out.lines == 1, out  # one line in all, usage text and stdout included
        assert out.message.startswith(f"{row.how.prog}: error: "), out
        assert not out.changed, f"{row.id} left {sorted(out.changed)} behind"
        assert not out.runs_changed, f"{row.id} wrote MLflow runs: {sorted(out.runs_changed, key=str)[:5]}"
    else:
        expected = row.exc if isinstance(row.exc, type) else row.exc()
        assert out.exc is not None and issubclass(out.exc, expected), out
        assert out.lines == 1, out
    for fragment in row.expect:
        assert fragment in out.message, (fragment, out.message)


def test_a_silent_tracking_server_costs_seconds_not_minutes(tmp_path):
    """The hang rows again, each in a fresh process: the bound on MLflow's wait must come from gopc's own
    modules, whatever imported MLflow first. MLflow's defaults (a 120 s timeout, retried) would wait for
    minutes; gopc asks /health for 3 s, then MLflow with no retry and a 5 s timeout. The 60 s limit only
    tells a bounded wait from an unbounded one (measured: about 5 s, imports included)."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    commands = [["train", "--config", "run.yaml", "--quiet", "--set", f"mlflow.tracking_uri={SILENT_URI}"],
                ["best", "--sweep", "s", "--tracking-uri", SILENT_URI]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "GOPC_TRACKING_URI"):
        env.pop(var, None)
    procs = [subprocess.Popen([sys.executable, "-m", "gopc.cli", *argv], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in commands]
    for proc, field in zip(procs, ("mlflow.tracking_uri", "--tracking-uri")):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and not out, (out, err)
        assert err.strip().splitlines() == [f"gopc: error: {field}: MLflow at {SILENT_URI} does not answer "
                                            f"(TimeoutError); start the server, or set {field} to a reachable one"]
    assert sorted(os.listdir(tmp_path)) == ["run.yaml"]
