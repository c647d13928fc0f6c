"""Finite is not trained: the trivial predictions, the learned/collapsed outcome, and the study that
gives the verdict of GOPC-2 against its baselines (arms x seeds on Ray, verdict on the test split)."""
import json
import os

import mlflow
import pytest
import ray
import torch
import yaml

from conftest import tiny
from gopc import config as C
from gopc.outcome import classify
from gopc.metrics import frame_metrics, last_frame_prediction, mean_and_std, skill
from gopc.stabilizers import STAYS_FINITE
from gopc.sweep.study import main as study_main
from gopc.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_YAML = os.path.join(ROOT, "sweeps", "gopc2_study.yaml")
TINY = tiny(model={"lstm_dim": 16, "rh_dim": 4, "hyper_hidden": 8}, train={"steps": 20})


def test_copy_last_frame_matches_a_hand_computation():
    x = torch.zeros(1, 4, 1, 11, 11)  # four frames, one bright pixel each, moving right
    for t in range(4):
        x[0, t, 0, 5, 2 + 2 * t] = 1.0
    one_step = last_frame_prediction(x, 1)  # frame t predicted by frame t-1
    assert torch.equal(one_step, x[:, :3])
    # each predicted frame has two wrong pixels out of 121: MSE 2/121 per frame
    assert mean_and_std(frame_metrics(one_step, x[:, 1:]))["mse"] == pytest.approx(2 / 121)
    rollout = last_frame_prediction(x, 2, context=2)  # after 2 context frames: frame 1 repeated
    assert torch.equal(rollout, x[:, [1, 1]])
    assert mean_and_std(frame_metrics(rollout, x[:, 2:]))["mse"] == pytest.approx(2 / 121)
    # the blank frame misses one pixel per frame: 1/121, better than the copy here, so it is the reference
    assert skill("mse", 0.5 / 121, 1 / 121, 2 / 121) == pytest.approx(0.5)
    assert skill("mse", 3 / 121, 1 / 121, 2 / 121) == pytest.approx(-2.0)
    assert skill("ssim", 0.9, 0.8, 0.6) == pytest.approx(0.5)  # higher is better: (0.9 - 0.8) / (1 - 0.8)


def _learns(tmp_path, lr, steps=300):
    # 32x32 frames, 14-px digits, 6 frames: at lr 3e-3 VAE-1's prior skill is +0.37 after 300 steps (~40 s)
    cfg = C.from_dict({"model": {"kind": "vae1", "r_dim": 32, "ngf": 8, "lstm_dim": 64},
                       "data": {"frame_size": 32, "digit_size": 14, "seq_len": 6, "n_train": 256, "n_val": 16,
                                "n_test": 16},
                       "train": {"steps": steps, "batch_size": 16, "eval_size": 16, "lr": lr, "grad_clip": 1.0,
                                 "log_every": steps, "ckpt_every": steps}})
    return train(cfg, str(tmp_path / f"lr{lr}"), progress=False)


def test_a_model_that_learns_is_learned_and_one_that_cannot_is_collapsed(tmp_path):
    torch.set_num_threads(1)
    learned = _learns(tmp_path, 3e-3)
    # lr 0 is refused: this learning rate leaves the initial weights as they are, so 10 steps are as good as 300
    frozen = _learns(tmp_path, 1e-12, steps=10)
    assert learned.outcome == "learned" and learned.eval["prior/skill_mse"] >= 0.1, learned.eval["prior/skill_mse"]
    assert frozen.outcome == "collapsed" and frozen.eval["prior/skill_mse"] < 0
    for section in ("prior", "rollout"):  # an untrained model is worse than the blank and last frame alike
        assert frozen.eval[f"{section}/mse"] > max(frozen.eval[f"{section}/blank_mse"], frozen.eval[f"{section}/last_mse"])
    assert classify({"prior/skill_mse": 0.1}, 0.1) == "learned" and classify({"prior/skill_mse": float("nan")}, 0.1) == "collapsed"


@pytest.mark.parametrize("skills, word, peak_step", [
    ([0.02, 0.15, 0.29, 0.28, 0.24, 0.12, 0.10], "degraded", 300),  # issue 24's curve: below half its peak at the end
    ([0.02, 0.20, 0.30, 0.15, 0.08], "degraded", 300),  # back below the margin
    ([0.02, 0.06, 0.12, 0.20, 0.31], "learned", 500),  # a monotone learner
    ([0.02, 0.30, 0.25, 0.22, 0.20], "learned", 200),  # settles within half its peak: still learned
    ([0.01, 0.05, 0.08, float("nan"), 0.04], "collapsed", 300),  # never cleared the margin
])
def test_a_run_that_learned_then_unlearned_is_degraded_with_its_peak(tmp_path, skills, word, peak_step):
    """A scripted validation curve, one validation every 100 steps, as train.py and a trial record it;
    the last one decides, with the peak before it."""
    from gopc.evaluate import add_validation, outcome_line, validations
    history = []
    for i, s in enumerate(skills):
        metrics = {"prior/skill_mse": s}
        add_validation(str(tmp_path), history, 100 * (i + 1), metrics)
    assert classify(metrics, 0.1) == word and metrics["prior/peak_step"] == peak_step
    assert outcome_line(metrics, 0.1).startswith(f"outcome: {word}: ")
    if word == "degraded":
        assert f"peaked at {metrics['prior/peak_skill_mse']:+.0%} at step {peak_step}, then fell" in outcome_line(metrics, 0.1)
    # a run resumed from its checkpoint at step 300 keeps the validations up to there, and no later ones
    assert [(v["step"], v["prior/skill_mse"]) for v in validations(str(tmp_path), 300)] == list(zip((100, 200, 300), skills))


def test_a_sweep_trial_that_degraded_is_told_apart_from_learned_and_collapsed():
    """What the searcher, the summary and `gopc best` read: the trial's last report."""
    from gopc.outcome import TRAINED, of_trial
    done = {"step": 600, "diverged": 0.0}
    assert of_trial({**done, "learned": 0.0, "degraded": 1.0}, False, 600) == "degraded"
    assert of_trial({**done, "learned": 1.0, "degraded": 0.0}, False, 600) == "learned"
    assert of_trial({**done, "learned": 0.0, "degraded": 0.0}, False, 600) == "collapsed"
    assert TRAINED == ("learned", "degraded", "collapsed")  # gopc best ranks in this order


def write_study(tmp_path, arms, **extra):
    stays_finite = {k.removeprefix("stab."): v for k, v in STAYS_FINITE.items()}
    gopc2 = {**TINY, "model": {**TINY["model"], "kind": "gopc2"},
             "stab": stays_finite, "train": {**TINY["train"], "inject": "loss@7,seed=1"}}
    (tmp_path / "gopc2.yaml").write_text(yaml.safe_dump(gopc2))
    raw = {"name": "tiny_study", "seeds": [0, 1], "report_every": 10, "max_concurrent": 2,
           "resources": {"cpu": 1, "gpu": 0}, "base": TINY, "arms": arms, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


ARMS = [{"name": "gopc2", "config": "gopc2.yaml"}, {"name": "vae1", "set": {"model.kind": "vae1"}}]
FROZEN = [ARMS[0], {"name": "vae1", "set": {"model.kind": "vae1", "train.lr": 1e-12}}]  # keeps its initial weights: collapses


def test_a_study_gives_survivors_intervals_words_and_one_mlflow_run_per_arm_and_seed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, FROZEN)
    try:
        assert study_main(["--config", path]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "verdict of tiny_study on the test split" in out and "gopc2 vs vae1, prior/mse" in out
    v = json.loads((tmp_path / "sweep_results" / "tiny_study" / "verdict" / "verdict.json").read_text())
    g, b = v["arms"]["gopc2"], v["arms"]["vae1"]
    assert g["model"] == "gopc2" and g["seeds"] == [0, 1] and g["survived"] == 1 and g["diverged"] == {"1": 7}
    assert b["survived"] == 2 and b["diverged"] == {}
    m = b["metrics"]["prior/mse"]
    assert m["n"] == 2 and m["low"] <= m["mean"] <= m["high"] and m["high"] - m["low"] > 0
    assert g["metrics"]["prior/mse"]["n"] == 1  # one survivor: a mean, and no interval
    pairs = [p for p in v["pairs"] if p["a"] == "gopc2" and p["b"] == "vae1"]
    assert {p["metric"] for p in pairs} == {f"{s}/{k}" for s in ("posterior", "prior", "rollout") for k in ("mse", "bce", "ssim")}
    assert b["outcome"] == "collapsed" and g["outcome"] in ("learned", "collapsed")
    # vae1 learned nothing: every pair with it is not comparable, naming it, and nothing is ranked
    assert all(p["word"] == "not comparable" and "vae1 collapsed" in p["why"] for p in pairs)
    assert "gopc2 vs vae1, prior/mse: not comparable: " in out and "vae1 collapsed" in out
    assert not any(w in line for line in out.splitlines() for w in (": better", ": worse", ": equivalent"))
    assert v["survival"] == [{"a": "gopc2", "b": "vae1", "a_survived": 1, "b_survived": 2, "n": 2, "b_n": 2,
                              "p": 1.0, "p_holm": 1.0, "word": "inconclusive"}]
    assert "gopc2 vs vae1: 1 of 2 vs 2 of 2 survived, p 1, Holm 1: inconclusive" in out
    assert all(k in pairs[0] for k in ("p", "p_holm", "g", "seeds_needed")) and v["primary"] == "prior/mse"
    folder = tmp_path / "sweep_results" / "tiny_study" / "verdict"
    assert {"report.md", "rollout_error.png", "survival.png", "predictions.png", "training.png"} <= {p.name for p in folder.iterdir()}
    # over training: the validations at steps 10 and 20 (Tune iterations), over the seeds that survived
    t = b["training"]
    assert t["n"] == 2 and t["steps"] == [10, 20] and len(t["mean"]) == len(t["low"]) == 2
    assert t["final"]["step"] == 20 and t["peak"]["step"] in (10, 20) and t["peak"]["mean"] == max(t["mean"])
    assert set(t["seed_peaks"]) == {"0", "1"} and g["training"]["n"] == 1 and g["training"]["seed_peaks"].keys() == {"0"}
    assert f"  vae1: peak {t['peak']['mean']:+.2f}" in out and "validation prior MSE skill over training" in out

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("tiny_study")
    (parent,) = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    children = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
    assert len(children) == 4 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    statuses = sorted((c.data.params["model.kind"], c.data.params["train.seed"], c.data.tags["status"]) for c in children)
    assert statuses[:2] == [("gopc2", "0", statuses[0][2]), ("gopc2", "1", "diverged")]
    assert statuses[0][2] in ("learned", "collapsed")
    assert all("test/prior/mse" in c.data.metrics for c in children if c.data.tags["status"] != "diverged")
    assert {"verdict.json", "report.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_seed_that_errored_before_it_reported_is_named_and_left_out_of_survival(tmp_path, monkeypatch, capsys):
    """A trial that raises at its first step has no result (Tune gives no config with it): the verdict finds
    its arm and seed in the trial list, lists it as errored, and counts survival over the other seeds."""
    monkeypatch.chdir(tmp_path)
    broken = {"name": "vae1", "set": {"model.kind": "vae1", "train.inject": "raise@0,seed=1"}}
    path = write_study(tmp_path, [ARMS[0], broken], max_failures=0)
    try:
        assert study_main(["--config", path]) == 0
    finally:
        ray.shutdown()
    v = json.loads((tmp_path / "sweep_results" / "tiny_study" / "verdict" / "verdict.json").read_text())
    b = v["arms"]["vae1"]
    assert b["seeds"] == [0, 1] and b["errored"] == [1] and b["survived"] == 1 and b["diverged"] == {}
    (alive,) = v["survival"]
    assert (alive["b_survived"], alive["b_n"]) == (1, 1)  # the errored seed is neither a survivor nor a divergence
    assert "vae1         vae1     1 of 2" in capsys.readouterr().out
    # read back as --resume reads a finished study: Tune's record of the raised trial has no config
    from ray.tune import ExperimentAnalysis, ResultGrid

    from gopc.sweep.study import load
    from gopc.sweep.verdict import collect
    grid = ResultGrid(ExperimentAnalysis(str(tmp_path / "sweep_results" / "tiny_study")))
    assert sum(r.config is None for r in grid) == 1
    runs = collect(load(path), grid)
    assert [(x["seed"], x["status"]) for x in runs["vae1"]] == [(0, runs["vae1"][0]["status"]), (1, "errored")]


def test_a_study_whose_arms_differ_in_data_or_budget_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    arms = ARMS + [{"name": "big", "set": {"model.kind": "gopc1", "data.frame_size": 64}}]
    path = write_study(tmp_path, arms)
    before = set(os.listdir(tmp_path))
    assert study_main(["--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "arms (big): data.frame_size is 64 but the study's base has 32" in err[0] and "allow" in err[0]
    arms = ARMS + [{"name": "long", "set": {"model.kind": "gopc1", "train.steps": 40}}]
    assert study_main(["--config", write_study(tmp_path, arms)]) == 2
    assert "arms (long): train.steps is 40" in capsys.readouterr().err
    assert set(os.listdir(tmp_path)) == before  # no mlflow.db, no sweep_results


@pytest.mark.parametrize("name", ["../../pwn", "a b", "arm/1"])
def test_an_arm_name_that_would_reach_mlflow_or_the_disk_unchecked_is_refused(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"base": TINY, "arms": [{"name": name, "set": {"model.kind": "gopc1"}}]}))
    assert study_main(["--config", "study.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"gopc2_study: error: arms[0].name: {name!r} may hold only letters, digits, '-' and '_'; "
                                "rename it, e.g. gopc2-stable"]
    assert sorted(os.listdir(tmp_path)) == ["study.yaml"]


@pytest.mark.parametrize("key, says", [("train.lr", "'train.lr' needs no allow: only the data and the budget must match"),
                                       ("data.colour", "'data.colour' is not a config field")])
def test_allow_says_which_fields_it_takes(tmp_path, monkeypatch, capsys, key, says):
    """allow lists data or budget fields; a field that may differ anyway, or no field at all, is named as such."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"base": TINY, "arms": ARMS, "allow": [key]}))
    assert study_main(["--config", "study.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "train.steps, train.batch_size, or leave allow empty" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["study.yaml"]
