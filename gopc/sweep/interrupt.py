"""SIGINT and SIGTERM to a sweep or study driver are normal events: a stop, not a crash.

The first signal (Ctrl-C, or SIGTERM from a scheduler or `kill`) is handed to Tune's own graceful stop, which saves the
experiment state one last time; the driver then writes no summary or verdict, ends the MLflow runs it left open KILLED,
and says in one line how to resume (gopc/sweep/run.py). A second signal during that stop is acknowledged and changes
nothing, so the saved state stays resumable.

Why not Tune's own SIGINT handler: it knows no SIGTERM (Ray's driver turns SIGTERM into a SystemExit that aborts it
mid-write), and a second Ctrl-C raises KeyboardInterrupt wherever the driver stands. Tune's stop is reached through the
SIGUSR1 handler that tune.run installs for this purpose; it is raised from a Tune callback, so a signal that arrives
before tune.run is ready waits for its first step."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from ray import tune

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals this driver got, in order
_forwarded = False  # Tune has been told to stop
_prog = "gopc"


@contextlib.contextmanager
def catching(prog: str):
    """SIGINT and SIGTERM are this module's while the driver runs; the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    reset()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    install(prog)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def install(prog: str) -> None:
    """Take SIGINT and SIGTERM over (again after ray.init, which sets a SIGTERM handler of its own)."""
    global _prog
    _prog = prog
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def _handle(signum, frame) -> None:
    record(signum)
    if len(_received) == 2:  # acknowledged once; the state being saved is kept, whatever comes next
        print(f"{_prog}: {signal.Signals(signum).name} again: already stopping, the experiment state is being "
              "saved; it stays resumable", file=sys.stderr, flush=True)


def record(signum: int) -> None:
    """A signal that reached the driver through another handler (Ray's SIGTERM one, during ray.init)."""
    _received.append(signum)


def received() -> int:
    return _received[0] if _received else 0


def reset() -> None:
    """Forget earlier signals (a process may run several drivers: the tests do)."""
    global _forwarded
    _received.clear()
    _forwarded = False


def stop_tune() -> None:
    """Tune's graceful stop (its SIGUSR1 handler), once, from a Tune callback (main thread): first signal, full disk."""
    global _forwarded
    if not _forwarded:
        _forwarded = True
        signal.raise_signal(signal.SIGUSR1)


class StopOnSignal(tune.Callback):
    """Hands the driver's first signal to Tune's graceful stop at the next step."""

    def on_step_begin(self, iteration, trials, **info):
        if _received:
            stop_tune()
