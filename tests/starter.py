"""One command started again and again, each time when tests/test_concurrency.py says go:

    python tests/starter.py CONTROL NAME gopc|sweep|study ARG...

For each round folder of CONTROL/work (sorted), it writes CONTROL/ROUND/NAME.ready, waits for
CONTROL/ROUND/go, runs the command in the round folder and writes its exit code and stderr to
CONTROL/ROUND/NAME.done. Its imports are done before the first round, so that the commands of a round
start within milliseconds of each other: the instant at which two runs race for a new database."""
import contextlib
import io
import os
import sys
import time
from pathlib import Path


GO_WITHIN_S = 300  # far above a round's start (seconds); only an orphaned starter waits this long


def new_study(argv) -> int:
    """What a sweep does first with optuna.db: open the storage (a new file gets its tables) and add a study."""
    import optuna

    from gopc.sweep.searcher import open_storage
    optuna.create_study(study_name=argv[0], storage=open_storage(f"sqlite:///{os.path.abspath('optuna.db')}"))
    return 0


def main() -> None:
    control, name, prog, *argv = sys.argv[1:]
    from gopc.cli import main as gopc
    from gopc.sweep.search import main as sweep
    command = {"gopc": gopc, "sweep": sweep, "study": new_study}[prog]
    for folder in sorted((Path(control) / "work").iterdir()):
        signals = Path(control) / folder.name
        (signals / f"{name}.ready").touch()
        deadline = time.monotonic() + GO_WITHIN_S
        while not (signals / "go").exists():  # the test creates it once every process is ready
            if time.monotonic() > deadline:  # the test died before its go: do not outlive it
                sys.exit(f"starter {name}: no {signals / 'go'} within {GO_WITHIN_S} s")
            time.sleep(0.005)
        os.chdir(folder)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = command(argv)
            except BaseException as e:  # noqa: BLE001 - a traceback is what the test must report
                code, _ = -1, err.write(f"{type(e).__name__}: {e}\n")
        (signals / f"{name}.done").write_text(f"{code}\n{err.getvalue()}")


if __name__ == "__main__":
    main()
