"""The suite's final check: no test leaves a Ray, MLflow or sshd process, or a stale Ray cluster-address
file, behind. Only this session's processes count: those that inherited its marker in their environment
(everything a test starts, Ray's workers included; the cluster test's sshd sets it in its sessions).
Processes already running before the session, and those of other sessions on the same machine (another
engineer's sweep, even from this checkout's virtualenv, or a second test run), are not this suite's to
judge."""
import contextlib
import os
import socket
import sqlite3
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = f"GOPC_TEST_SESSION={os.getpid()}"
os.environ["GOPC_TEST_SESSION"] = str(os.getpid())  # set at import, so every process a test starts has it
# One torch thread per process, in this one (set before torch is imported) and in every process a test
# starts: faster on these 2 cores, and a test's in-process training beside other work on the machine
# does not crawl (OpenMP threads spin when the cores are taken: a 200-step run took 878 s beside a sweep).
os.environ["OMP_NUM_THREADS"] = "1"


def this_session(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return MARK.encode() in f.read().split(b"\0")
    except OSError:  # gone already, or not ours to read
        return False

PATTERNS = ("gcs_server", "raylet", "ray::", "mlflow server", "mlflow.server", "uvicorn", "sshd -D -e -f",
            "dashboard/agent.py", "log_monitor.py", "ray/autoscaler", "optuna-dashboard")
ADDRESS_FILE = "/tmp/ray/ray_current_cluster"


def ours() -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if int(pid) != os.getpid() and any(p in args for p in PATTERNS) and this_session(int(pid)):
            procs[int(pid)] = args
    return procs


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    before = set(ours())
    had_address_file = os.path.exists(ADDRESS_FILE)
    yield
    import ray
    ray.shutdown()
    deadline = time.time() + 30  # processes of the last test may still be on their way out
    while (left := {p: a for p, a in ours().items() if p not in before}) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"processes left behind: {left}"
    assert had_address_file or not os.path.exists(ADDRESS_FILE), f"stale {ADDRESS_FILE} left behind"


def wait_for(predicate, timeout: float, every: float = 0.05):
    """Polls `predicate` until it is true or `timeout` seconds have passed; returns its last value. For
    waiting on a file, a database row or a process: a deadline, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the kernel's pick), for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny run the sweep, study, driver and database tests train: what they watch is the driver, Ray and
# the stores, not the training. A test states only what it changes: tiny(train={"steps": 40}).
TINY = {"data": {"frame_size": 32, "seq_len": 4, "n_train": 32, "n_val": 4, "n_test": 4},
        "model": {"r_dim": 8, "ngf": 4}, "train": {"steps": 4, "batch_size": 4, "eval_size": 4}}


def tiny(**sections: dict) -> dict:
    """TINY with each of `sections`' fields set (a new dict: TINY itself never changes)."""
    return {s: {**TINY.get(s, {}), **sections.get(s, {})} for s in [*TINY, *(s for s in sections if s not in TINY)]}


def base_sets(run: dict) -> list[str]:
    """A run config as a sweep's command line: `--set base.SECTION.FIELD=VALUE` for each of its fields."""
    return [arg for section, fields in run.items() for k, v in fields.items()
            for arg in ("--set", f"base.{section}.{k}={v}")]


def mlflow_rows(db, sql: str, *params, timeout: float = 30) -> list[tuple] | None:
    """The rows `sql` selects from the MLflow SQLite database `db`, opened read-only (a query writes nothing);
    None where there is none: no file yet, not SQLite at all (a bad-input test's garbage file), or not
    MLflow's (an Optuna study, a test's own file, MLflow's tables not made yet)."""
    if not os.path.isfile(db):
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)) as con:
        try:
            tables = {name for (name,) in con.execute("select name from sqlite_master where type = 'table'")}
        except sqlite3.DatabaseError:
            return None
        if not {"experiments", "runs", "metrics", "params", "tags"} <= tables:
            return None
        return con.execute(sql, params).fetchall()


def mlflow_count(db, sql: str, *params, timeout: float = 5) -> int:
    """`select count(*) ...` of an MLflow SQLite database, for a wait: 0 before the database or its tables
    exist, and while a writer holds it past `timeout`."""
    try:
        return (mlflow_rows(db, sql, *params, timeout=timeout) or [(0,)])[0][0]
    except sqlite3.Error:
        return 0


def metric_rows(db, key: str) -> int:
    """How many values of metric `key` an MLflow SQLite database holds (0 before it exists): the driver's
    tracker logs each result at once, so this counts the results it has processed."""
    return mlflow_count(db, "select count(*) from metrics where key = ?", key)


def duplicate_metric_rows(db) -> list[tuple]:
    """(run, key, step, count) of every metric step an MLflow database holds more than once."""
    return mlflow_rows(db, "select run_uuid, key, step, count(*) from metrics group by run_uuid, key, step "
                           "having count(*) > 1 limit 10", timeout=60) or []


@pytest.fixture(autouse=True)
def no_metric_step_twice(tmp_path_factory):
    """Every test that writes MLflow (a sweep, a study, gopc train) leaves no (run, key, step) twice in
    any tracking database it wrote, wherever under the session's temporary folder that lies."""
    start = time.time()
    yield
    for db in tmp_path_factory.getbasetemp().rglob("*.db"):
        if db.is_file() and db.stat().st_mtime >= start - 1:
            assert not (dup := duplicate_metric_rows(db)), f"{db}: metric steps logged twice: {dup}"


SWEEP_YAML = os.path.join(ROOT, "sweeps", "gopc2_stability.yaml")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """One small local sweep (6 trials; trial 0 is the naive baseline), shared by the sweep's assertions
    (test_sweep.py) and the browsers' (test_mlflow_ui.py, test_optuna_dashboard.py)."""
    import mlflow
    import ray

    from gopc.sweep import settings as S
    from gopc.sweep.search import main as sweep_main
    folder = tmp_path_factory.mktemp("sweep")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = sweep_main(["--config", SWEEP_YAML, "--preset", "smoke", "--set", "num_samples=6"])
    finally:
        os.chdir(cwd)
        ray.shutdown()
    assert code == 0
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    settings = S.load(SWEEP_YAML, "smoke", ["num_samples=6", f"storage={folder}/sweep_results"])
    return folder, settings, mlflow.MlflowClient()
