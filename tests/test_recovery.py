"""The Optuna study lives in a database that commits every ask and tell, so a killed driver leaves it
ahead of Tune's snapshot. Each combination is built here from real objects on a real SQLite study, and
the repair must leave no Optuna trial RUNNING for ever, every start point still to run, and the
generator counting right; the searcher Tune restores reads its trials from the study, not its pickle."""
import json
import os

import pytest
from optuna.trial import TrialState
from ray.tune import PlacementGroupFactory
from ray.tune.experiment.trial import Trial

from gopc.errors import GopcError
from gopc.sweep import settings as S
from gopc.sweep.recovery import align, align_snapshot
from gopc.sweep.searcher import TUNE_ID, DivergenceAwareOptunaSearch, open_storage, open_study
from gopc.sweep.space import SearchSpace

SPACE = {"stab.inner_lr_h": {"low": 0.01, "high": 1.0, "log": True}, "stab.out_act": {"choices": ["none", "sigmoid"]}}
START = [{"stab.inner_lr_h": 0.5, "stab.out_act": "sigmoid"}, {"stab.inner_lr_h": 0.1, "stab.out_act": "none"}]


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path}/optuna.db"


def searcher(db, start=None, name="sweep"):
    space = S.parse_space(SPACE, {"model": {"kind": "gopc2"}})
    return DivergenceAwareOptunaSearch(space=SearchSpace(space), metric="objective", mode="min", seed=0,
                                       total_steps=100, points_to_evaluate=start, storage=open_storage(db),
                                       study_name=name)


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


def states(db, name="sweep"):
    return [t.state for t in open_study(name, db).trials]


def test_every_trial_carries_its_tune_id_and_is_in_storage_at_once(db):
    s = searcher(db)
    s.suggest("a")
    s.on_trial_complete("a", {"objective": 0.2, "diverged": 0.0, "step": 100})
    s.suggest("b")
    (a, b) = open_study("sweep", db).trials  # another connection sees both: nothing waits for a save
    assert (a.user_attrs[TUNE_ID], a.state, a.value) == ("a", TrialState.COMPLETE, 0.2)
    assert (b.user_attrs[TUNE_ID], b.state) == ("b", TrialState.RUNNING)


def test_the_restored_searcher_reads_its_trials_from_the_study_not_its_pickle(db, tmp_path):
    s = searcher(db)
    s.suggest("a")
    s.save(str(tmp_path / "searcher.pkl"))  # Tune's snapshot, taken before the rest happened
    s.suggest("b")
    s.on_trial_complete("a", {"objective": 0.2, "diverged": 0.0, "step": 100})
    restored = DivergenceAwareOptunaSearch(total_steps=1)  # as Tune builds it: the pickle brings the rest
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert set(restored._ot_trials) == {"a", "b"} and restored._completed_trials == {"a"}
    restored.on_trial_complete("b", {"objective": 0.1, "diverged": 0.0, "step": 100})
    assert states(db) == [TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_trial_only_the_study_knows_is_failed_and_suggested_again(db):
    s = searcher(db)
    a, _ = s.suggest("a"), s.suggest("b")
    s._ot_study.ask()  # killed between an ask and its tune id
    gen = generator(2, {"a", "b"})
    repair = align(searcher(db), gen, [tune_trial("a", a)])
    assert repair.orphans == ["b", "#2"] and repair.changed
    assert states(db) == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]
    assert gen["counter"] == 1 and gen["name:ConcurrencyLimiter"]["live_trials"] == {"a"}


def test_a_finished_trial_the_snapshot_lost_is_run_again_and_listed_once(db):
    s = searcher(db)
    a, _ = s.suggest("a"), s.suggest("b")
    s.on_trial_complete("b", {"objective": 0.3, "diverged": 0.0, "step": 100})  # told after the last snapshot
    gen = generator(2, {"a"})
    assert align(searcher(db), gen, [tune_trial("a", a)]).orphans == ["b"] and gen["counter"] == 1
    assert open_study("sweep", db).user_attrs["orphans"] == [1]  # gopc best skips it: its run is deleted
    assert not align(searcher(db), gen, [tune_trial("a", a)]).changed  # repaired once, for good


def test_a_start_point_the_snapshot_lost_is_queued_again(db):
    s = searcher(db, START)
    assert s.suggest("a") == START[0]
    repair = align(searcher(db), generator(1, {"a"}), [])
    assert repair.orphans == ["a"]
    again = searcher(db)
    again.reload_trials()
    assert [again.suggest("b"), again.suggest("c")] == [START[1], START[0]]


def test_trials_that_finished_unseen_by_the_study_are_told_and_none_stays_running(db):
    s = searcher(db)
    a, b = s.suggest("a"), s.suggest("b")
    diverged = {"objective": 1e6, "diverged": 1.0, "step": 7}
    snapshot = [tune_trial("a", a, Trial.TERMINATED, diverged), tune_trial("b", b, Trial.ERROR)]
    repair = align(searcher(db), generator(2, set()), snapshot)
    assert sorted(repair.told) == ["a", "b"]
    study = open_study("sweep", db).trials
    assert [t.state for t in study] == [TrialState.COMPLETE, TrialState.FAIL]
    assert study[0].user_attrs["status"] == "diverged" and study[0].constraints["diverged"] > 1
    assert not align(searcher(db), generator(2, set()), snapshot).changed  # repaired for good


def test_an_intact_snapshot_is_left_alone(db):
    s = searcher(db)
    a = s.suggest("a")
    assert not align(searcher(db), generator(1, {"a"}), [tune_trial("a", a)]).changed
    assert not align(searcher(db), generator(1, {"a"}, total=1), [tune_trial("a", a)]).changed


def test_a_study_that_does_not_know_tunes_trials_is_refused(db, tmp_path):
    a = searcher(db).suggest("a")
    elsewhere = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(GopcError, match="optuna_storage the sweep started with"):
        align(searcher(elsewhere), generator(1, {"a"}), [tune_trial("a", a)])


def test_two_sweeps_sharing_one_storage_keep_their_trials_apart(db):
    one, two = searcher(db, name="one"), searcher(db, name="two")
    one.suggest("a")
    two.suggest("b")
    two.suggest("c")
    one.on_trial_complete("a", {"objective": 0.2, "diverged": 0.0, "step": 100})
    assert [t.user_attrs[TUNE_ID] for t in open_study("one", db).trials] == ["a"]
    assert [t.user_attrs[TUNE_ID] for t in open_study("two", db).trials] == ["b", "c"]
    repair = align(searcher(db, name="two"), generator(1, {"b"}), [tune_trial("b", {})])
    assert repair.orphans == ["c"] and states(db, "one") == [TrialState.COMPLETE]


def write_state(folder, trials):
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [list(t.get_json_state()) for t in trials], "runner_data": {}}))


def test_a_kill_before_the_first_snapshot_was_complete_starts_the_sweep_over(db, tmp_path):
    experiment = tmp_path / "sweep"
    experiment.mkdir()
    write_state(experiment, [tune_trial("a", START[0])])  # the searcher's files never made it to storage
    for name in ("tuner.pkl", "run_trial_a_1_x/result.json", "notes.txt"):
        (experiment / name).parent.mkdir(exist_ok=True)
        (experiment / name).write_text("x")
    s = searcher(db, START)
    s.suggest("a")
    repair = align_snapshot(str(experiment), s)
    assert repair.restart and "starting it over" in str(repair)
    assert sorted(os.listdir(experiment)) == ["notes.txt"]
    with pytest.raises(GopcError, match="no Optuna study named 'sweep'"):  # its start points are queued anew
        open_study("sweep", db)


def test_a_snapshot_with_finished_trials_and_no_searcher_is_refused_and_kept(db, tmp_path):
    write_state(tmp_path, [tune_trial("a", START[0], Trial.TERMINATED, {"objective": 0.1, "step": 100})])
    with pytest.raises(GopcError, match="--set name=NEW"):
        align_snapshot(str(tmp_path), searcher(db))
    assert sorted(os.listdir(tmp_path)) == ["experiment_state-2026-01-01_00-00-00.json", "optuna.db"]


class _Loud:
    """Writes a file when unpickled: whole() must read a snapshot without running any of it."""
    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        with open(state["path"], "w") as f:
            f.write("ran")


def test_a_searchers_saved_state_is_whole_and_every_cut_of_it_is_not(db, tmp_path):
    """The good copies of the snapshot (gopc/sweep/snapshot.py) keep a searcher state only when whole():
    the real pickle Tune writes is, every prefix of it (a copy cut short by a full disk) is not, and
    reading it runs none of its code."""
    from gopc.sweep.snapshot import whole
    s = searcher(db, START)
    for tid in "abc":
        s.suggest(tid)
    s.on_trial_complete("a", {"objective": 0.2, "diverged": 0.0, "step": 100})
    s.save(str(tmp_path / "searcher-state-t.pkl"))
    data = (tmp_path / "searcher-state-t.pkl").read_bytes()
    assert whole("searcher-state-t.pkl", data)
    assert [n for n in range(len(data)) if whole("searcher-state-t.pkl", data[:n])] == []

    import pickle
    loud = pickle.dumps({"x": _Loud(str(tmp_path / "ran.txt"))})
    assert whole("searcher-state-t.pkl", loud) and not (tmp_path / "ran.txt").exists()
    pickle.loads(loud)  # the same bytes do run when really unpickled: the check above can fail
    assert (tmp_path / "ran.txt").read_text() == "ran"
