"""The verdict of a study (verdict.json, report.md and pictures beside the experiment, logged on its MLflow parent run,
printed as a table): per arm, which seeds survived and its test errors as means with 95% intervals over the seeds,
beside the trivial predictions; per pair (every two arms of which one is GOPC-2), survival and each metric compared.

Survival: Fisher's exact test, Holm-corrected over the pairs: "survives more often" / "less often" / "inconclusive".
Metrics (gopc/sweep/stats.py): Holm within the primary metric's pairs and, apart, within the secondary metrics' pairs,
so that the many secondary comparisons do not dilute the primary one. "better" / "worse" when the adjusted p is below
0.05; "equivalent" when the Holm-adjusted TOST shows the difference within the study's `equivalence` margin;
"inconclusive" otherwise, with the seeds per arm that would detect it. A pair with an arm that did not learn on every
surviving seed is "not comparable": an arm that learned nothing is never ranked, nor called equal."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gopc import config as C  # noqa: E402
from gopc import outcome as O  # noqa: E402
from gopc.evaluate import SECTIONS, TEST_DIR  # noqa: E402
from gopc.metrics import SKILL_METRICS  # noqa: E402
from gopc.sweep import stats as St  # noqa: E402
from gopc.sweep.over_training import across_seeds, curve, survival_plot, training_plot  # noqa: E402
from gopc.sweep.parent_run import finish_parent  # noqa: E402

METRICS = [f"{s}/{m}" for s in SECTIONS for m in SKILL_METRICS]  # the verdict's errors (MSE, BCE, SSIM)
SKILLS = [f"{s}/skill_{m}" for s in SECTIONS for m in SKILL_METRICS]
TRIVIAL = [f"{s}/{ref}_{m}" for s in SECTIONS for ref in ("blank", "last") for m in SKILL_METRICS if (s, ref) != ("posterior", "last")]


def higher_is_better(metric: str) -> bool:
    return metric.endswith("ssim")


def equivalence_margin(metric: str, trivial: dict, fraction: float) -> float:
    """`fraction` of the better trivial prediction's error, in the metric's units (for SSIM: of 1 - its SSIM)."""
    section, name = metric.split("/")
    refs = [trivial[f"{section}/{ref}_{name}"] for ref in ("blank", "last") if f"{section}/{ref}_{name}" in trivial]
    if not refs:
        return math.nan
    return fraction * (1 - max(refs)) if higher_is_better(metric) else fraction * min(refs)


def word(metric: str, pair: dict) -> str:
    """The pair's word for arm a, as the module's docstring says."""
    if pair["p_holm"] is not None and pair["p_holm"] < St.ALPHA:
        sign = 1 if higher_is_better(metric) else -1
        return "better" if sign * pair["diff"]["mean"] > 0 else "worse"
    if pair["p_tost_holm"] is not None and pair["p_tost_holm"] < St.ALPHA:
        return "equivalent"
    return "inconclusive"


def _shown(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _nan_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def arm_pairs(arms: dict) -> list[tuple[str, str]]:
    """Every two arms of which at least one is GOPC-2, in the study's order, a GOPC-2 arm first."""
    names = list(arms)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if arms[a]["model"] == "gopc2":
                out.append((a, b))
            elif arms[b]["model"] == "gopc2":
                out.append((b, a))
    return out


def compare(arms: dict, runs: dict, primary: str, fraction: float) -> tuple[list[dict], list[dict]]:
    """The pairs (every metric) and the survival comparisons, Holm-corrected within their families (above)."""
    values = {n: {m: [x["test"][m] for x in runs[n] if x["test"]] for m in METRICS} for n in arms}
    trivial = next((a["trivial"] for a in arms.values() if a["trivial"]), {})
    survival, pairs = [], []
    for a, b in arm_pairs(arms):
        counts = [(arms[n]["survived"], len(arms[n]["seeds"]) - len(arms[n][O.ERRORED])) for n in (a, b)]
        survival.append({"a": a, "b": b, "a_survived": counts[0][0], "b_survived": counts[1][0],
                         "n": counts[0][1], "b_n": counts[1][1], "p": St.survival(*counts[0], *counts[1])})
        unlearned = [n for n in (a, b) if arms[n]["outcome"] != O.LEARNED]
        for metric in METRICS:
            xa, xb = values[a][metric], values[b][metric]
            w = St.welch(xa, xb)
            pair = {"a": a, "b": b, "metric": metric, "diff": {k: w[k] for k in ("mean", "low", "high")},
                    "p": _nan_none(w["p"]), "g": _nan_none(St.hedges_g(xa, xb)), "p_holm": None,
                    "p_tost": None, "p_tost_holm": None, "seeds_needed": None,
                    "margin": _nan_none(equivalence_margin(metric, trivial, fraction))}
            if unlearned:  # a model that learned nothing is never ranked, nor called equal to another
                pair.update(word="not comparable", why="; ".join(f"{n} {arms[n]['outcome']}" for n in unlearned))
            elif pair["margin"] is not None:
                pair["p_tost"] = _nan_none(St.tost(xa, xb, pair["margin"]))
            pairs.append(pair)
    for s, adj in zip(survival, St.holm([s["p"] for s in survival])):
        s["p_holm"] = adj
        s["word"] = ("inconclusive" if adj >= St.ALPHA else
                     "survives more often" if s["a_survived"] / s["n"] > s["b_survived"] / s["b_n"] else "survives less often")
    for family in (lambda p: p["metric"] == primary, lambda p: p["metric"] != primary):
        tested = [p for p in pairs if family(p) and p.get("word") != "not comparable"]
        for key in ("p", "p_tost"):
            for p, adj in zip(tested, St.holm([math.nan if p[key] is None else p[key] for p in tested])):
                p[f"{key}_holm"] = _nan_none(adj)
        for p in tested:
            p["word"] = word(p["metric"], p)
            if p["word"] == "inconclusive":
                p["seeds_needed"] = St.seeds_needed(St.cohens_d(values[p["a"]][p["metric"]], values[p["b"]][p["metric"]]))
    return pairs, survival


def collect(s, results) -> dict[str, list[dict]]:
    """Per arm, one record per seed: status, step it diverged at, validation curve, test metrics, checkpoint."""
    steps = C.from_dict(s.base).train.steps
    runs = defaultdict(list)
    for r, config in zip(results, trial_configs(results)):
        m = r.metrics or {}
        runs[config["arm"]].append({
            "seed": config["train.seed"], "status": O.of_trial(m, r.error is not None, steps),
            "diverged_step": m.get("diverged_step"), "checkpoint": r.checkpoint, "curve": curve(r),
            "test": {k[len("test/"):]: v for k, v in m.items() if k.startswith("test/")}})
    return {arm: sorted(runs[arm], key=lambda x: x["seed"]) for arm in s.arm_configs}


def trial_configs(results) -> list[dict]:
    """Each result's trial config; from the experiment's trial list for one that errored before it reported."""
    configs = [r.config for r in results]
    if any(c is None for c in configs):
        from ray.tune import ExperimentAnalysis
        by_path = {t.path: t.config for t in ExperimentAnalysis(results.experiment_path).trials}
        configs = [c if c is not None else by_path[r.path] for r, c in zip(results, configs)]
    return configs


def seed_outcome(x: dict, margin: float) -> str:
    """Degraded if its validation curve rose above the margin, then fell (O.classify); else its test split's word."""
    if x["curve"]:
        ends = {"prior/skill_mse": x["curve"][-1][1], "prior/peak_skill_mse": max(s for _, s in x["curve"])}
        if O.classify(ends, margin) == O.DEGRADED:
            return O.DEGRADED
    return O.classify(x["test"], margin)


def arm_outcome(statuses: list[str], outcomes: list[str]) -> str:
    """An arm's word from its seeds' statuses and its survivors' outcomes: one word when they agree."""
    if all(x == O.ERRORED for x in statuses):
        return O.ERRORED
    if not outcomes:
        return O.DIVERGED
    learned, degraded = outcomes.count(O.LEARNED), outcomes.count(O.DEGRADED)
    if len(set(outcomes)) == 1:
        return outcomes[0]
    return f"mixed ({learned} of {len(outcomes)} {O.LEARNED}" + (f", {degraded} {O.DEGRADED})" if degraded else ")")


def build(s, runs: dict[str, list[dict]]) -> dict:
    arms = {}
    for name, seeds in runs.items():
        alive = [x for x in seeds if x["test"]]
        margin = C.from_dict(s.arm_configs[name]).train.learned_margin
        outcomes = [seed_outcome(x, margin) for x in alive]
        arms[name] = {
            "model": s.arm_configs[name]["model"]["kind"], "seeds": [x["seed"] for x in seeds],
            "survived": len(alive), "survivors": [x["seed"] for x in alive],
            O.DIVERGED: {str(x["seed"]): x["diverged_step"] for x in seeds if x["status"] == O.DIVERGED},
            O.ERRORED: [x["seed"] for x in seeds if x["status"] == O.ERRORED],
            "outcome": arm_outcome([x["status"] for x in seeds], outcomes),
            "training": across_seeds(seeds),
            "metrics": {k: St.interval([x["test"][k] for x in alive]) for k in METRICS + SKILLS},
            "trivial": {k: float(np.mean([x["test"][k] for x in alive])) for k in TRIVIAL} if alive else {}}
    pairs, survival = compare(arms, runs, s.primary, s.equivalence)
    return {"study": s.name, "date": time.strftime("%Y-%m-%d"), "level": St.LEVEL,
            "margin": C.from_dict(s.base).train.learned_margin,
            "seeds": s.seeds, "primary": s.primary, "equivalence": s.equivalence, "arms": arms,
            "survival": survival, "pairs": pairs}


def table(v: dict) -> str:
    """The verdict as text: arms (survival, outcome, test errors with intervals, trivial scores), then pairs."""
    fmt = lambda i: f"{i['mean']:.4f} [{i['low']:.4f}, {i['high']:.4f}]" if i["n"] else "-"  # noqa: E731
    lines = [f"verdict of {v['study']} on the test split, {len(v['seeds'])} seeds, mean [95% interval] over survivors",
             f"{'arm':12} {'model':6} {'survived':>8}  {'outcome':22} {'prior MSE':>26} {'prior skill':>8} "
             f"{'rollout SSIM':>26}"]
    for name, a in v["arms"].items():
        m = a["metrics"]
        lines.append(f"{name:12} {a['model']:6} {a['survived']:>3} of {len(a['seeds']):<2}  {a['outcome']:22} "
                     f"{fmt(m['prior/mse']):>26} {m['prior/skill_mse']['mean']:+8.2f} {fmt(m['rollout/ssim']):>26}")
    trivial = next((a["trivial"] for a in v["arms"].values() if a["trivial"]), {})
    if trivial:  # every error the table prints stands beside what a blank frame and the last frame score
        lines.append("trivial predictions (blank frame / last frame): " + ", ".join(
            f"{m} {trivial[m.replace('/', '/blank_')]:.4f} / {trivial[m.replace('/', '/last_')]:.4f}"
            for m in dict.fromkeys([v["primary"]] + SHOWN) if m.replace("/", "/last_") in trivial))
    if v["survival"]:
        lines.append(f"survival, Fisher's exact test, Holm over {len(v['survival'])} pairs:")
        lines += [survival_line(x) for x in v["survival"]]
    shown = [v["primary"]] + [m for m in SHOWN if m != v["primary"]]
    lines.append(f"primary metric {v['primary']}: a - b [95% interval], Welch p, Holm p over its pairs, Hedges' g; "
                 f"equivalent: within ±{v['equivalence']:.0%} of the better trivial prediction's error (TOST)")
    lines += [pair_line(p) for p in v["pairs"] if p["metric"] == v["primary"]]
    lines.append("secondary metrics (Holm over all secondary pairs; report.md lists every metric):")
    apart = {(p["a"], p["b"]): p["why"] for p in v["pairs"] if p["word"] == "not comparable"}
    lines += [pair_line(p) for m in shown[1:] for p in v["pairs"] if p["metric"] == m and (p["a"], p["b"]) not in apart]
    lines += [f"  {a} vs {b}, every secondary metric: not comparable: {why}" for (a, b), why in apart.items()]
    skill = lambda i: f"{i['mean']:+.2f} [{_shown(i['low'], '+.2f')}, {_shown(i['high'], '+.2f')}] at step {i['step']}"  # noqa: E731
    trained = {name: a["training"] for name, a in v["arms"].items() if a.get("training")}
    if trained:
        lines.append("validation prior MSE skill over training, mean [95% interval] over survivors (training.png):")
        lines += [f"  {name}: peak {skill(t['peak'])}; end {skill(t['final'])}" for name, t in trained.items()]
    why = {O.DIVERGED: "no seed survived",
           O.DEGRADED: "on every surviving seed it learned, then unlearned: its validation skill fell below the "
                       "margin or below half its peak",
           O.COLLAPSED: "on every surviving seed its one-step prior is no better than a blank or the last frame: "
                        "it learned nothing"}
    lines += [f"{name}: {a['outcome']}: " + why.get(a["outcome"], "not every surviving seed learned to the end; the "
                                                    "others collapsed or degraded")
              for name, a in v["arms"].items() if a["outcome"] != O.LEARNED]
    return "\n".join(lines)


SHOWN = ["prior/mse", "rollout/mse", "prior/bce", "rollout/ssim"]  # the table's metrics; report.md has all


def survival_line(x: dict) -> str:
    return (f"  {x['a']} vs {x['b']}: {x['a_survived']} of {x['n']} vs {x['b_survived']} of {x['b_n']} survived, "
            f"p {x['p']:.3g}, Holm {x['p_holm']:.3g}: {x['word']}")


def pair_line(p: dict) -> str:
    head = f"  {p['a']} vs {p['b']}, {p['metric']}: "
    if p["word"] == "not comparable":
        return head + f"not comparable: {p['why']} (only arms that learned on every surviving seed are ranked)"
    d, num = p["diff"], _shown
    text = (head + f"{d['mean']:+.4f} [{num(d['low'], '+.4f')}, {num(d['high'], '+.4f')}], p {num(p['p'], '.3g')}, "
            f"Holm {num(p['p_holm'], '.3g')}, g {num(p['g'], '+.2f')}: {p['word']}")
    if p["word"] == "equivalent":
        text += f" (within ±{p['margin']:.4f})"
    if p["word"] == "inconclusive":
        n = p["seeds_needed"]
        text += (f"; {'more than 10,000' if n and n > 10_000 else f'about {n}'} seeds per arm would detect this difference" if n else
                 "; too few surviving seeds to estimate the spread")
    return text


def rollout_plot(v: dict, runs: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    refs = None
    for name, seeds in runs.items():
        curves = [c for x in seeds if x["test"] and (c := _read(x["checkpoint"], "curves.json"))]
        if not curves:
            continue
        per_step = np.array([c["rollout"]["mse"] for c in curves])
        band = [St.interval(col) for col in per_step.T]
        t = np.arange(per_step.shape[1]) + curves[0]["rollout"]["first_frame"]
        ax.plot(t, [b["mean"] for b in band], label=f"{name} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(t, [b["low"] for b in band], [b["high"] for b in band], alpha=0.2)
        refs = refs or (t, curves[0]["rollout"]["blank_mse"], curves[0]["rollout"]["last_mse"])
    if refs:
        ax.plot(refs[0], refs[1], "k--", lw=1, label="blank frame")
        ax.plot(refs[0], refs[2], "k:", lw=1, label="last context frame")
    ax.set(xlabel="frame", ylabel="per-pixel MSE", title="rollout error by step on the test split (95% band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def predictions_plot(runs: dict, path: str) -> str:
    """The same test sequences predicted by every arm (its first surviving seed): truth, then one row per arm."""
    shown = {name: p for name, seeds in runs.items()
             if (p := next((_read(x["checkpoint"], "predictions.npz") for x in seeds if x["test"]), None)) is not None}
    if not shown:
        return ""
    first = next(iter(shown.values()))
    truth, ctx = first["truth"], int(first["context"])
    n_seq, T = truth.shape[:2]
    rows = [r for i in range(n_seq) for r in [(f"seq {i}: truth", truth[i])] + [(name, p["rollout"][i]) for name, p in shown.items()]]
    fig, axes = plt.subplots(len(rows), T, figsize=(0.9 * T, 0.95 * len(rows)), squeeze=False)
    for (label, frames), ax_row in zip(rows, axes):
        for t, ax in enumerate(ax_row):
            ax.imshow(frames[t, 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            if t == ctx:
                for side in ax.spines.values():
                    side.set_color("red")
        ax_row[0].set_ylabel(label, rotation=0, ha="right", fontsize=8)
    fig.suptitle(f"test sequences: {ctx} context frames, then each arm's prior alone (red: first predicted frame)", fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def _read(checkpoint, name: str):
    """A file of the trial's test evaluation, from its last checkpoint (local or on URI storage)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, TEST_DIR, name)
        if not os.path.exists(path):
            return None
        if name.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


def report(v: dict, command: str) -> str:
    lines = [f"# Verdict: {v['study']}", "", f"Date: {v['date']}. Command: `{command}`.", "",
             "Test split, never seen by the sweep; mean and 95% interval over the seeds that survived. "
             f"An arm has *learned* when its one-step prior's MSE beats the better trivial prediction (blank or "
             f"last frame) by at least {v['margin']:.0%}.", "", "```", table(v), "```", "",
             "![rollout error](rollout_error.png)", "", "![predictions](predictions.png)", "", "![survival](survival.png)", "",
             "![learning over training](training.png)", "",
             "## Survival", "", "| a | b | a survived | b survived | p (Fisher) | Holm p | word |", "|---|---|---:|---:|---:|---:|---|"]
    f = _shown
    for x in v["survival"]:
        lines.append(f"| {x['a']} | {x['b']} | {x['a_survived']} of {x['n']} | {x['b_survived']} of {x['b_n']} | "
                     f"{x['p']:.3g} | {x['p_holm']:.3g} | {x['word']} |")
    lines += ["", f"## Every pair and metric (the primary, {v['primary']}, first)", "",
              "Holm's correction runs within the primary metric's pairs and, apart, within all secondary pairs. "
              f"*equivalent*: TOST within ±{v['equivalence']:.0%} of the better trivial prediction's error (margin). "
              "*seeds*: per arm, to detect the observed difference at 80% power (two-sided 0.05).", "",
              "| a | b | metric | a - b | 95% interval | p | Holm p | g | margin | word | seeds |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for p in sorted(v["pairs"], key=lambda p: p["metric"] != v["primary"]):
        d = p["diff"]
        word_ = p["word"] + (f" ({p['why']})" if p.get("why") else "")
        lines.append(f"| {p['a']} | {p['b']} | {p['metric']} | {d['mean']:+.4f} | [{f(d['low'], '+.4f')}, {f(d['high'], '+.4f')}] | "
                     f"{f(p['p'], '.3g')} | {f(p['p_holm'], '.3g')} | {f(p['g'], '+.2f')} | {f(p['margin'], '.4f')} | {word_} | "
                     f"{f(p['seeds_needed'], 'd')} |")
    return "\n".join(lines) + "\n"


def sentence(v: dict) -> str:
    """The verdict in a few sentences, for the parent run's description."""
    arms = "; ".join(f"{name} ({a['model']}) {a['outcome']}, {a['survived']} of {len(a['seeds'])} seeds survived"
                     for name, a in v["arms"].items())
    alive = "; ".join(f"{x['a']} vs {x['b']}: {x['word']}" for x in v["survival"])
    words = "; ".join(f"{p['a']} vs {p['b']}: {p['word']}" for p in v["pairs"] if p["metric"] == v["primary"])
    return (f"Test split, {len(v['seeds'])} seeds: {arms}." + (f" Survival: {alive}." if alive else "")
            + (f" {v['primary']}: {words}." if words else ""))


def write_verdict(s, results, parent: str) -> list[str]:
    runs = collect(s, results)
    v = build(s, runs)
    local = "://" not in s.experiment_path
    folder = os.path.join(s.experiment_path, "verdict") if local else tempfile.mkdtemp(prefix="gopc-verdict-")
    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, "verdict.json"), "report": os.path.join(folder, "report.md")}
    with open(files["json"], "w") as f:
        json.dump(v, f, indent=1)
    with open(files["report"], "w") as f:
        f.write(report(v, " ".join(["python"] + sys.argv)))
    files["rollout"] = rollout_plot(v, runs, os.path.join(folder, "rollout_error.png"))
    files["survival"] = survival_plot(v, s, os.path.join(folder, "survival.png"))
    files["training"] = training_plot(v, s, os.path.join(folder, "training.png"))
    if picture := predictions_plot(runs, os.path.join(folder, "predictions.png")):
        files["predictions"] = picture
    metrics = {f"{arm}.{k}": a["metrics"][k]["mean"] for arm, a in v["arms"].items() for k in ("prior/mse", "prior/skill_mse")}
    metrics.update({f"{arm}.survived": a["survived"] for arm, a in v["arms"].items()})
    if not finish_parent(s.mlflow_uri, parent, files, metrics, sentence(v)):
        print(f"the verdict is kept in {folder}; run with --resume to log it once MLflow is back")
    print("\n" + table(v))
    return [f"verdict: {files['report']}", f"verdict.json: {files['json']}"]
