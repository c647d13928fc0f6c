"""The sweep service, end to end on local Ray: MLflow structure, diverged trials, the Optuna study,
best-config export and bad search spaces (a driver killed and resumed: test_faults.py)."""
import os
import re

import optuna
import pytest
import ray
import yaml

from gopc.cli import main as gopc_main
from gopc.errors import ConfigError
from gopc.sweep import settings as S
from gopc.sweep.search import main as sweep_main
from gopc.sweep.searcher import DivergenceAwareOptunaSearch
from gopc.sweep.space import SearchSpace
from gopc.outcome import MLFLOW_STATUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_YAML = os.path.join(ROOT, "sweeps", "gopc2_stability.yaml")
TERMINAL = {"learned", "collapsed", "diverged", "stopped early", "errored"}


def runs_of(client, role):
    exp = client.get_experiment_by_name("gopc2_stability")
    return client.search_runs([exp.experiment_id], f"tags.role = '{role}'")


def test_mlflow_holds_one_parent_and_a_complete_child_per_trial(smoke):
    folder, settings, client = smoke
    (parent,) = runs_of(client, "parent")
    children = runs_of(client, "trial")
    assert len(children) == 6 and len({c.data.tags["trial_id"] for c in children}) == 6
    statuses = [c.data.tags["status"] for c in children]
    assert set(statuses) <= TERMINAL and "diverged" in statuses and {"learned", "collapsed"} & set(statuses)
    trained = [c for c in children if "train/loss" in c.data.metrics]  # not one that diverged at step 0
    validated = [c for c in children if "val/prior/mse" in c.data.metrics]
    assert trained and validated
    for child in trained:  # for choosing resources.gpu: what a trial's process held at most
        assert 50 < child.data.metrics["train/peak_mem_mb"] < 20_000
    for child in validated:  # its grids at each validation, for the Image grid
        images = [a.path for a in client.list_artifacts(child.info.run_id, "images")]
        validations = client.get_metric_history(child.info.run_id, "val/prior/mse")
        for key in ("predictions~inference", "predictions~rollout"):
            steps = {int(p.split("+step+")[1].split("+")[0]) for p in images if p.startswith(f"images/{key}+")}
            assert steps == {m.step for m in validations}, (key, steps)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["model.kind"] == "gopc2" and "stab.out_act" in child.data.params
        status = child.data.tags["status"]
        assert child.info.status == MLFLOW_STATUS[status], (status, child.info.status)  # the UI's icon
        assert f"out_act={child.data.params['stab.out_act']}" in child.info.run_name  # named by its values
        assert "objective" not in child.data.metrics  # one name: val/prior/mse; never the penalty
        for key in child.data.metrics:
            assert settings.penalty not in [m.value for m in client.get_metric_history(child.info.run_id, key)], key
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "config.yaml" in artifacts
        if child.data.tags["status"] in ("learned", "collapsed", "stopped early"):  # stopped ones show their last grids
            images = {a.path for a in client.list_artifacts(child.info.run_id, "eval")}
            assert {"eval/inference.png", "eval/rollout.png"} <= images
            assert "val/prior/mse" in child.data.metrics
        if child.data.tags["status"] == "diverged":
            assert "divergence.json" in artifacts and child.data.tags["diverged_quantity"]
            step = int(child.data.tags["diverged_step"])
            assert child.data.metrics["diverged_step"] == step and child.data.metrics["diverged"] == 1
            assert "max_grad_norm_before" in child.data.metrics
            # the blow-up's approach: the loss of the last finite step, logged at the divergence (none at step 0)
            losses = client.get_metric_history(child.info.run_id, "train/loss")
            assert max((m.step for m in losses), default=0) == step
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    best = next(c for c in children if c.info.run_id == parent.data.tags["best_run_id"])
    assert best.data.tags["trial_id"] == parent.data.tags["best_trial"]
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith(f"{len(children)} trials: ") and f"{statuses.count('diverged')} diverged" in description
    assert parent.data.params["sweep.stab.out_act"].startswith("searched: ")  # not the base value
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_config.yaml", "search_space.yaml", "outcome_by_stabilizer.png",
            "optimisation_history.png", "param_importances.png", "parallel_coordinate.png", "slice.png"} <= parent_files
    assert parent.data.metrics["n_trials"] == 6 and parent.data.metrics["n_diverged"] >= 1


def test_diverged_trials_end_in_the_step_their_guard_fired(smoke):
    folder, settings, client = smoke
    from ray.tune import ExperimentAnalysis
    frames = ExperimentAnalysis(settings.experiment_path).trial_dataframes
    diverged = [df for df in frames.values() if df["diverged"].iloc[-1] == 1]
    assert diverged
    for df in diverged:
        assert (df["diverged"].iloc[:-1] == 0).all()  # nothing was reported after the divergence
        assert df["step"].iloc[-1] == df["diverged_step"].iloc[-1]
    runs = [c for c in runs_of(client, "trial") if c.data.tags["status"] == "diverged"]
    assert {c.data.tags["trial_id"] for c in runs} == {df["trial_id"].iloc[-1] for df in diverged}  # Tune's, MLflow's
    for child in runs:
        history = client.get_metric_history(child.info.run_id, "diverged")
        assert max(m.step for m in history) == int(child.data.tags["diverged_step"])


def test_the_optuna_study_holds_no_running_trial_and_marks_diverged_ones_infeasible(smoke):
    folder, settings, client = smoke
    study = optuna.load_study(study_name="gopc2_stability", storage=f"sqlite:///{folder}/optuna.db")  # the default
    states = [t.state for t in study.trials]
    assert len(states) == 6 and optuna.trial.TrialState.RUNNING not in states
    diverged = [t for t in study.trials if t.user_attrs.get("diverged")]
    finite = [t for t in study.trials if not t.user_attrs.get("diverged") and t.state == optuna.trial.TrialState.COMPLETE]
    assert diverged and finite  # the sweep has both (test_mlflow_holds_one_parent_and_a_complete_child_per_trial)
    for t in diverged:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.constraints["diverged"] > 0
    for t in finite:
        assert t.constraints["diverged"] == 0 and t.value < 1


def test_every_value_in_the_study_is_a_real_validation_named_and_noted(smoke):
    """No penalty in the study: every value and intermediate value is one of the trial's validations as
    MLflow logged them (a diverged trial's value is its last validation, or the blank frame's error before
    any); the objective named; each trial's outcome in its user attrs and its note; the study's note current.
    (Not a multiple of the blank frame's error: an untrained tanh trial honestly scores 15x it.)"""
    from optuna_dashboard._note import get_note  # the dashboard's own reader of save_note's format
    folder, settings, client = smoke
    study = optuna.load_study(study_name="gopc2_stability", storage=f"sqlite:///{folder}/optuna.db")
    trials = runs_of(client, "trial")
    blank = next(r.data.metrics["val/prior/blank_mse"] for r in trials if "val/prior/blank_mse" in r.data.metrics)
    assert study.metric_names == ["prior/mse"]
    for t in study.trials:
        values = [v for v in [t.value, *t.intermediate_values.values()] if v is not None]
        run = next(r for r in trials if r.info.run_id == t.user_attrs["mlflow_run_id"])
        validations = [m.value for m in client.get_metric_history(run.info.run_id, "val/prior/mse")] + [blank]
        assert values and all(v in validations for v in values), (t.number, values, validations)
        status = t.user_attrs["status"]
        note = get_note(optuna.Trial(study, t._trial_id))
        assert note.startswith(f"## Trial {t.number}: {status}")
        assert f"/runs/{t.user_attrs['mlflow_run_id']})" in note  # its MLflow run, one click away
        if status == "diverged":
            assert f"at step {t.user_attrs['diverged_step']}" in note and t.user_attrs["diverged_quantity"] in note
            assert t.value == validations[-2 if len(validations) > 1 else -1]  # its last validation, else blank
            assert not t.intermediate_values or max(t.intermediate_values) < t.user_attrs["diverged_step"]
        else:
            assert "| prior MSE" in note and [k for k in t.system_attrs if k.startswith("artifacts:")]  # its grids
    counts = {s: sum(t.user_attrs["status"] == s for t in study.trials) for s in TERMINAL}
    assert counts["diverged"] and sum(counts.values()) > counts["diverged"]  # both kinds of note were read
    note = get_note(study)
    assert "`prior/mse`" in note and f"**{len(study.trials)} trials finished**" in note
    assert all(f"{n} {s}" in note for s, n in counts.items() if n)


def test_best_configs_train_unchanged_and_the_multi_seed_check_reports_survivors(smoke, tmp_path, monkeypatch, capsys):
    folder, settings, client = smoke
    monkeypatch.chdir(folder)
    assert gopc_main(["best", "--sweep", "gopc2_stability", "--top", "2", "-o", str(tmp_path / "best")]) == 0
    trials = runs_of(client, "trial")
    completed = [c for c in trials if c.data.tags["status"] in ("learned", "collapsed")]
    written = sorted(p.name for p in (tmp_path / "best").iterdir())
    assert written == [f"best-{i}.yaml" for i in range(1, min(2, len(completed)) + 1)]  # best first
    best = tmp_path / "best" / "best-1.yaml"
    learned = [c for c in completed if c.data.tags["status"] == "learned"]
    top = min(learned or completed, key=lambda c: c.data.metrics["val/prior/mse"])  # learned ones first
    header = best.read_text().splitlines()[0]
    assert f"trial {top.data.tags['trial_id']} '{top.info.run_name}'" in header
    assert f"prior/mse {top.data.metrics['val/prior/mse']}, {top.data.tags['status']}: validation prior MSE" in header
    assert "against blank" in header and "last frame" in header
    assert yaml.safe_load(best.read_text())["model"]["kind"] == "gopc2"
    assert gopc_main(["train", "--config", str(best), "--out", str(tmp_path / "final"), "--quiet"]) == 0
    assert re.search(r"completed \d+ steps.*\n(.*\n){4}outcome: (learned|collapsed): ", capsys.readouterr().out)
    assert gopc_main(["train", "--config", str(best), "--seeds", "0,1", "--set", "train.steps=4",
                      "--out", str(tmp_path / "seeds"), "--quiet", "--no-mlflow"]) == 0
    assert re.search(r"\d of 2 seeds survived", capsys.readouterr().out)


def test_best_with_a_larger_top_than_the_sweep_finished_says_how_many_it_exported(smoke, tmp_path, monkeypatch, capsys):
    folder, settings, client = smoke
    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert gopc_main(["best", "--sweep", "gopc2_stability", "--top", "99", "-o", str(tmp_path / "all")]) == 0
    n = len([c for c in runs_of(client, "trial") if c.data.tags["status"] in ("learned", "collapsed")])
    assert 0 < n < 99 and len(list((tmp_path / "all").iterdir())) == n
    assert capsys.readouterr().out.splitlines()[0] == (f"gopc best: --top 99, but only {n} trial(s) trained to the "
                                                       "end; exported those")


def test_a_study_arm_asking_more_configs_than_the_sweep_trained_is_refused(smoke, tmp_path, monkeypatch, capsys):
    from gopc.sweep.study import main as study_main
    folder, settings, client = smoke
    monkeypatch.chdir(tmp_path)
    n = len([c for c in runs_of(client, "trial") if c.data.tags["status"] in ("learned", "collapsed")])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "tracking_uri": f"sqlite:///{folder}/mlflow.db", "base": settings.base,
        "arms": [{"name": "gopc2", "sweep": "gopc2_stability", "top": 99}, {"name": "gopc1", "set": {"model.kind": "gopc1"}}]}))
    assert study_main(["--config", "study.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gopc2_study: error: arms[0].top: 99 configs asked, but sweep 'gopc2_stability' has only {n} trial(s) that "
        f"trained to the end; set top to at most {n}"]
    assert sorted(os.listdir(tmp_path)) == ["study.yaml"]


def test_a_sweep_with_nothing_to_export_says_what_became_of_its_trials():
    from gopc.sweep.export import _tally
    study = optuna.create_study()
    for status in ("diverged", "diverged", "stopped early"):
        t = study.ask()
        t.set_user_attr("status", status)
        study.tell(t, 1.0)
    study.ask()
    assert _tally(study) == "4 trials: 2 diverged, 1 running, 1 stopped early"


def test_searcher_steers_away_from_the_region_that_diverges():
    """Divergence iff x > 0.5: with diverged trials told COMPLETE(an honest value) + infeasible, TPE stops
    proposing that region, where FAIL (Ray's default for a raised trial) would teach it nothing."""
    space = S.parse_space({"train.lr": {"low": 0.0001, "high": 0.01, "log": True},
                           "stab.inner_lr_h": {"low": 0.0, "high": 1.0}}, {"model": {"kind": "gopc2"}})
    searcher = DivergenceAwareOptunaSearch(space=SearchSpace(space), metric="objective", mode="min", seed=0,
                                           total_steps=100)
    picks = []
    for i in range(40):
        config = searcher.suggest(f"t{i}")
        x = config["stab.inner_lr_h"]
        picks.append(x > 0.5)
        result = ({"objective": 1e6, "study_value": 0.4, "diverged": 1.0, "step": 3} if x > 0.5
                  else {"objective": 0.05 + abs(x - 0.25), "diverged": 0.0, "step": 100,  # as a trial that learned
                        "learned": 1.0, "val/prior/skill_mse": 0.3})
        searcher.on_trial_complete(f"t{i}", result)
    trials = searcher._ot_study.trials
    diverged = [t for t in trials if t.user_attrs["diverged"]]
    assert diverged and all(t.state == optuna.trial.TrialState.COMPLETE and t.constraints["diverged"] > 1
                            and t.value == 0.4 for t in diverged)  # the trial's study_value, not Tune's penalty
    assert sum(picks[20:]) <= 3, picks  # the second half keeps away from the diverging region


def test_stopped_early_trials_are_pruned_and_errors_fail():
    space = S.parse_space({"stab.inner_lr_h": {"low": 0.0, "high": 1.0}}, {"model": {"kind": "gopc2"}})
    searcher = DivergenceAwareOptunaSearch(space=SearchSpace(space), metric="objective", mode="min", seed=0,
                                           total_steps=100)
    for tid in ("a", "b"):
        searcher.suggest(tid)
    searcher.on_trial_complete("a", {"objective": 0.1, "diverged": 0.0, "step": 40})
    searcher.on_trial_complete("b", None, error=True)
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]


def test_intermediate_values_are_only_real_validations():
    """A divergence's report (Tune's penalty) and a non-finite validation are no intermediate values; a
    trial's last validation, which Tune hands the searcher only with its end, is."""
    space = S.parse_space({"stab.inner_lr_h": {"low": 0.0, "high": 1.0}}, {"model": {"kind": "gopc2"}})
    searcher = DivergenceAwareOptunaSearch(space=SearchSpace(space), metric="objective", mode="min", seed=0,
                                           total_steps=30)
    for tid in ("d", "l"):
        searcher.suggest(tid)
    searcher.on_trial_result("d", {"objective": 0.05, "val/prior/mse": 0.05, "diverged": 0.0, "step": 10})
    searcher.on_trial_result("d", {"objective": 0.05, "val/prior/mse": float("nan"), "diverged": 0.0, "step": 20})
    last = {"objective": 1e6, "study_value": 0.05, "diverged": 1.0, "step": 23}
    searcher.on_trial_result("d", last)
    searcher.on_trial_complete("d", last)
    searcher.on_trial_result("l", {"objective": 0.04, "val/prior/mse": 0.04, "diverged": 0.0, "step": 10})
    searcher.on_trial_complete("l", {"objective": 0.03, "study_value": 0.03, "val/prior/mse": 0.03, "diverged": 0.0,
                                     "step": 30, "learned": 1.0, "val/prior/skill_mse": 0.2})
    d, l = searcher._ot_study.trials
    assert d.intermediate_values == {10: 0.05} and d.value == 0.05 and d.constraints["diverged"] > 0
    assert l.intermediate_values == {10: 0.04, 30: 0.03} and l.value == 0.03 and l.constraints == {"diverged": 0.0, "collapsed": 0.0}
    assert searcher._ot_study.best_trial.number == l.number  # Optuna's best: the feasible (learned) one
    assert searcher._ot_study.metric_names == ["prior/mse"]


BASE = {"model": {"kind": "gopc2"}}


@pytest.mark.parametrize("space, entry", [
    ({"stab.nonsense": {"choices": [1]}}, "space.stab.nonsense"),
    ({"stab.out_act": {"choices": []}}, "space.stab.out_act.choices"),
    ({"train.lr": {"low": 0.01, "high": 0.001}}, "space.train.lr"),
    ({"train.lr": {"low": 0.0, "high": 0.01, "log": True}}, "space.train.lr"),
    ({"stab.out_act": {"choices": ["none", "relu6"]}}, "space.stab.out_act"),
    ({"stab.h_grad_limit": {"low": 0.1, "high": 1, "when": {"stab.h_grad": ["clip_norm"]}}}, "space.stab.h_grad_limit.when"),
    ({"stab.out_act": {"choices": ["none"], "typo": 1}}, "space.stab.out_act"),
    ({"stab.out_act": {"low": 1, "high": 2}}, "space.stab.out_act"),
])
def test_bad_search_spaces_are_refused_naming_the_entry(space, entry):
    with pytest.raises(ConfigError, match=re.escape(entry)):
        S.parse_space(space, BASE)


def test_unknown_setting_and_preset_are_refused():
    raw = yaml.safe_load(open(SWEEP_YAML))
    with pytest.raises(ConfigError, match="--preset"):
        S.parse(dict(raw), "nosuch")
    with pytest.raises(ConfigError, match="sweep.num_sample"):
        S.parse(dict(raw), None, ["num_sample=3"])


def test_more_gpus_per_trial_than_the_cluster_has_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        code = sweep_main(["--config", SWEEP_YAML, "--preset", "smoke", "--set", "resources.gpu=2"])
    finally:
        ray.shutdown()
    assert code == 2
    err = capsys.readouterr().err
    assert "resources.gpu" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_without_a_sweep_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep_main(["--config", SWEEP_YAML, "--preset", "smoke", "--resume"]) == 2
    assert "--resume: no sweep at" in capsys.readouterr().err


def test_objective_window_scores_a_trial_by_the_mean_of_its_last_validations(tmp_path):
    """objective_window k: what Tune and the study are told is the mean of the last k validations, so that a
    trial which peaks and then falls is scored by its fall; k = 1 is the latest validation alone."""
    from gopc.evaluate import add_validation
    from gopc.sweep.trainable import TuneHooks

    class Told(TuneHooks):
        def report(self, metrics, with_checkpoint):
            self.told.append(metrics)

    for window, expected in ((1, [0.5, 0.2, 0.4]), (2, [0.5, 0.35, 0.3]), (5, [0.5, 0.35, 1.1 / 3])):
        hooks, history = Told("prior/mse", 1e6, str(tmp_path / str(window)), 0.1, window), []
        hooks.told = []
        os.makedirs(hooks.run_dir)
        for step, mse in ((100, 0.5), (200, 0.2), (300, 0.4)):
            metrics = {"prior/mse": mse, "prior/skill_mse": 0.2}
            add_validation(hooks.run_dir, history, step, metrics)
            hooks.evaluated(step, metrics, {})
        assert [round(t["objective"], 6) for t in hooks.told] == [round(e, 6) for e in expected], window
        assert [t["study_value"] for t in hooks.told] == [t["objective"] for t in hooks.told]
        assert [t["val/prior/mse"] for t in hooks.told] == [0.5, 0.2, 0.4]  # MLflow still charts each validation
