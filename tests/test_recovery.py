"""A driver killed while Tune copies its snapshot leaves the trial list and the searcher state from two
different moments. Each combination is built here from real objects, and the repair must leave every
trial Tune knows in the searcher, no Optuna trial RUNNING for ever, and the generator counting right."""
import json
import os

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune import PlacementGroupFactory
from ray.tune.experiment.trial import Trial

from gopc.errors import GopcError
from gopc.sweep import settings as S
from gopc.sweep.recovery import align, align_snapshot
from gopc.sweep.searcher import DivergenceAwareOptunaSearch
from gopc.sweep.space import SearchSpace

SPACE = {"stab.inner_lr_h": {"low": 0.01, "high": 1.0, "log": True}, "stab.out_act": {"choices": ["none", "sigmoid"]}}
START = [{"stab.inner_lr_h": 0.5, "stab.out_act": "sigmoid"}, {"stab.inner_lr_h": 0.1, "stab.out_act": "none"}]


def searcher(start=None):
    space = S.parse_space(SPACE, {"model": {"kind": "gopc2"}})
    return DivergenceAwareOptunaSearch(space=SearchSpace(space), metric="objective", mode="min", seed=0,
                                       total_steps=100, points_to_evaluate=start)


def tune_trial(tid, config, status=Trial.RUNNING, result=None):
    trial = Trial("run_trial", config=config, trial_id=tid, stub=True,
                  placement_group_factory=PlacementGroupFactory([{"CPU": 1}]))
    trial.create_placement_group_factory()  # as Tune does before it records a trial
    trial.status = status
    if result:
        trial.update_last_result(result)
    return trial


def generator(counter, live, total=4):
    return {"counter": counter, "total_samples": total, "finished": counter >= total, "experiment": None,
            "name:ConcurrencyLimiter": {"live_trials": set(live), "num_unfinished_live_trials": len(live)}}


def states(s):
    return [t.state for t in s._ot_study.trials]


def test_a_trial_only_the_searcher_knows_is_failed_and_suggested_again():
    s = searcher()
    a, _ = s.suggest("a"), s.suggest("b")
    gen = generator(2, {"a", "b"})
    repair = align(s, gen, [tune_trial("a", a)])
    assert repair.orphans == ["b"] and repair.changed
    assert set(s._ot_trials) == {"a"} and states(s) == [TrialState.RUNNING, TrialState.FAIL]
    assert gen["counter"] == 1 and gen["name:ConcurrencyLimiter"]["live_trials"] == {"a"}


def test_a_trial_only_tune_knows_is_given_to_the_searcher_with_its_parameters():
    s, ahead = searcher(), searcher()  # `ahead` is the searcher as it was when Tune recorded b
    s.suggest("a")
    ahead.suggest("a")
    b = ahead.suggest("b")
    gen = generator(1, {"a"})  # the generator state is as stale as the searcher
    repair = align(s, gen, [tune_trial("a", ahead._ot_trials["a"].params), tune_trial("b", b)])
    assert repair.adopted == ["b"] and gen["counter"] == 2
    assert s._ot_trials["b"].params == b
    s.on_trial_complete("b", {"objective": 0.2, "diverged": 0.0, "step": 100})  # Tune resumes b, then reports it
    assert s._ot_study.trials[-1].state == TrialState.COMPLETE and s._ot_study.trials[-1].params == b


def test_a_start_point_tune_already_ran_is_taken_off_the_stale_searchers_queue():
    s = searcher(START)
    s.suggest("a")
    repair = align(s, generator(1, {"a"}), [tune_trial("a", START[0]), tune_trial("b", START[1])])
    assert repair.adopted == ["b"]
    assert TrialState.WAITING not in states(s)  # the second start point is not run a second time
    assert s.suggest("c") not in START


def test_trials_that_finished_unseen_by_the_searcher_are_told_and_none_stays_running():
    s = searcher()
    a, b = s.suggest("a"), s.suggest("b")
    diverged = {"objective": 1e6, "diverged": 1.0, "step": 7}
    repair = align(s, generator(2, set()), [tune_trial("a", a, Trial.TERMINATED, diverged),
                                            tune_trial("b", b, Trial.ERROR)])
    assert sorted(repair.told) == ["a", "b"]
    study = s._ot_study.trials
    assert [t.state for t in study] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study[0].user_attrs["status"] == "diverged" and study[0].constraints["diverged"] > 1
    assert not align(s, generator(2, set()), [tune_trial("a", a, Trial.TERMINATED, diverged),
                                              tune_trial("b", b, Trial.ERROR)]).changed  # repaired for good


def test_an_intact_snapshot_is_left_alone():
    s = searcher()
    a = s.suggest("a")
    assert not align(s, generator(1, {"a"}), [tune_trial("a", a)]).changed
    assert not align(s, generator(1, {"a"}, total=1), [tune_trial("a", a)]).changed
    assert isinstance(s._ot_trials["a"], optuna.Trial)


def write_state(folder, trials):
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [list(t.get_json_state()) for t in trials], "runner_data": {}}))


def test_a_kill_before_the_first_snapshot_was_complete_starts_the_sweep_over(tmp_path):
    write_state(tmp_path, [tune_trial("a", START[0])])  # the searcher's files never made it to storage
    for name in ("tuner.pkl", "run_trial_a_1_x/result.json", "mlflow_pending.pkl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    repair = align_snapshot(str(tmp_path))
    assert repair.restart and "starting it over" in str(repair)
    assert sorted(os.listdir(tmp_path)) == ["mlflow_pending.pkl"]  # the tracker's queue is for forget_orphans


def test_a_snapshot_with_finished_trials_and_no_searcher_is_refused_and_kept(tmp_path):
    write_state(tmp_path, [tune_trial("a", START[0], Trial.TERMINATED, {"objective": 0.1, "step": 100})])
    with pytest.raises(GopcError, match="--set name=NEW"):
        align_snapshot(str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
