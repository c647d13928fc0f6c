# The two set-up commands of the README. Each installs what it needs first (idempotent).
PY := .venv/bin/python

.PHONY: sweep test install
install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

# The main job: a small local sweep of GOPC-2 stabilizers at a size where GOPC-2 learns (Ray local, MLflow
# in ./mlflow.db), then the study of its best config against the thesis' own GOPC-2 setting and GOPC-1
# over 3 seeds, ending in the verdict table. (The `smoke` presets are the tests' cheaper runs.)
sweep: install
	$(PY) sweeps/gopc2_stability.py --preset main
	$(PY) sweeps/gopc2_study.py --preset main

# The test suite (CI runs this through .ci/run). System packages first: sshd for the cluster test.
test: install
	bash scripts/ci_system_deps.sh
	$(PY) -m pytest -q
