"""A kind of experiment is one module: a third kind (here a seed re-run of one config) is a `run.Kind`
built outside gopc/sweep/run.py, and the one driver runs it with its trials, MLflow parent and view."""
import os
from dataclasses import dataclass, field

import mlflow
import yaml
from conftest import tiny

from gopc import config as C
from gopc import outcome as O
from gopc.sweep import run as R
from gopc.sweep import settings as S


@dataclass
class Reruns(S.Common):
    name: str = "reruns"
    seeds: list[int] = field(default_factory=lambda: [0, 1])


def load(path, preset=None, overrides=None) -> Reruns:
    raw = S.resolve(C.load_yaml(path), preset, overrides, Reruns, "reruns")
    s = S.parse_common(raw, Reruns, "reruns", ("seeds",))
    s.seeds = C.coerce("reruns.seeds", list[int], raw.get("seeds", s.seeds))
    return s


def tune_setup(s: Reruns):
    from ray import tune
    return tune.TuneConfig(num_samples=1, max_concurrent_trials=s.max_concurrent), \
        {"train.seed": tune.grid_search(s.seeds)}, {"train.seed": "seed"}


def finish(s: Reruns, results, parent: str) -> list[str]:
    words = sorted(O.of_trial(r.metrics, r.error is not None, C.from_dict(s.base).train.steps) for r in results)
    return [f"re-runs: {', '.join(words)}"]


RERUNS = R.Kind("reruns", "the same config over seeds", load, tune_setup, finish,
                parent_params=lambda s: {"reruns.seeds": s.seeds}, n_trials=lambda s: len(s.seeds),
                view=lambda s: (["train.seed"], None), noun="re-run")


def test_a_third_kind_runs_through_the_one_driver_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "local")  # a Ray of its own, never another test's cluster
    (tmp_path / "reruns.yaml").write_text(yaml.safe_dump({
        "name": "reruns", "seeds": [0, 1], "report_every": 2, "resources": {"cpu": 1, "gpu": 0},
        "base": tiny(train={"steps": 2, "eval_size": 4})}))
    assert R.main([], str(tmp_path / "reruns.yaml"), RERUNS) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "re-runs: collapsed, collapsed" in out, out  # 2 steps learn nothing, and the output says so
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("reruns").experiment_id], "tags.role = 'trial'")
    assert sorted(r.data.params["train.seed"] for r in runs) == ["0", "1"]
    assert {r.data.tags["status"] for r in runs} == {O.COLLAPSED}
    assert os.path.isdir(tmp_path / "sweep_results" / "reruns")
