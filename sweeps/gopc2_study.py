"""Does GOPC-2 survive every seed, and does it beat GOPC-1 and VAE-1? The final training as a study:
every arm x seed as one Tune trial, then the verdict on the test split (verdict.json, report.md, MLflow).

Locally:      python sweeps/gopc2_study.py --preset smoke      (after the sweep it takes its arm from)
On a cluster: ray submit cluster/gpu.yaml sweeps/gopc2_study.py -- [--preset ...] [--resume]

As for the sweep, `ray submit` copies only this file, so the settings are looked for next to it first,
then in the project the cluster put on every node.
"""
import os
import sys

from gopc.sweep.study import main

HERE = os.path.dirname(os.path.abspath(__file__))
CANDIDATES = [os.path.join(HERE, "gopc2_study.yaml"), os.path.expanduser("~/gopc-sweep/sweeps/gopc2_study.yaml")]

if __name__ == "__main__":
    sys.exit(main(default_config=next((p for p in CANDIDATES if os.path.exists(p)), CANDIDATES[0])))
