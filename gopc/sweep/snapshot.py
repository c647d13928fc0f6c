"""Tune's snapshot of an experiment, kept whole through a full disk.

Tune saves its snapshot (the trial list, the trial generator's and the searcher's state: SNAPSHOT) in a staging folder,
then copies it into the storage over the files there, in place. When the storage fills during that copy, a file is cut
short, and Tuner.restore fails on it (JSONDecodeError): the experiment could not be resumed. So, while the experiment
runs, the driver keeps a copy of each file as it was when last whole, in GOOD beside them; --resume puts it back in
place of a file cut short before anything reads the snapshot. Good copies of different moments are what a kill leaves
too: the trial list is taken as the truth and the searcher brought in line with it (gopc/sweep/recovery.py). Only a
storage folder is looked after: an object store (s3://...) replaces a file whole or not at all."""
from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import pickle
import time

from ray import tune

from gopc.errors import GopcError

SNAPSHOT = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
GOOD = ".good"  # in the experiment's folder: Tune reads the snapshot from the folder itself only


class _Stub:
    """What a pickle's classes and functions become while `whole` reads it: takes anything, runs and imports nothing."""
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def _ignore(self, *args, **kwargs):
        pass

    __init__ = __setstate__ = __setitem__ = append = extend = add = _ignore  # what unpickling calls on an object


class _Probe(pickle.Unpickler):
    def find_class(self, module, name):
        return _Stub


def whole(name: str, data: bytes) -> bool:
    """Whether a snapshot file's content is complete: the trial list's JSON parses, or the other files'
    pickles (search_gen_state-*.json is one too) read to their STOP at their last byte. The pickle is read
    by pickle's C reader with every class stubbed (_Probe): as strict as walking its opcodes, and fast
    enough for a searcher's state of thousands of trials."""
    try:
        if name.startswith("experiment_state-"):
            json.loads(data)
            return True
        f = io.BytesIO(data)
        _Probe(f).load()
        return f.tell() == len(data)
    except Exception:  # noqa: BLE001: a cut file fails in many ways (JSONDecodeError, EOFError, UnpicklingError, ...)
        return False


def _names(folder: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if any(fnmatch.fnmatch(n, p) for p in SNAPSHOT))
    except OSError:  # not created yet
        return []


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, data: bytes) -> bool:
    """Writes through a temporary file and a rename: a full disk leaves the file as it was. False then."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return False


class KeepGoodCopies(tune.Callback):
    """On the driver: copies each snapshot file of the experiment's folder into GOOD whenever Tune has
    written it anew and it is whole. A copy that finds the disk full keeps the one before."""

    POLL_S = 1.0  # Tune saves its snapshot every 10 s or more; a listing and a stat of each file each time

    def __init__(self, experiment: str):
        self.experiment = experiment if "://" not in experiment else ""
        self._copied: dict[str, tuple[int, int]] = {}  # name -> (mtime, size) of the file last copied
        self._next = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if self.experiment and time.monotonic() >= self._next:
            self._next = time.monotonic() + self.POLL_S
            self.keep()

    def on_experiment_end(self, trials, **info):
        if self.experiment:
            self.keep()

    def keep(self) -> None:
        for name in _names(self.experiment):
            path = os.path.join(self.experiment, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            if self._copied.get(name) == (stat.st_mtime_ns, stat.st_size):
                continue
            data = _read(path)  # Tune's copy may be under way: a file read cut short is not whole, and waits
            if data is not None and len(data) == stat.st_size and whole(name, data) and \
                    _write(os.path.join(self.experiment, GOOD, name), data):
                self._copied[name] = (stat.st_mtime_ns, stat.st_size)


def repair(experiment: str) -> list[str]:
    """Before --resume reads the snapshot at `experiment`: puts back the good copy of every file cut
    short, and returns their names. A file cut short with no good copy is refused in one line."""
    if "://" in experiment:
        return []
    repaired = []
    for name in _names(experiment):
        path = os.path.join(experiment, name)
        if whole(name, _read(path) or b""):
            continue
        good = _read(os.path.join(experiment, GOOD, name))
        if good is None or not whole(name, good):
            raise GopcError(f"--resume: {path} was cut short (the disk filled while Tune wrote it) and no good "
                            f"copy of it is kept in {os.path.join(experiment, GOOD)}; remove it to go back to "
                            f"the state Tune saved before, or continue under another name with --set name=NEW")
        if not _write(path, good):
            raise GopcError(f"--resume: {path} was cut short and its good copy cannot be put back: the disk is "
                            f"still full; free space, then resume again")
        repaired.append(name)
    return repaired
