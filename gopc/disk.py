"""A full disk: how it is recognized, and the one line that says so.

A full disk is not bad input, but like bad input it is the user's to fix before anything can go on, so it ends the same
way: one line on stderr and exit 2 (gopc/cli.py, gopc/sweep/run.py). What was saved before it stays: a run keeps its
last checkpoint (written through a temporary file and a rename), a sweep its last good Tune snapshot
(gopc/sweep/snapshot.py), and `--resume` goes on once space is freed."""
from __future__ import annotations

import errno
import os

from gopc.errors import GopcError

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; the user's disk quota exceeded


class DiskFull(GopcError):
    """A write found no space; the message names the folder and what was kept; `resumable`: --resume can go on."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


def no_space(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised from or during, is a write that found no space. torch
    and pyarrow wrap the OSError in their own errors (torch.save's RuntimeError has it as __context__
    when it writes to a Python file), so the whole chain is looked at."""
    if isinstance(e, DiskFull):
        return True
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL:
            return True
        e = e.__cause__ or e.__context__
    return False


def reason(e: BaseException) -> str:
    """'no space left on device' or 'disk quota exceeded', as the system words it, in lower case."""
    while e is not None and not (isinstance(e, OSError) and e.errno in FULL):
        e = e.__cause__ or e.__context__
    return os.strerror(e.errno if e is not None else errno.ENOSPC).lower()
