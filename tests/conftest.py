"""The suite's final check: no test leaves a Ray, MLflow or sshd process, or a stale Ray cluster-address
file, behind. Processes that were already running before the session (someone's own Ray) are ignored."""
import os
import subprocess
import time

import pytest

PATTERNS = ("gcs_server", "raylet", "ray::", "mlflow server", "mlflow.server", "uvicorn", "sshd -D -e -f",
            "dashboard/agent.py", "log_monitor.py", "ray/autoscaler")
ADDRESS_FILE = "/tmp/ray/ray_current_cluster"


def ours() -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if int(pid) != os.getpid() and any(p in args for p in PATTERNS):
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
