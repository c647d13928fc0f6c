"""A run folder while a run holds it: its lock (a second run into it is refused), the signals that end the
run cleanly at a step boundary, a full disk that ends it resumably, and the record of a divergence."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading

from gopc import locks
from gopc.disk import DiskFull, no_space, reason
from gopc.errors import GopcError

LOCK_FILE = ".lock"
DIVERGENCE_FILE = "divergence.json"  # in the folder of a run that diverged: the guard's record (Divergence)


def record_divergence(run_dir: str, record) -> None:
    with open(os.path.join(run_dir, DIVERGENCE_FILE), "w") as f:
        json.dump(record.to_dict(), f, indent=1)


def diverged_at(run_dir: str) -> int | None:
    """The step at which the run in `run_dir` diverged, from its divergence.json; None if it did not."""
    try:
        with open(os.path.join(run_dir, DIVERGENCE_FILE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: the callers only lose a note
        return None


def _in_use(run_dir: str, field: str):
    return lambda pid: GopcError(f"{field}: {run_dir} is in use by another run (pid {pid}); wait for it to end, "
                                 f"or choose another folder")


def check_free(run_dir: str, field: str) -> None:
    """Refuse a run folder that a running run holds, writing nothing (`locked` is what takes it)."""
    if pid := locks.holder(os.path.join(run_dir, LOCK_FILE)):
        raise _in_use(run_dir, field)(pid)


def locked(run_dir: str, field: str):
    """Hold the run folder's lock while a run uses it: a second run into the same folder is refused."""
    return locks.held(os.path.join(run_dir, LOCK_FILE), _in_use(run_dir, field))


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop at the next step boundary, where it checkpoints and ends
    as killed, instead of dying mid-step. A second signal acts at once (the previous handler). Only the
    main thread can install handlers; elsewhere (a Tune trial's thread) the run keeps the defaults."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def active(self) -> bool:
        return bool(self._previous)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def full_disk_ends_the_run(run_dir: str, field: str, result):
    """A write into the run folder that finds the disk full (a checkpoint, the evaluation's files) ends the run as
    DiskFull: one line naming the folder and the last (whole) checkpoint, which --resume goes on from."""
    try:
        yield
    except Exception as e:
        if not no_space(e):
            raise
        kept = (f"its checkpoint of step {result.checkpoint_step} is kept" if result.checkpoint_step is not None
                else "no checkpoint was saved yet")
        raise DiskFull(f"{field}: {reason(e)} in {run_dir} at step {result.step}; {kept}",
                       resumable=result.checkpoint_step is not None) from None
