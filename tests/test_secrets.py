"""No secret leaves the environment: a `gopc train` run with credentials in its environment logs none of
them to MLflow (params, tags, metric names, artifacts, the store itself, the run folder, the console), and
the repository's files hold no credential-looking literal."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import mlflow
import yaml

from gopc.cli import main

ROOT = Path(__file__).resolve().parent.parent

# Fake, but shaped like the real thing (the access key id is assembled so this file matches no pattern).
# MLFLOW_TRACKING_USERNAME is left out on purpose: it is an identity, not a secret, and MLflow records it
# as the run's `mlflow.user` tag.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIA" + "FAKEKEY7TEST1234",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-123abc",
    "AWS_SESSION_TOKEN": "fake-session-token-9f8e7d",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pw-7c1e2a",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-e3d2c1",
    "DATABRICKS_TOKEN": "dapi-fake-0a1b2c3d",
    "RAY_AUTH_TOKEN": "fake-ray-token-5a6b7c",
    "GOPC_TEST_TOKEN": "gopc-test-token-0f9e8d7c",
}

# TINY of test_train.py cut to the bone: only what gets logged matters here, not what is learnt.
TINY_5_STEPS = {
    "data": {"frame_size": 32, "seq_len": 3, "n_train": 16, "n_val": 2, "n_test": 2,
             "speed_min": 1.0, "speed_max": 2.0},
    "model": {"kind": "gopc1", "r_dim": 4, "lstm_dim": 8, "ngf": 2},
    "stab": {"second_order_z": False},
    "train": {"steps": 5, "batch_size": 2, "lr": 0.003, "log_every": 1, "ckpt_every": 5, "eval_size": 2},
}


def _leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        return [name for name, value in SECRETS.items() if value.encode() in text]
    return [name for name, value in SECRETS.items() if value in text]


def test_a_training_run_logs_no_secret_from_the_environment(tmp_path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(TINY_5_STEPS))
    assert main(["train", "--config", "run.yaml", "--out", "runs/r", "--quiet",
                 "--set", f"mlflow.tracking_uri={uri}", "--set", "mlflow.experiment=secrets"]) == 0
    console = capsys.readouterr()
    assert not _leaks(console.out + console.err)

    client = mlflow.MlflowClient(uri)
    runs = [r for exp in client.search_experiments() for r in client.search_runs([exp.experiment_id])]
    assert runs, "the run was not logged, so nothing was checked"
    scanned_files = set()
    for run in runs:
        data = run.data
        assert not _leaks(run.info.run_name or ""), run.info.run_name
        for k, v in {**data.params, **data.tags}.items():
            assert not _leaks(f"{k}={v}"), (run.info.run_id, k)
        for k in data.metrics:
            assert not _leaks(k), k
        dst = tmp_path / "downloaded" / run.info.run_id
        dst.mkdir(parents=True)
        root = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(dst),
                                                        tracking_uri=uri))
        for path in root.rglob("*"):
            if path.is_file():
                scanned_files.add(path.relative_to(root).as_posix())
                assert not _leaks(path.read_bytes()), (run.info.run_id, path)
    assert {"config.yaml", "checkpoint.pt"} <= scanned_files, scanned_files
    assert any(f.endswith(".png") for f in scanned_files), scanned_files

    # the store and the run folder as bytes: whatever MLflow or gopc keeps beyond the API above
    assert not _leaks((tmp_path / "mlflow.db").read_bytes())
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert not _leaks(path.read_bytes()), path


# ------------------------------------------------------------------ the repository itself

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    "password with a literal value": re.compile(
        r"(?i)passw(?:or)?d[ \t]*:[ \t]*(?P<q>[\"']?)(?P<value>[^\s\"'#,}\]]+)(?P=q)"),
}
# what a config may give instead of a real password (a variable, a placeholder)
PLACEHOLDER = re.compile(r"(?i)^(?:\$.*|\{.*|<.*|%\(.*|null|none|~|REPLACE.*|\*+|x+|changeme_placeholder)$")


def _repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # no git or no .git: a source tarball
        skip = {".git", ".venv", "__pycache__", "runs", "mlruns", "sweep_results", ".pytest_cache"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def credential_hits(text: str) -> list[str]:
    hits = []
    for what, pattern in CREDENTIAL_PATTERNS.items():
        for m in pattern.finditer(text):
            if "value" in pattern.groupindex and PLACEHOLDER.match(m.group("value")):
                continue
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"line {line}: {what}: {m.group(0)[:40]!r}")
    return hits


def test_the_patterns_catch_credentials_and_pass_placeholders():
    assert credential_hits("key: " + "AKIA" + "ABCDEFGHIJKLMNOP")
    assert credential_hits("-----BEGIN " + "OPENSSH PRIVATE KEY-----\nabc")
    assert credential_hits("-----BEGIN " + "PRIVATE KEY-----")
    assert credential_hits("db:\n  pass" + "word: hunter2\n")
    assert credential_hits("pass" + "word: 'hunter2'")
    for fine in ("pass" + "word: ${DB_PASSWORD}", "pass" + "word: <your password>", "pass" + "word: null",
                 "pass" + "word: ''", "pass" + "word:\n", "MLFLOW_TRACKING_PASSWORD is read from the environment"):
        assert not credential_hits(fine), fine


def test_no_tracked_file_holds_a_credential():
    files = _repo_files()
    assert len(files) > 10, files
    found = {}
    for path in files:
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:  # binary: images, checkpoints
            continue
        hits = credential_hits(raw.decode("utf-8", errors="replace"))
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    assert not found, found
