"""A training run's MLflow writes, made on a thread of their own, in order, retried while the store fails.

Why a thread: MLflow's SQLite store waits out another writer's lock for 20 s at every write (its sessions set
`PRAGMA busy_timeout = 20000`), and a server that is away costs its timeout. On the training's thread either would stall
or kill the training (issue 22, class 3); here the training only hands writes over. A write that fails stays first in
line and is tried again after 2 s, doubling up to a minute, with a line when the trouble starts and one when it ends."""
from __future__ import annotations

import collections
import sys
import threading
from typing import Callable


class WriteQueue:
    RETRY_S = (2.0, 60.0)  # the first gap after a failed write, and the longest

    def __init__(self, where: str):
        self.where = where  # the store, as the lines name it
        self.trouble = ""  # why the first write in line fails, while it does
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._cv = threading.Condition()
        self._hurry = False  # someone waits for the queue: retry at the shortest gap
        self._nudges = 0  # drain() counts up: a retry waiting out its gap tries at once
        threading.Thread(target=self._run, name="gopc-mlflow-writes", daemon=True).start()

    def put(self, op: Callable[[], None]) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._ops)

    def drain(self, wait: float, quiet: bool = False) -> bool:
        """Wait up to `wait` s for every write. A line says so only when it must wait: the writes fail, or are still
        queued after a moment (a healthy database takes milliseconds: a line at every run's end would be noise)."""
        with self._cv:
            if not self._ops:
                return True
            self._hurry, self._nudges = True, self._nudges + 1
            self._cv.notify_all()
            moment = 0.0 if self.trouble else min(2.0, wait)
            done = self._cv.wait_for(lambda: not self._ops, timeout=moment)
            if not done:
                if not quiet:
                    print(f"gopc: waiting up to {wait:g} s for MLflow at {self.where} to log {len(self._ops)} queued "
                          f"write(s)", file=sys.stderr, flush=True)
                done = self._cv.wait_for(lambda: not self._ops, timeout=wait - moment)
            self._hurry = False
            return done

    def _run(self) -> None:
        gap = self.RETRY_S[0]
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._ops)
                op = self._ops[0]
            try:
                op()
            except Exception as e:  # noqa: BLE001 - any failure to record is tracking trouble, never the run's
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                reason = "database is locked" if "database is locked" in first else f"{type(e).__name__}: {first[:120]}"
                if not self.trouble:
                    print(f"gopc: MLflow at {self.where} failed ({reason}); training goes on, its MLflow writes are "
                          f"queued and retried", file=sys.stderr, flush=True)
                self.trouble = reason
                with self._cv:  # drain() wakes it early
                    nudges = self._nudges
                    self._cv.wait_for(lambda: self._nudges != nudges, timeout=self.RETRY_S[0] if self._hurry else gap)
                gap = min(2 * gap, self.RETRY_S[1])
                continue
            with self._cv:
                self._ops.popleft()
                if self.trouble and not self._ops:
                    print(f"gopc: MLflow at {self.where} answers again; the queued writes are logged",
                          file=sys.stderr, flush=True)
                    self.trouble, gap = "", self.RETRY_S[0]
                self._cv.notify_all()
