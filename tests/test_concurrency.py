"""Two users at once (issue 22, classes 1 and 2): runs that start at the same instant in a folder with no
database yet, and two drivers of one sweep."""
import contextlib
import os
import subprocess
import sys

import yaml

from conftest import ROOT, SWEEP_YAML, TINY, base_sets, mlflow_rows, wait_for

SWEEP = ["--config", SWEEP_YAML, "--preset", "smoke", "--set", "num_samples=1", "--set", "scheduler.type=fifo"] + \
    base_sets(TINY)
ROUNDS = 10


def test_two_trains_and_two_sweeps_started_at_one_instant_in_an_empty_folder_all_finish(tmp_path):
    """Ten rounds; in each, two `gopc train` and two sweeps of one name start within milliseconds in an empty
    folder: the trains and a sweep race to create mlflow.db, and one sweep is refused (a sweep has one
    driver). Two more processes race to create optuna.db, as two sweeps of different names would (the rest
    of such a sweep is the same as the first's). Every run must finish, or be refused in one line."""
    control = tmp_path / "control"
    for i in range(ROUNDS):
        (control / "work" / f"{i:02}").mkdir(parents=True)
        (control / f"{i:02}").mkdir()
    (control / "run.yaml").write_text(yaml.safe_dump(TINY))
    starters = {"train-a": ["gopc", "train", "--config", str(control / "run.yaml"), "--quiet"],
                "train-b": ["gopc", "train", "--config", str(control / "run.yaml"), "--quiet", "--seeds", "1"],
                "sweep-a": ["sweep"] + SWEEP, "sweep-b": ["sweep"] + SWEEP,
                "study-a": ["study", "a"], "study-b": ["study", "b"]}
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "starter.py"), str(control), name, *argv],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, argv in starters.items()]
    outcomes = {}
    try:
        for i in range(ROUNDS):
            signals = control / f"{i:02}"
            assert wait_for(lambda: all((signals / f"{n}.ready").exists() for n in starters), 120), f"round {i}"
            (signals / "go").touch()
            assert wait_for(lambda: all((signals / f"{n}.done").exists() for n in starters), 240), f"round {i}"
            for name in starters:
                code, _, err = (signals / f"{name}.done").read_text().partition("\n")
                outcomes[i, name] = (int(code), err.strip().splitlines())
    finally:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
            p.kill()
    bad = {k: v for k, v in outcomes.items() if not (v[0] == 0 or (v[0] == 2 and len(v[1]) == 1))}
    assert not bad, f"neither finished nor refused in one line: {bad}"
    for i in range(ROUNDS):  # of two drivers of one sweep, one ran it
        assert sorted(outcomes[i, n][0] for n in ("sweep-a", "sweep-b")) == [0, 2], i
        assert outcomes[i, "train-a"][0] == outcomes[i, "train-b"][0] == 0, i
    for i in range(ROUNDS):
        db = control / "work" / f"{i:02}" / "mlflow.db"
        statuses = [s for (s,) in mlflow_rows(db, "select status from runs") or []]
        assert statuses == ["FINISHED"] * 4, (i, statuses)  # two trains, the sweep's parent and its trial


def test_a_second_driver_of_a_running_sweep_is_refused_in_one_line_naming_its_pid(tmp_path, monkeypatch, capsys):
    """A sweep is held by one driver at a time: a second start, or a --resume, while it runs would share
    its Tune state, Optuna study and MLflow parent. Both are refused before anything is written."""
    from gopc.sweep import settings
    from gopc.sweep.run import one_driver
    from gopc.sweep.search import SWEEP as KIND, main
    monkeypatch.chdir(tmp_path)
    with one_driver(settings.load(SWEEP_YAML, "smoke", [a for a in SWEEP if "=" in a]), KIND):  # this process: the running driver
        for extra in ([], ["--resume"]):
            assert main(SWEEP + extra) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"sweep 'gopc2_stability' is being run by another driver (pid {os.getpid()})" \
                in err[0], err
    assert os.listdir(tmp_path) == []
