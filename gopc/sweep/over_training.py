"""A study's arms over training: each seed's validation skill at every Tune iteration, then per arm the mean and 95%
band over the seeds that survived, the peak of that mean and the end; and how many seeds were still finite at each step.
A model that learned and then unlearned (`degraded`, gopc/outcome.py) shows as a curve that rises, then falls."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gopc import config as C  # noqa: E402
from gopc import outcome as O  # noqa: E402
from gopc.sweep import stats as St  # noqa: E402

SKILL = "val/prior/skill_mse"  # the one-step prior's MSE skill over the better trivial prediction


def curve(result) -> list[tuple[int, float]]:
    """(step, validation skill) per step of a Tune result: a retried iteration, a study's test report repeat a step."""
    df = result.metrics_dataframe
    if df is None or SKILL not in df or "step" not in df:
        return []
    return sorted({int(step): float(skill) for step, skill in zip(df["step"], df[SKILL]) if skill == skill}.items())


def across_seeds(seeds: list[dict]) -> dict:
    """Over the seeds that survived (a diverged seed's curve stops early): per validation step the mean
    skill and its 95% interval; the peak of the mean curve; the end; and each seed's own peak."""
    alive = [x for x in seeds if x["test"] and x["curve"]]
    if not alive:
        return {}
    curves = [dict(x["curve"]) for x in alive]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if not steps:
        return {}
    bands = [St.interval([c[step] for c in curves]) for step in steps]
    top = max(range(len(steps)), key=lambda i: bands[i]["mean"])
    return {"n": len(alive), "steps": steps, **{k: [b[k] for b in bands] for k in ("mean", "low", "high")},
            "peak": {"step": steps[top], **bands[top]}, "final": {"step": steps[-1], **bands[-1]},
            "seed_peaks": {str(x["seed"]): list(max(x["curve"], key=lambda p: p[1])) for x in alive}}


def survival_axes(ax, v: dict, s) -> None:
    """Seeds still finite at each training step, per arm, with the survival tests' words."""
    steps = C.from_dict(s.base).train.steps
    for k, (name, a) in enumerate(v["arms"].items()):
        died = sorted(int(x) for x in a[O.DIVERGED].values() if x is not None)
        xs = [0] + died + [steps]
        alive = [len(a["seeds"]) - len(a[O.ERRORED]) - i for i in range(len(died) + 1)]
        lift = 0.05 * k  # arms with the same counts would hide each other's line
        ax.step(xs, [n + lift for n in alive + alive[-1:]], where="post",
                label=f"{name}: {a['survived']} of {len(a['seeds'])} survived")
    tests = [f"{x['a']} vs {x['b']}: {x['word']} (Holm p {x['p_holm']:.2g})" for x in v["survival"]]
    ax.set(xlabel="training step", ylabel="seeds still finite", ylim=(-0.2, len(s.seeds) + 0.5),
           title="survival over training" + ("\n" + "; ".join(tests[:3]) if tests else ""))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)


def survival_plot(v: dict, s, path: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    survival_axes(ax, v, s)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def training_plot(v: dict, s, path: str) -> str:
    """Each arm's validation skill over training (mean, 95% band over survivors, its peak marked), beside
    survival: an arm that peaks and falls back below the margin learned, then unlearned."""
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name, a in v["arms"].items():
        t = a.get("training")
        if not t:
            continue
        line, = ax.plot(t["steps"], t["mean"], marker=".", label=f"{name}: {a['outcome']} ({t['n']} seeds)")
        if t["n"] > 1:
            ax.fill_between(t["steps"], t["low"], t["high"], alpha=0.2, color=line.get_color())
        ax.plot([t["peak"]["step"]], [t["peak"]["mean"]], "*", ms=12, color=line.get_color())
    ax.axhline(v["margin"], color="k", ls="--", lw=1, label=f"learned margin ({v['margin']:.0%})")
    ax.axhline(0, color="k", ls=":", lw=1, label="trivial prediction (blank or last frame)")
    ax.set(xlabel="training step", ylabel="validation: one-step prior MSE skill",
           title="learning over training (mean, 95% band over survivors; * peak)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    survival_axes(right, v, s)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
