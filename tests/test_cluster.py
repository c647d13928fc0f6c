"""Cluster configs: offline validation of cluster/*.yaml, and a real ray up / submit / down
of cluster/local.yaml against a private sshd on 127.0.0.1 (tests/sshd_harness.py).

The `cluster` marker (register it in the project's pytest config) selects/deselects the
slow test: `pytest -m "not cluster"`. It needs openssh-server, rsync and netcat:
`scripts/ci_system_deps.sh` installs them; without them the test FAILS (never skips).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_harness import (  # noqa: E402
    LOCAL_YAML,
    REPO_ROOT,
    HarnessError,
    derive_local_config,
    local_ray_cluster,
    missing_system_tools,
    validate_cluster_config,
)

GPU_YAML = REPO_ROOT / "cluster" / "gpu.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------ offline validation


@pytest.mark.parametrize("path", [GPU_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_committed_cluster_yaml_validates(path):
    prepared = validate_cluster_config(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_yaml_shape():
    """cluster/gpu.yaml against what it must agree with: the project's pins, the sweeps' settings, itself."""
    cfg = _load(GPU_YAML)
    types = cfg["available_node_types"]
    head, worker = types[cfg["head_node_type"]], types["gpu_worker"]
    sweep = _load(REPO_ROOT / "sweeps" / "gopc2_stability.yaml")
    assert 0 < sweep["resources"]["gpu"] and head["resources"]["GPU"] < sweep["resources"]["gpu"]  # no trial on the head
    assert worker["min_workers"] == 0 and 0 < worker["max_workers"] <= cfg["max_workers"]  # idle: no GPU paid for
    spot = worker["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    assert not spot or sweep["max_failures"] > 0  # a reclaimed spot node's trial is retried from its checkpoint
    # the image runs the Ray the project pins, on a Python the project supports
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [d.split("==")[1] for d in project["dependencies"] if d.startswith("ray[")]
    tag = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py3(?P<minor>\d+)-gpu", cfg["docker"]["image"])
    assert tag and tag["ray"] == ray_pin, cfg["docker"]["image"]
    assert int(tag["minor"]) >= int(project["requires-python"].removeprefix(">=3."))
    # what is synced from the checkout (".") is what every node installs
    (synced,) = [dst for dst, src in cfg["file_mounts"].items() if src == "."]
    assert any("pip install" in c and f"-e {synced}" in c for c in cfg["setup_commands"])
    head_cmds = "\n".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])
    port = re.search(r"mlflow server --host 127\.0\.0\.1 --port (\d+)", head_cmds)[1]  # loopback only
    assert f"GOPC_TRACKING_URI=http://127.0.0.1:{port}\\n" in head_cmds  # the sweep logs to that server
    assert "setsid nohup" in head_cmds
    assert "GOPC_STORAGE=s3://" in head_cmds  # storage every node reaches
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    text = GPU_YAML.read_text()
    for secret in ("AKIA", "aws_secret_access_key", "AWS_SECRET"):
        assert secret not in text


def _derived(tmp_path) -> dict:
    return derive_local_config(ssh_user="root", ssh_private_key=str(tmp_path / "id"),
                               ssh_port=2222, cluster_name="t", ray_port=16379,
                               mlflow_port=15000, storage_path=str(tmp_path / "shared"))


@pytest.mark.parametrize("settings", ["gopc2_stability.yaml", "gopc2_study.yaml"])
def test_a_gpu_worker_holds_as_many_trials_as_the_settings_share_its_gpu_between(settings):
    """The full presets' `resources` against cluster/gpu.yaml's gpu_worker: the GPU share, not the CPUs,
    decides how many trials a node runs (it once asked for 2 of a node's 4 CPUs: 2 trials, not 4)."""
    node = _load(GPU_YAML)["available_node_types"]["gpu_worker"]["resources"]
    trial = _load(REPO_ROOT / "sweeps" / settings)["resources"]
    by_gpu, by_cpu = node["GPU"] / trial["gpu"], node["CPU"] / trial["cpu"]
    assert by_gpu == 4 and by_cpu >= by_gpu, (node, trial)


def test_derived_local_yaml_validates(tmp_path):
    cfg = _derived(tmp_path)
    prepared = validate_cluster_config(cfg)
    assert prepared["provider"]["head_ip"] == "127.0.0.1"
    assert prepared["auth"]["ssh_proxy_command"] == "nc 127.0.0.1 2222"
    cmds = "\n".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])
    assert "--port=16379" in cmds and "--port 15000" in cmds
    assert "GOPC_TRACKING_URI=http://127.0.0.1:15000" in cmds
    assert "6379" not in cmds.replace("16379", "") and ":5000" not in cmds


@pytest.mark.parametrize(
    "break_it, reason",
    [
        (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
         "0.5 is not of type 'integer'"),
        (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
         "'node_config' is a required property"),
        (lambda c: c["available_node_types"]["head"].pop("resources"),
         "'resources' is a required property"),
    ],
    ids=["fractional-gpu", "missing-node_config", "missing-resources"],
)
def test_broken_yaml_is_rejected(break_it, reason):
    import jsonschema

    cfg = copy.deepcopy(_load(GPU_YAML))
    break_it(cfg)
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_cluster_config(cfg)
    assert reason in str(err.value)


# ------------------------------------------------------------------ ray up / submit / down

# Stand-in for sweeps/gopc2_stability.py (written elsewhere). A later end-to-end test can
# use the same harness in one line:
#     proc = sshd_harness.run_submit("sweeps/gopc2_stability.py", ["--preset", "smoke"],
#                                    tmp_path=tmp_path)
PLACEHOLDER_DRIVER = textwrap.dedent("""\
    import json, os, sys, time, urllib.request
    import ray
    import gopc

    ray.init()
    res = ray.cluster_resources()
    print("CLUSTER_RESOURCES", json.dumps(res))

    @ray.remote
    def where():
        import gopc  # Ray workers must see the synced project too
        return gopc.__file__

    print("WORKER_GOPC", ray.get(where.remote()))
    print("DRIVER_GOPC", gopc.__file__)
    print("ARGS", json.dumps(sys.argv[1:]))
    for k in ("GOPC_STORAGE", "GOPC_TRACKING_URI", "RAY_AUTH_MODE", "EXTRA"):
        print("ENV", k, os.environ.get(k))
    # The MLflow server local.yaml starts on the head must answer on GOPC_TRACKING_URI.
    uri, deadline = os.environ["GOPC_TRACKING_URI"], time.time() + 90
    while True:
        try:
            print("MLFLOW", urllib.request.urlopen(uri + "/health", timeout=2).read().decode())
            break
        except Exception as e:
            if time.time() > deadline:
                raise SystemExit(f"mlflow server not reachable at {uri}: {e}")
            time.sleep(0.5)
    ray.shutdown()
""")


def test_system_deps_present():
    """Fails (does not skip) with the fix in the message when sshd & co are missing."""
    missing = missing_system_tools()
    assert not missing, (f"missing {', '.join(missing)}: run `sudo bash "
                         f"scripts/ci_system_deps.sh` (Debian/Ubuntu)")


@pytest.mark.cluster
def test_local_cluster_up_submit_sweep_down(tmp_path):
    script = tmp_path / "cluster_smoke.py"
    script.write_text(PLACEHOLDER_DRIVER)
    address_file = Path("/tmp/ray/ray_current_cluster")
    had_address_file = address_file.exists()
    t0 = time.monotonic()
    with local_ray_cluster(tmp_path) as cluster:
        up_s = time.monotonic() - t0
        # Failing script first: it overlaps with the MLflow server's boot on the head.
        failing = tmp_path / "fails.py"
        failing.write_text("raise SystemExit(3)\n")
        assert cluster.submit(failing).returncode != 0
        # Same token on both sides: shipped by local.yaml's file_mounts.
        token = (cluster.client_home / ".ray" / "auth_token").read_text()
        assert token and (cluster.node_home / ".ray" / "auth_token").read_text() == token

        proc: subprocess.CompletedProcess = cluster.submit(
            script, "--flag", "two words", env={"EXTRA": "from-harness"})
        out = proc.stdout
        assert proc.returncode == 0, out[-6000:]
        assert "CLUSTER_RESOURCES" in out and '"CPU"' in out, out[-4000:]
        node_project = str(cluster.node_home / "gopc-sweep" / "gopc")
        assert f"DRIVER_GOPC {node_project}/__init__.py" in out, out[-4000:]
        assert f"WORKER_GOPC {node_project}/__init__.py" in out, out[-4000:]
        assert 'ARGS ["--flag", "two words"]' in out
        assert f"ENV GOPC_STORAGE {cluster.storage_path}" in out
        assert f"ENV GOPC_TRACKING_URI {cluster.tracking_uri}" in out
        assert "ENV RAY_AUTH_MODE token" in out
        assert "ENV EXTRA from-harness" in out
        assert "MLFLOW OK" in out, out[-4000:]

        # The product itself: the sweep, submitted as a user would, logging to the head's MLflow.
        sweep = cluster.submit(REPO_ROOT / "sweeps" / "gopc2_stability.py", "--preset", "smoke",
                               "--set", "num_samples=3", "--set", "base.train.steps=40")
        assert sweep.returncode == 0, sweep.stdout[-6000:]
        assert "best config:" in sweep.stdout and "MLflow UI:" in sweep.stdout
        check_sweep_in_mlflow_and_train_its_best(cluster.tracking_uri, f"sqlite:///{cluster.node_home}/mlflow/optuna.db", tmp_path)
        submit_s = time.monotonic() - t0 - up_s
    total = time.monotonic() - t0
    print(f"\nlocal cluster: up {up_s:.1f}s, submits {submit_s:.1f}s, "
          f"total incl. down+checks {total:.1f}s")
    # Nothing of ours left: the harness raises on leftover processes (Ray, sshd, mlflow,
    # ssh); and ray.init() elsewhere on the box must not be pointed at our (dead) cluster.
    assert not (address_file.exists() and not had_address_file
                and address_file.read_text().strip().endswith(f":{cluster.ray_port}"))


def check_sweep_in_mlflow_and_train_its_best(uri: str, study_storage: str, tmp_path: Path) -> None:
    import mlflow

    from gopc.cli import main as gopc_main

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gopc2_stability")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    children = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
    assert len(parents) == 1 and len(children) == 3
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"trials.csv", "best_config.yaml"}
    out = tmp_path / "best"
    assert gopc_main(["best", "--sweep", "gopc2_stability", "--tracking-uri", uri, "--optuna-storage", study_storage,
                      "-o", str(out)]) == 0
    assert gopc_main(["train", "--config", str(out / "best-1.yaml"), "--no-mlflow", "--quiet",
                      "--out", str(tmp_path / "final")]) == 0
    assert (tmp_path / "final" / "checkpoint.pt").exists()


def test_harness_fails_clearly_without_sshd(tmp_path, monkeypatch):
    import sshd_harness

    monkeypatch.setattr(sshd_harness, "find_sshd", lambda: None)
    with pytest.raises(HarnessError, match="ci_system_deps.sh"):
        with local_ray_cluster(tmp_path):
            pass
