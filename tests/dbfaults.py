"""Databases that are read-only, cut off, damaged or held (issue 22, class 3), made for real: a real MLflow
or Optuna SQLite file (made once per session and copied), then chattr, a cut, overwritten pages, or a
writer's lock taken by an sqlite3 connection. Shared by tests/test_bad_input.py's rows and
tests/test_databases.py."""
from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

SWEEP = "gopc2_stability"
_MADE: dict[str, bytes] = {}


def real_db(kind: str, path: Path) -> Path:
    """`path`: a real database of `kind`: 'mlflow' (experiment gopc2_stability with its sweep's parent run,
    KILLED as an interrupted sweep leaves it) or 'optuna' (the sweep's study with one finished trial)."""
    if kind not in _MADE:
        folder = tempfile.mkdtemp(prefix="gopc-dbfaults-")
        atexit.register(shutil.rmtree, folder, True)
        made = os.path.join(folder, f"{kind}.db")
        if kind == "mlflow":
            import mlflow
            client = mlflow.MlflowClient(f"sqlite:///{made}")
            run = client.create_run(client.create_experiment(SWEEP), run_name=SWEEP,
                                    tags={"sweep": SWEEP, "role": "parent", "status": "interrupted"})
            client.set_terminated(run.info.run_id, "KILLED")
        else:
            import optuna
            study = optuna.create_study(study_name=SWEEP, storage=f"sqlite:///{made}")
            study.tell(study.ask(), 1.0)
        _MADE[kind] = Path(made).read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_MADE[kind])
    return path


def read_only(path: Path):
    """Make `path` read-only for this process as `chmod 444` makes it for its owner; returns the undo.
    The tests run as root, whom file modes do not stop (SQLite as root writes a chmod 444 file), so the
    file is also made immutable (chattr +i): then open(O_RDWR) fails for root too, SQLite falls back to
    reading it, and a write fails with 'attempt to write a readonly database', as for the user."""
    path.chmod(0o444)
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode:  # a file system without the immutable flag (tmpfs, overlayfs)
            path.chmod(0o644)
            pytest.skip(f"cannot make a file read-only for root here (chattr: {done.stderr.strip()})")
    def undo():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o644)
    return undo


def cut(path: Path) -> None:
    """Keep the first half of the file, as a copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage(path: Path) -> None:
    """Overwrite the second quarter of the file (its length unchanged): pages SQLite cannot read."""
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n // 4: n // 2] = b"\x55" * (n // 2 - n // 4)
    path.write_bytes(bytes(data))


class Writer:
    """Another process's writer holding `path`: an sqlite3 connection in BEGIN EXCLUSIVE, on a thread of
    its own (a connection belongs to the thread that made it), from hold() until release()."""

    def __init__(self, path: Path):
        self.path, self._held, self._release = path, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            self._held.set()
            self._release.wait()
            db.execute("ROLLBACK")
        finally:
            db.close()

    def hold(self) -> "Writer":
        self._thread.start()
        assert self._held.wait(30), f"could not lock {self.path}"
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)
