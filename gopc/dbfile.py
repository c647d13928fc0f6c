"""The SQLite files of a command (MLflow's mlflow.db, Optuna's optuna.db), checked before anything is written.
Read-only, cut off or damaged: one line naming the file and the fix, not MLflow's or Optuna's traceback once the run
folder or parent run exists. Held by another writer: waited for, a bounded time (GOPC_BUSY_WAIT s, default 60), with a
line saying so, then the command goes on, or stops in one line. Nothing is written into the file or its folder."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import sys

from gopc import locks
from gopc.errors import ConfigError

HEADER = b"SQLite format 3\x00"


def busy_wait() -> float:
    """How long a command waits for another writer's lock on a database it needs, in seconds."""
    try:
        return max(float(os.environ.get("GOPC_BUSY_WAIT", "60")), 0.0)
    except ValueError:
        raise ConfigError(f"GOPC_BUSY_WAIT: {os.environ['GOPC_BUSY_WAIT']!r} is not a number of seconds, "
                          "e.g. GOPC_BUSY_WAIT=60") from None


def cut_off(path: str) -> str | None:
    """'N of M bytes' when the file is shorter than its own header says (a copy or a disk that ran out
    mid-write), else None. SQLite itself only notices when it reaches a missing page."""
    with open(path, "rb") as f:
        head = f.read(100)
    size = os.path.getsize(path)
    page = int.from_bytes(head[16:18], "big") or 0
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    # the header's page count is only valid when its version number matches the change counter
    if page and pages and head[92:96] == head[24:28] and size < pages * page:
        return f"{size} of {pages * page} bytes"
    return None


def _locked(e: Exception) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def _read(path: str, write: bool, timeout: float) -> set[str]:
    """The file's table names after SQLite's quick_check (every page read, far cheaper than the full
    integrity_check); with `write`, also the write lock for an instant (BEGIN IMMEDIATE, then ROLLBACK:
    nothing is written, but another writer's lock is found here rather than inside MLflow or Optuna)."""
    mode = "rw" if write else "ro"  # never "rwc": a check creates nothing
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=timeout,
                                            isolation_level=None)) as db:
        if write:
            db.execute("BEGIN IMMEDIATE")
        try:
            tables = {name for (name,) in db.execute("select name from sqlite_master where type='table'")}
            problems = [row[0] for row in db.execute("PRAGMA quick_check(1)")]
        finally:
            if write:
                db.execute("ROLLBACK")
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"database disk image is malformed: {problems[0]}")
    return tables


def check(path: str, field: str, what: str, fix: str, write: bool = True) -> set[str] | None:
    """Checks the SQLite file `path` that `field` names before a command uses it; returns its table names
    (empty for a 0-byte file, which SQLite takes as an empty database), or None when there is no file.
    `what`: what the file should be ('an MLflow database'); `fix`: the end of every refusal ('point
    mlflow.tracking_uri elsewhere'). `write=False` (gopc best) accepts a read-only file."""
    locks.wait_for_creation(path)  # a file another run is creating right now is never read half-made
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise ConfigError(f"{field}: {path} is a folder, not {what}; {fix}")
    # os.access, not mode bits: it sees read-only mounts, chattr +i, and answers for this user (root writes 444 files)
    if write and not os.access(path, os.W_OK):
        raise ConfigError(f"{field}: {path} is read-only; make it writable (chmod u+w {path}), or {fix}")
    if os.path.getsize(path) == 0:
        return set()
    with open(path, "rb") as f:
        if f.read(16) != HEADER:
            raise ConfigError(f"{field}: {path} is not {what} (file is not a database); move it away or {fix}")
    if size := cut_off(path):
        raise ConfigError(f"{field}: {path} is damaged (cut off: {size}); restore it from a backup, or move "
                          f"it away and {fix}")
    try:
        try:
            return _read(path, write, 0)
        except sqlite3.OperationalError as e:
            if not _locked(e):
                raise
        wait = busy_wait()
        print(f"{field}: {path} is held by another writer (database is locked); waiting up to {wait:g} s for it",
              file=sys.stderr, flush=True)
        try:
            return _read(path, write, wait)
        except sqlite3.OperationalError as e:
            if not _locked(e):
                raise
            raise ConfigError(f"{field}: {path} is held by another writer (database is locked for over "
                              f"{wait:g} s); let that process finish or stop it, then run again") from None
    except sqlite3.DatabaseError as e:  # OperationalError included: unreadable however SQLite says it
        reason = str(e).split(":")[0]
        raise ConfigError(f"{field}: {path} is damaged ({reason}); restore it from a backup, or move it away "
                          f"and {fix}") from None
