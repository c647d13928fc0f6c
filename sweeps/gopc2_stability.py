"""Which stabilizers make GOPC-2 train? Ray Tune + Optuna (TPE) over them, every trial in MLflow.

Locally:      python sweeps/gopc2_stability.py --preset smoke
On a cluster: ray submit cluster/gpu.yaml sweeps/gopc2_stability.py -- [--preset ...] [--resume]

`ray submit` copies only this file to the head, so it imports the installed `gopc` package and looks
for its settings next to itself first, then in the project the cluster put on every node.
"""
import os
import sys

from gopc.sweep.search import main

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [os.path.join(HERE, "gopc2_stability.yaml"), os.path.expanduser("~/gopc-sweep/sweeps/gopc2_stability.yaml")]

if __name__ == "__main__":
    sys.exit(main(default_config=next((p for p in CANDIDATES if os.path.exists(p)), CANDIDATES[0])))
