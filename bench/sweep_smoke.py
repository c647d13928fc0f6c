"""End-to-end wall time of the CPU smoke sweep, against its 5-minute budget.

    python bench/sweep_smoke.py

Runs `python sweeps/gopc2_stability.py --preset smoke` as a subprocess in a fresh temporary folder
(its sweep_results/ and mlflow.db land there and are deleted after), with a Ray instance of its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 300.0


def main() -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("GOPC_STORAGE", "GOPC_TRACKING_URI")}
    env["RAY_ADDRESS"] = "local"  # never join another Ray instance running on this machine
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "gopc2_stability.py"), "--preset", "smoke"]
    with tempfile.TemporaryDirectory(prefix="gopc_sweep_smoke_") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
    print(f"command: python sweeps/gopc2_stability.py --preset smoke (in {tmp}; exit {proc.returncode})")
    print(f"wall time: {seconds:.1f} s   ratio to the {BUDGET_S / 60:.0f}-minute budget: {seconds / BUDGET_S:.2f}"
          f"   ({'within' if seconds <= BUDGET_S else 'over'} budget)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
