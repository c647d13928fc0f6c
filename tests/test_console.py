"""The commands print their own lines: MLflow's INFO chatter only with --verbose (gopc/console.py)."""
import os
import re
import subprocess
import sys

import yaml

GOPC = os.path.join(os.path.dirname(sys.executable), "gopc")
RUN = {"data": {"frame_size": 32, "seq_len": 4, "n_train": 16, "n_val": 4, "n_test": 4},
       "model": {"kind": "gopc1", "r_dim": 8, "lstm_dim": 8, "ngf": 4},
       "train": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "eval_size": 4}}
LIBRARY_INFO = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO ", re.M)  # MLflow's line format


def gopc_train(folder, *options, env=None) -> str:
    (folder / "run.yaml").write_text(yaml.safe_dump(RUN))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"} | (env or {})
    done = subprocess.run([GOPC, *options, "train", "--config", "run.yaml", "--out", "r", "--quiet"], cwd=folder,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_gopc_train_on_a_fresh_folder_prints_no_info_line_of_mlflow_unless_verbose(tmp_path):
    (tmp_path / "quiet").mkdir()
    (tmp_path / "verbose").mkdir()
    quiet = gopc_train(tmp_path / "quiet")
    assert not LIBRARY_INFO.search(quiet), quiet
    assert "outcome: " in quiet and "pickle" not in quiet.lower()  # its own lines; not MLflow's pickle warning
    verbose = gopc_train(tmp_path / "verbose", "--verbose")
    assert "Creating initial MLflow database tables" in verbose and LIBRARY_INFO.search(verbose), verbose


def test_a_level_the_user_set_for_mlflow_is_kept_without_verbose(tmp_path):
    shown = gopc_train(tmp_path, env={"MLFLOW_LOGGING_LEVEL": "INFO"})
    assert "Creating initial MLflow database tables" in shown, shown
