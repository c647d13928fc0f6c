"""Locks that last exactly as long as the process that holds them: flock, which the kernel drops when its holder ends,
however it ends (kill -9 included), so no lock ever goes stale. They exclude processes on one machine, which is where
the drivers of one experiment and their SQLite files live.

- `held`: what one process uses at a time (a run folder, a sweep or study); a second is refused at once.
- `creating`: a shared SQLite database made once; whoever comes second waits for the first to finish."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from typing import Callable

from gopc.errors import GopcError


def holder(path: str) -> str | None:
    """The pid that holds the lock file `path`, or None when nobody does. Takes and creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: nobody has ever held it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode().strip() or "?"
    finally:
        os.close(fd)  # closing releases a lock taken here


@contextlib.contextmanager
def held(path: str, refuse: Callable[[str], GopcError]):
    """Hold the lock file `path` (this pid in it) for the block; if another process holds it, raise refuse(pid)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise refuse(os.pread(fd, 32, 0).decode().strip() or "?") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def outside(key: str) -> str:
    """A lock file for `key` (a database path, an experiment) in the system's temp folder, so that
    taking it writes nothing into the user's folders (a refused command leaves them as they were)."""
    folder = os.path.join(tempfile.gettempdir(), "gopc-locks")
    os.makedirs(folder, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in os.path.basename(key.rstrip("/")))[:40]
    return os.path.join(folder, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.lock")


@contextlib.contextmanager
def creating(db_path: str | None):
    """Wait for, then hold, the right to create or inspect the SQLite file `db_path` (None: no file,
    nothing to hold). Two runs starting at once on a new database would both run the schema migration
    (MLflow's alembic, Optuna's create_all), and one of them, or the file, would break."""
    if not db_path:
        yield
        return
    fd = os.open(outside(os.path.abspath(db_path)), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks: a migration takes a second or two
        yield
    finally:
        os.close(fd)


def wait_for_creation(db_path: str) -> None:
    """Return once nobody is creating `db_path`: a check must not read a half-made database."""
    with creating(db_path):
        pass
