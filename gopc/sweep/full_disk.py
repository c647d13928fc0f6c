"""A sweep or study whose storage fills stops as a signal stops it: Tune's graceful stop, its state kept, one line, and
--resume goes on once space is freed (gopc/sweep/run.py says the line).

A trial that finds the disk full (its checkpoint, Tune's copy of it into the storage) must not raise: Tune would retry
it at once onto the same full disk, then mark it ERROR and tell the searcher it failed, and the trial would be lost. It
tells the driver instead, through a named Ray actor (nothing written to any disk), and stands still; the driver looks at
every Tune step and asks Tune for the same graceful stop as the first SIGINT (gopc/sweep/interrupt.py). The trial is
then unfinished, as after a signal, and --resume continues it from its last checkpoint. Tune's own complaints about the
same full disk (its uploads of the experiment state fail, with a traceback each) are left out of the output."""
from __future__ import annotations

import logging
import threading
import time

import ray
from ray import tune

from gopc.disk import FULL, DiskFull, no_space
from gopc.sweep import interrupt

ACTOR = "gopc-full-disk"  # in the driver's Ray namespace: one per experiment run
WAIT_S = 300  # how long a trial stands still; the driver stops it within a Tune step or two
_reported: list[str] = []  # on the driver: the trials that found the disk full, in order


@ray.remote(num_cpus=0)
class _Reports:
    def __init__(self):
        self.trials: list[str] = []

    def add(self, trial_id: str) -> None:
        self.trials.append(trial_id)

    def get(self) -> list[str]:
        return self.trials


def stand_still(trial_id: str) -> None:
    """In a trial that found the disk full: tell the driver, then wait for it to stop this trial. Raises
    DiskFull only if no stop comes (a driver that does not look), so the trial fails rather than hangs."""
    reports = _Reports.options(name=ACTOR, get_if_exists=True).remote()
    ray.get(reports.add.remote(trial_id))
    threading.Event().wait(WAIT_S)
    raise DiskFull(f"trial {trial_id}: the disk is full and the driver did not stop the sweep in {WAIT_S} s")


def reported() -> list[str]:
    """On the driver: the trials that found the disk full (kept here: the actor dies with the trial that made it)."""
    try:
        _reported[:] = ray.get(ray.get_actor(ACTOR).get.remote())
    except ValueError:  # no such actor: no trial has found the disk full
        pass
    return list(_reported)


def reset() -> None:
    """Forget an earlier experiment's reports (a process may run several drivers: the tests do)."""
    _reported.clear()


class StopOnFullDisk(tune.Callback):
    """Asks Tune for its graceful stop once a trial has reported a full disk."""

    POLL_S = 1.0  # a lookup in Ray's control store each time: once a second is soon enough

    def __init__(self):
        self._next = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self.POLL_S
            if reported():
                interrupt.stop_tune()


class _NoSpaceNoise(logging.Filter):
    """Drops a record about a full disk: its exception, or a traceback Tune formatted into the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (no_space(exc) or any(f"[Errno {n}]" in record.getMessage() for n in FULL))


# Tune's upload of the experiment state (an error with its traceback) and its syncer (a warning with one)
TUNE_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer")


def quiet_tune() -> None:
    """Leave Tune's tracebacks about a full disk out of the output: the driver's one line says it."""
    for name in TUNE_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoSpaceNoise) for f in log.filters):
            log.addFilter(_NoSpaceNoise())
