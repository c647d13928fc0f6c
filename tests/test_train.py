"""The training loop: it learns, the guard stops every non-finite value before the optimizer, resume is
exact, and bad input is refused with one line and nothing written."""
import json
import math
import os

import mlflow
import pytest
import torch
import yaml

from gopc import config as C
from gopc.cli import main
from gopc.stabilizers import STAYS_FINITE
from gopc.train import train

TINY = {
    "data": {"frame_size": 32, "seq_len": 6, "n_train": 512, "n_val": 32, "n_test": 32,
             "speed_min": 1.0, "speed_max": 2.0},
    "model": {"kind": "gopc1", "r_dim": 16, "lstm_dim": 32, "ngf": 8},
    "train": {"steps": 200, "batch_size": 16, "lr": 0.003, "log_every": 20, "ckpt_every": 50, "eval_size": 32},
}
# A GOPC-2 that stays finite (gopc/stabilizers.py's STAYS_FINITE), so that only the injected value can
# trip the guard.
STABLE_GOPC2 = [
    "model.kind=gopc2", "data.frame_size=32", "data.seq_len=6", "data.n_train=64", "data.n_val=8",
    "data.n_test=8", "model.r_dim=16", "model.ngf=8", "model.hyper_hidden=16", "train.batch_size=8",
    "train.steps=6", "train.ckpt_every=2", "train.log_every=1", "train.eval_size=8",
    *(f"{k}={v}" for k, v in STAYS_FINITE.items()),
]


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_gopc1_trains_and_logs_everything_to_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the run lasts several seconds
    cfg_path = write_yaml(tmp_path / "run.yaml", TINY)
    assert main(["train", "--config", cfg_path, "--out", "runs/r", "--quiet"]) == 0
    out = capsys.readouterr().out

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["gopc"], output_format="list")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps, losses = [m.step for m in history], [m.value for m in history]
    assert steps[0] == 1 and steps[-1] == 200 and set(range(20, 201, 20)) <= set(steps)
    assert losses[-1] <= 0.5 * losses[0], losses  # 200 CPU steps at least halve the training loss
    assert run.data.params["train.lr"] == "0.003" and run.data.tags["status"] in ("learned", "collapsed")
    assert f"outcome: {run.data.tags['status']}:" in out  # the printed outcome is the one MLflow holds
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint.pt", "eval"} <= artifacts
    images = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step-200")}
    assert {"eval/step-200/inference.png", "eval/step-200/rollout.png", "eval/step-200/curves.json"} <= images
    curves = json.load(open(client.download_artifacts(run.info.run_id, "eval/step-200/curves.json")))
    assert len(curves["posterior"]["mse"]) == 6 and len(curves["prior"]["ssim"]) == 5  # per step, t >= 1 for the prior
    logged_cfg = C.from_dict(yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml"))))
    assert logged_cfg == C.from_dict(TINY)  # the saved file alone reproduces the run
    assert 50 < run.data.metrics["train/peak_mem_mb"] < 20_000  # the process's peak resident memory on a CPU
    assert "system/cpu_utilization_percentage" in run.data.metrics and "system/system_memory_usage_megabytes" in run.data.metrics
    (data,) = client.get_run(run.info.run_id).inputs.dataset_inputs  # the data config as a dataset input
    assert data.dataset.name == "smooth-mnist-32px-6f-1digit" and '"data.n_train": "512"' in data.dataset.source

    # The thesis' errors, each beside the blank-frame score; the model beats a blank frame.
    m = json.load(open("runs/r/eval/metrics.json"))
    for section in ("posterior", "prior"):
        assert m[f"{section}/mse"] < m[f"{section}/blank_mse"], (section, m)
    assert "posterior" in out and "blank" in out and "rollout" in out


@pytest.mark.parametrize("site", ["loss", "param_grad", "z0_grad", "rh_grad"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_guard_stops_in_the_step_a_non_finite_value_appears(tmp_path, site, value):
    cfg = C.load(None, STABLE_GOPC2 + [f"train.inject={site}@3:{value}"])
    result = train(cfg, str(tmp_path / "run"), progress=False)
    rec = result.divergence
    assert result.status == "diverged" and rec.step == 3 and rec.quantity == site
    assert len(result.losses) == 3  # steps 0-2 were taken, step 3 never reached the optimizer
    assert rec.max_grad_norm_before > 0 and math.isfinite(rec.max_grad_norm_before)
    assert rec.last_checkpoint == str(tmp_path / "run" / "checkpoint.pt")
    state = torch.load(rec.last_checkpoint, weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())
    saved = json.load(open(tmp_path / "run" / "divergence.json"))
    expected = value if site == "loss" else value.lstrip("-")  # gradients are recorded by their norm
    assert saved["step"] == 3 and saved["quantity"] == site and saved["value"] == expected


def test_guard_catches_a_finite_value_that_overflows_the_next_computation(tmp_path):
    cfg = C.load(None, STABLE_GOPC2 + ["train.inject=overflow@2"])
    result = train(cfg, str(tmp_path / "run"), progress=False)
    assert result.status == "diverged" and result.divergence.step == 2


def test_naive_gopc2_diverges_and_the_process_exits_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    naive = ["model.kind=gopc2", "data.frame_size=32", "data.seq_len=10", "data.n_train=64", "data.n_val=8",
             "data.n_test=8", "model.r_dim=32", "model.ngf=8", "train.batch_size=8", "train.steps=20",
             "train.eval_size=8"]
    args = ["train", "--no-mlflow", "--quiet", "--out", "run"]
    assert main(args + sum((["--set", s] for s in naive), [])) == 0
    assert "diverged at step" in capsys.readouterr().out
    record = json.load(open("run/divergence.json"))
    assert record["quantity"] in {"z0_grad", "rh_grad", "loss", "param_grad"}


def test_resume_follows_the_uninterrupted_loss_curve(tmp_path):
    base = [f"{k}={v}" for k, v in _flat(TINY)] + ["data.n_train=128", "train.ckpt_every=20"]
    full = train(C.load(None, base + ["train.steps=40"]), str(tmp_path / "full"), progress=False)
    first = train(C.load(None, base + ["train.steps=20"]), str(tmp_path / "part"), progress=False)
    resumed = train(C.load(None, base + ["train.steps=40"]), str(tmp_path / "part"),
                    resume_from=str(tmp_path / "part" / "checkpoint.pt"), progress=False)
    assert first.losses == full.losses[:20]
    assert resumed.losses == full.losses[20:]  # bit-identical on the CPU


def _flat(d):
    return [(f"{s}.{k}", v) for s, sec in d.items() for k, v in sec.items()]


@pytest.mark.parametrize("override, field", [
    ("model.colour=red", "model.colour"),
    ("train.steps=many", "train.steps"),
    ("train.lr=-0.001", "train.lr"),
    ("data.source=/no/such/mnist", "data.source"),
    ("stab.mixture_act=softmax", "stab.mixture_act"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, override, field):
    monkeypatch.chdir(tmp_path)
    cfg_path = write_yaml(tmp_path / "run.yaml", TINY)
    before = set(os.listdir(tmp_path))
    assert main(["train", "--config", cfg_path, "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err
    assert set(os.listdir(tmp_path)) == before  # no run folder, no mlflow.db


def test_yaml_syntax_error_names_the_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line" in err and len(err.strip().splitlines()) == 1


def test_missing_mnist_files_in_an_existing_folder_are_refused_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mnist").mkdir()
    cfg_path = write_yaml(tmp_path / "run.yaml", TINY)
    assert main(["train", "--config", cfg_path, "--set", f"data.source={tmp_path}/mnist", "--out", "r"]) == 2
    assert "data.source" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_from_another_folder_continues_the_same_mlflow_run(tmp_path, monkeypatch):
    """The default tracking URI (./mlflow.db) is where the run started, not where --resume is typed;
    the run folder may also be named by its checkpoint.pt."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg_path = write_yaml(tmp_path / "run.yaml", TINY)
    short = ["--set", "data.n_train=64", "--set", "train.log_every=5", "--set", "train.ckpt_every=5"]
    assert main(["train", "--config", cfg_path, "--out", "r", "--quiet", "--set", "train.steps=10", *short]) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--resume", "../a/r/checkpoint.pt", "--quiet", "--set", "train.steps=20"]) == 0
    assert os.listdir(tmp_path / "b") == []  # no second database, no run folder here

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/a/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("gopc").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 5, 10, 15, 20]
    assert run.info.status == "FINISHED" and run.data.tags["status"] in ("learned", "collapsed")


def test_yaml_merge_keys_still_override(tmp_path):
    """The loader that refuses a key written twice still lets a `<<: *anchor` merge be overridden."""
    path = tmp_path / "run.yaml"
    path.write_text("x: &base {lr: 0.01, steps: 5}\ntrain:\n  <<: *base\n  steps: 7\n")
    assert C.load_yaml(str(path))["train"] == {"lr": 0.01, "steps": 7}


def test_the_registered_model_loads_and_scores_as_its_checkpoint(tmp_path, monkeypatch):
    """mlflow.register_as: the finished model is a registered version that mlflow.pytorch.load_model gives
    back, with the checkpoint's loss on the same batch (and not an untrained model's)."""
    import mlflow.pytorch

    from gopc.data import build_datasets, to_float
    from gopc.models import build_model
    from gopc.checkpoint import load_checkpoint
    monkeypatch.chdir(tmp_path)
    cfg_path = write_yaml(tmp_path / "run.yaml", TINY)
    assert main(["train", "--config", cfg_path, "--out", "r", "--quiet", "--set", "train.steps=30",
                 "--set", "mlflow.register_as=gopc1-tiny"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (version,) = client.search_model_versions("name = 'gopc1-tiny'")
    (run,) = client.search_runs([client.get_experiment_by_name("gopc").experiment_id])
    assert int(version.version) == 1 and version.run_id == run.info.run_id
    cfg = C.from_dict(TINY)
    x = to_float(build_datasets(cfg.data)["val"][:8])

    def loss(model) -> float:
        torch.manual_seed(0)  # the same noise for every model
        with torch.no_grad():
            return model.eval()(x, 1.0)[0].item()
    registered = mlflow.pytorch.load_model("models:/gopc1-tiny/1")
    from_checkpoint = build_model(cfg)
    load_checkpoint("r/checkpoint.pt", from_checkpoint, cfg)
    torch.manual_seed(1)
    assert loss(registered) == loss(from_checkpoint) != loss(build_model(cfg))



def test_a_run_that_raises_ends_its_mlflow_run_failed(tmp_path, monkeypatch):
    """Not a signal, not a divergence: an error mid-training (train.inject=raise) leaves no RUNNING run."""
    monkeypatch.chdir(tmp_path)
    cfg_path = write_yaml(tmp_path / "run.yaml", TINY)
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["train", "--config", cfg_path, "--out", "r", "--quiet", "--set", "train.inject=raise@3"])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("gopc").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["status"] == "errored"


def test_a_busy_tracking_database_is_named_busy_not_foreign(tmp_path, monkeypatch):
    """Another writer's lock on mlflow.db is not damage: the line says the database is held, and by what."""
    import sqlite3

    from gopc import run_tracking as tracking
    from gopc.errors import ConfigError
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("create table experiments (id integer)")
    holder.execute("begin exclusive")
    monkeypatch.setenv("GOPC_BUSY_WAIT", "0.2")
    try:
        with pytest.raises(ConfigError, match=r"^mlflow.tracking_uri: .*mlflow.db is held by another writer \(database "
                                              r"is locked for over 0.2 s\); let that process finish or stop it"):
            tracking.check_tracking(f"sqlite:///{db}", "mlflow.tracking_uri")
    finally:
        holder.close()
    with pytest.raises(ConfigError, match=r"mlflow.db is a damaged or half-created MLflow database"):
        tracking.check_tracking(f"sqlite:///{db}", "mlflow.tracking_uri")  # released: a table, but no MLflow in it


def _train_diverging(ckpt_every: int) -> int:
    """`gopc train --out cut` of a small GOPC-1 whose loss goes NaN at step 3, a checkpoint every `ckpt_every` steps."""
    sets = [f"{k}={v}" for k, v in _flat(TINY)] + [
        "data.n_train=64", "data.n_val=8", "data.n_test=8", "train.batch_size=8", "train.eval_size=8",
        "train.steps=6", f"train.ckpt_every={ckpt_every}", "train.inject=loss@3:nan"]
    return main(["train", "--no-mlflow", "--quiet", "--out", "cut"] + sum((["--set", s] for s in sets), []))


def test_a_run_that_diverged_before_its_first_checkpoint_says_it_has_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train_diverging(ckpt_every=5) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("seed 0: diverged at step 3: loss went nan; no finite "
                                                       "checkpoint (it diverged before the first one, due at step 5)")


def test_eval_of_a_diverged_run_says_where_it_diverged_and_which_checkpoint_it_evaluated(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train_diverging(ckpt_every=2) == 0  # checkpoints at step 2, diverges at step 3
    assert "; last finite checkpoint cut/checkpoint.pt" in capsys.readouterr().out
    assert main(["eval", "cut", "--n", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "cut diverged at step 3 (cut/divergence.json); evaluated its last finite checkpoint, from step 2")


def test_runs_started_in_the_same_second_get_folders_of_their_own(monkeypatch):
    """The default run folder (--out not given) is train.out_dir/KIND-sSEED-TIME-PID: two `gopc train` started
    in one clock second no longer share it (the second would find it in use, or land on the first's run)."""
    from gopc import cli
    cfg = C.from_dict(TINY)
    folders = set()
    for pid in (4242, 4243):  # two processes, one second
        monkeypatch.setattr(os, "getpid", lambda: pid)
        folders.add(cli._default_run_dir(cfg, 0, "20261203-120000"))
    assert folders == {"runs/gopc1-s0-20261203-120000-4242", "runs/gopc1-s0-20261203-120000-4243"}


def test_every_run_reads_past_the_first_page_of_a_search(tmp_path):
    """A sweep of more than 1,000 trials: MLflow answers a search 1,000 runs a page (recovery reads them all)."""
    import mlflow

    from gopc.run_tracking import every_run
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("paged")
    made = {client.create_run(exp, tags={"role": "trial"}).info.run_id for _ in range(5)}
    client.create_run(exp, tags={"role": "parent"})
    assert {r.info.run_id for r in every_run(client, exp, "tags.role = 'trial'", page_size=2)} == made
