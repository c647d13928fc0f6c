"""Databases that are busy, read-only or damaged (issue 22, class 3). The refusals themselves are rows of
tests/test_bad_input.py (exit 2, one line, nothing written); here: a writer holding mlflow.db during
`gopc train` (the training finishes, and MLflow gets everything once the lock is released), a held
database at a command's start (a line, a bounded wait, then on, or one line more and exit 2), `gopc best`
on read-only databases, and a sweep's --resume that finishes once its damaged optuna.db is restored.
Every wait is on an event or a file, never a fixed sleep."""
import contextlib
import io
import os
import shutil
import sqlite3
import threading

import mlflow
import ray
import torch
import yaml

from conftest import SWEEP_YAML, mlflow_rows, tiny, wait_for
from dbfaults import SWEEP, Writer, damage, read_only, real_db
from test_bad_input import listing

TINY = tiny(train={"steps": 6, "log_every": 1, "ckpt_every": 4})


class Tee(io.StringIO):
    """A captured stream that sets `seen` once a line holding `text` is written to it."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def write(self, s):
        if self.text in s:
            self.seen.set()
        return super().write(s)


def statuses(db) -> list[str]:
    return [s for (s,) in mlflow_rows(db, "select status from runs")]


def test_a_writer_holding_mlflow_db_during_gopc_train_neither_stops_nor_loses_the_run(tmp_path, monkeypatch):
    """Another writer takes mlflow.db (BEGIN EXCLUSIVE) at step 2 and keeps it until the run has written its
    checkpoint of step 4, which it can only do if the held database does not stop the training. Once the
    lock is gone, every step's metrics, the checkpoint and the model are in MLflow, the run FINISHED."""
    import gopc.run_tracking
    from gopc.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    writer = Writer(real_db("mlflow", tmp_path / "mlflow.db"))  # made once per session: no migration here

    class HeldAtStep2(gopc.run_tracking.MlflowHooks):  # only synchronises: the lock is taken before step 2 logs
        def metrics(self, step, metrics, checkpoint):
            if step == 2:
                writer.hold()
            super().metrics(step, metrics, checkpoint)

    monkeypatch.setattr(gopc.run_tracking, "MlflowHooks", HeldAtStep2)
    checkpoint = tmp_path / "r" / "checkpoint.pt"
    released = threading.Thread(target=lambda: (wait_for(checkpoint.exists, 300), writer.release()), daemon=True)
    released.start()  # the first checkpoint is written at step 4, while the writer still holds mlflow.db
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--config", "run.yaml", "--quiet", "--out", "r"]) == 0
    released.join(30)
    assert torch.load(checkpoint, weights_only=True)["step"] == 6
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run((tmp_path / "r" / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.data.tags["status"] in ("learned", "collapsed")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert "val/prior/mse" in run.data.metrics and "n_params" in run.data.params
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint.pt", "config.yaml"}
    assert client.search_logged_models([run.info.experiment_id])  # the model, logged after the lock went


def test_a_write_that_fails_on_a_held_database_is_retried_in_order_once_it_is_free(tmp_path):
    """The queue behind gopc train's MLflow writes, on a real SQLite file: writes that find it held past
    their busy timeout (MLflow's is 20 s; 0.1 s here) fail, wait in line, and are made in order once the
    writer lets go, which it does when the queue's line says the trouble began. One line each way."""
    from gopc.write_queue import WriteQueue
    db = tmp_path / "t.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("create table t (x)")
        con.commit()

    def insert(x):
        def op():
            with contextlib.closing(sqlite3.connect(db, timeout=0.1)) as con:
                con.execute("insert into t values (?)", (x,))
                con.commit()
        return op

    writer = Writer(db).hold()
    err = Tee("queued and retried")
    threading.Thread(target=lambda: (err.seen.wait(60), writer.release()), daemon=True).start()
    with contextlib.redirect_stderr(err):
        queue = WriteQueue(str(db))
        for x in range(3):
            queue.put(insert(x))
        assert queue.drain(60)
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert [x for (x,) in con.execute("select x from t")] == [0, 1, 2]
    lines = err.getvalue().strip().splitlines()  # the first two in either order: the writes race the drain
    assert sorted(lines[:2]) == [
        f"gopc: MLflow at {db} failed (database is locked); training goes on, its MLflow writes are queued and retried",
        f"gopc: waiting up to 60 s for MLflow at {db} to log 3 queued write(s)"]
    assert lines[2:] == [f"gopc: MLflow at {db} answers again; the queued writes are logged"]


def test_a_database_held_past_the_wait_stops_the_start_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """GOPC_BUSY_WAIT (here 1 s) bounds the wait for another writer at a command's start: `gopc train` on a
    held mlflow.db, a sweep on a held optuna.db. One line says it waits, one line says it stopped."""
    from gopc.cli import main as gopc
    from gopc.sweep.search import main as sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GOPC_BUSY_WAIT", "1")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY))
    cases = [(real_db("mlflow", tmp_path / "mlflow.db"), gopc, ["train", "--config", "run.yaml", "--quiet"],
              "gopc", "mlflow.tracking_uri"),
             (real_db("optuna", tmp_path / "optuna.db"), sweep, ["--config", SWEEP_YAML, "--preset", "smoke"],
              "gopc2_stability", "optuna_storage")]
    for db, main, argv, prog, field in cases:
        writer = Writer(db).hold()
        before = listing(tmp_path)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
                assert main(argv) == 2
        finally:
            writer.release()
        assert err.getvalue().strip().splitlines() == [
            f"{field}: {db} is held by another writer (database is locked); waiting up to 1 s for it",
            f"{prog}: error: {field}: {db} is held by another writer (database is locked for over 1 s); let that "
            "process finish or stop it, then run again"]
        assert listing(tmp_path) == before
    assert statuses(tmp_path / "mlflow.db") == ["KILLED"]  # the sweep's parent, as real_db left it


def test_gopc_best_reads_read_only_databases(smoke, tmp_path, monkeypatch):
    """`gopc best` only reads: it exports from a read-only mlflow.db and optuna.db, and changes neither."""
    from gopc.cli import main
    folder = smoke[0]
    monkeypatch.chdir(tmp_path)
    undo = []
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(folder / name, tmp_path / name)
        undo.append(read_only(tmp_path / name))
    before = listing(tmp_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(["best", "--sweep", SWEEP, "--top", "1", "-o", "best"]) == 0
    finally:
        for u in undo:
            u()
    assert out.getvalue().strip().splitlines() == ["best/best-1.yaml"]
    after = listing(tmp_path)  # the databases untouched (size, modification time), the export beside them
    assert before <= after and {p.split(" ")[0] for p in after - before} == {"best/", "best/best-1.yaml"}


def test_a_damaged_optuna_db_stops_resume_in_one_line_and_the_restored_one_resumes_while_held(smoke, tmp_path, monkeypatch):
    """A copy of the smoke sweep (its Tune folder, mlflow.db, optuna.db, artifacts). Its optuna.db damaged,
    --resume is refused in one line and nothing changes (the parent run is not set RUNNING). Restored
    from the copy, and held by another writer, --resume says it waits, goes on once the writer lets go,
    and finishes: the parent FINISHED."""
    from gopc.sweep.search import main
    folder = smoke[0]
    for name in ("sweep_results", "mlruns", "optuna-artifacts"):
        if (folder / name).exists():
            shutil.copytree(folder / name, tmp_path / name)
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(folder / name, tmp_path / name)
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:  # the folder moved: so did its artifacts
        db.execute("update experiments set artifact_location = replace(artifact_location, ?, ?)", (str(folder), str(tmp_path)))
        db.execute("update runs set artifact_uri = replace(artifact_uri, ?, ?)", (str(folder), str(tmp_path)))
        db.commit()
    shutil.copy(tmp_path / "optuna.db", tmp_path / "optuna.db.backup")
    monkeypatch.chdir(tmp_path)
    argv = ["--config", SWEEP_YAML, "--preset", "smoke", "--set", "num_samples=6", "--resume"]
    damage(tmp_path / "optuna.db")
    before = listing(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        assert main(argv) == 2
    assert err.getvalue().strip().splitlines() == [
        f"gopc2_stability: error: optuna_storage: {tmp_path}/optuna.db is damaged (database disk image is malformed); "
        "restore it from a backup, or move it away and point optuna_storage elsewhere"]
    assert listing(tmp_path) == before and "RUNNING" not in statuses(tmp_path / "mlflow.db")

    os.replace(tmp_path / "optuna.db.backup", tmp_path / "optuna.db")
    writer = Writer(tmp_path / "optuna.db").hold()
    err = Tee("is held by another writer (database is locked); waiting up to")
    releaser = threading.Thread(target=lambda: (err.seen.wait(120), writer.release()), daemon=True)
    releaser.start()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 0, err.getvalue()
    finally:
        writer.release()
        ray.shutdown()  # the driver ran in this process: the next test's ray.init must find no Ray
    assert err.seen.is_set()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(SWEEP)
    parent, = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert parent.info.status == "FINISHED" and "RUNNING" not in statuses(tmp_path / "mlflow.db")
