"""The verdict's statistics on numbers given here (no training): Holm against a hand computation, TOST,
Fisher's exact test of survival, the seeds a difference needs, and the words a verdict gives from them."""
import math

import pytest

from gopc.errors import ConfigError
from gopc.sweep import stats as St
from gopc.sweep.verdict import METRICS, compare, table

NAN = math.nan


def test_holm_matches_a_hand_computation():
    # sorted: 0.01 x 4 = 0.04; 0.02 x 3 = 0.06; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06 (never below the one before)
    assert St.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert St.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adj = St.holm([0.01, NAN, 0.02])  # an untested pair is not counted: m = 2
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


CLOSE_A = [0.0140, 0.0142, 0.0141, 0.0143, 0.0139]
CLOSE_B = [0.0141, 0.0140, 0.0142, 0.0141, 0.0142]
WIDE_A = [0.010, 0.018, 0.013, 0.020, 0.011]
WIDE_B = [0.012, 0.019, 0.010, 0.017, 0.016]


def test_tost_is_equivalent_on_close_samples_and_not_on_wide_ones():
    margin = 0.05 * 0.0231  # 5% of the laptop verdict's blank-frame prior MSE
    assert St.tost(CLOSE_A, CLOSE_B, margin) < 0.05
    assert St.tost(WIDE_A, WIDE_B, margin) > 0.05
    assert St.welch(WIDE_A, WIDE_B)["p"] > 0.05  # and the wide ones are not told apart either


def test_fisher_survival_and_seeds_needed():
    assert St.survival(5, 5, 0, 5) == pytest.approx(2 / 252)  # 2 of the C(10, 5) = 252 tables are as extreme
    assert St.survival(3, 3, 0, 3) == pytest.approx(0.1)  # three seeds a side cannot show it
    assert abs(St.seeds_needed(1.0) - 17) <= 1
    assert St.seeds_needed(-1.0) == St.seeds_needed(1.0) and St.seeds_needed(2.0) < St.seeds_needed(1.0)
    assert St.seeds_needed(0.0) is None and St.seeds_needed(NAN) is None


def _arm(model, outcome, survived=5):
    return {"model": model, "seeds": [0, 1, 2, 3, 4], "errored": [], "survived": survived, "outcome": outcome,
            "trivial": {f"{s}/{r}_{m}": (0.8 if m == "ssim" else 0.02) for s in ("posterior", "prior", "rollout")
                        for r in ("blank", "last") for m in ("mse", "bce", "ssim")}}


def _runs(values: dict[str, list[float]], survived: dict[str, int]) -> dict:
    return {n: [{"test": {m: v for m in METRICS}} for v in vs] + [{"test": {}}] * (5 - survived[n])
            for n, vs in values.items()}


def test_words_holm_families_and_not_comparable():
    arms = {"gopc2": _arm("gopc2", "learned"), "thesis": _arm("gopc2", "collapsed", survived=0),
            "gopc1": _arm("gopc1", "learned"), "vae1": _arm("vae1", "learned")}
    arms["thesis"]["outcome"] = "diverged"
    runs = _runs({"gopc2": CLOSE_A, "thesis": [], "gopc1": [x + 0.004 for x in CLOSE_B], "vae1": CLOSE_B},
                 {"gopc2": 5, "thesis": 0, "gopc1": 5, "vae1": 5})
    pairs, survival = compare(arms, runs, "prior/mse", 0.05)
    # every two arms with a GOPC-2 among them, thesis included; gopc1 vs vae1 is not a question asked
    assert [(x["a"], x["b"]) for x in survival] == [("gopc2", "thesis"), ("gopc2", "gopc1"), ("gopc2", "vae1"),
                                                     ("thesis", "gopc1"), ("thesis", "vae1")]
    s = survival[0]
    assert (s["a_survived"], s["b_survived"], s["n"]) == (5, 0, 5) and s["p"] == pytest.approx(2 / 252)
    # 5 tests, three at 2/252 (thesis against each survivor), two at 1: the smallest times 5, the next two
    # times 4 and 3 but never below it
    assert [x["p_holm"] for x in survival] == pytest.approx([5 * 2 / 252, 1, 1, 5 * 2 / 252, 5 * 2 / 252])
    assert s["word"] == "survives more often"
    assert survival[3]["word"] == "survives less often" and survival[1]["word"] == "inconclusive"
    by = {(p["a"], p["b"], p["metric"]): p for p in pairs}
    for m in METRICS:
        assert by["gopc2", "thesis", m]["word"] == "not comparable" and by["gopc2", "thesis", m]["why"] == "thesis diverged"
    primary = [p for p in pairs if p["metric"] == "prior/mse" and p["word"] != "not comparable"]
    assert len(primary) == 2  # the primary family: gopc2 vs gopc1 and vs vae1; Holm over these two only
    low, high = sorted(primary, key=lambda p: p["p"])
    assert low["p_holm"] == pytest.approx(2 * low["p"]) and high["p_holm"] == pytest.approx(max(2 * low["p"], high["p"]))
    assert by["gopc2", "gopc1", "prior/mse"]["word"] == "better"  # 0.004 lower at a spread of 0.0001
    assert by["gopc2", "gopc1", "prior/ssim"]["word"] == "worse"  # same numbers, higher is better
    assert by["gopc2", "vae1", "prior/mse"]["word"] == "equivalent"
    assert all(p["seeds_needed"] is None for p in pairs)
    text = table({"study": "s", "seeds": [0, 1, 2, 3, 4], "primary": "prior/mse", "equivalence": 0.05,
                  "survival": survival, "pairs": pairs,
                  "arms": {n: {**a, "metrics": {k: {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 1} for k in
                                                METRICS + [m.replace("/", "/skill_") for m in METRICS]},
                               "diverged": {}} for n, a in arms.items()}})
    lines = text.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("survival"))) < lines.index(
        next(x for x in lines if x.startswith("secondary")))
    assert "gopc2 vs thesis: 5 of 5 vs 0 of 5 survived" in text
    assert not [x for x in lines if "thesis" in x and ("better" in x or "worse" in x)]


def test_inconclusive_says_how_many_seeds():
    arms = {"gopc2": _arm("gopc2", "learned"), "vae1": _arm("vae1", "learned")}
    pairs, _ = compare(arms, _runs({"gopc2": WIDE_A, "vae1": WIDE_B}, {"gopc2": 5, "vae1": 5}), "prior/mse", 0.05)
    p = next(p for p in pairs if p["metric"] == "prior/mse")
    d = St.cohens_d(WIDE_A, WIDE_B)
    assert p["word"] == "inconclusive" and p["seeds_needed"] == St.seeds_needed(d) and p["seeds_needed"] > 5


@pytest.mark.parametrize("setting, field", [("primary=prior/psnr", "study.primary"), ("equivalence=0", "study.equivalence"),
                                            ("equivalence=-0.1", "study.equivalence")])
def test_bad_primary_or_equivalence_is_one_line_naming_the_field(setting, field, tmp_path):
    from gopc.sweep.study import load
    from tests.test_study import STUDY_YAML
    with pytest.raises(ConfigError) as e:
        load(STUDY_YAML, "smoke", [setting])
    assert str(e.value).startswith(field) and "\n" not in str(e.value)
