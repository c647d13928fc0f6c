"""The sweep's summary, on the parent run: all trials as a table, the best config as YAML, and pictures that answer
"what keeps GOPC-2 finite": the outcomes per stabilizer value, and Optuna's views of the study (history, parameter
importances for the objective and for divergence, parallel coordinates, slices, contours)."""
from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from gopc import config as C  # noqa: E402
from gopc import outcome as O  # noqa: E402
from gopc.evaluate import scored_line  # noqa: E402
from gopc.sweep.notes import Notes  # noqa: E402
from gopc.sweep.searcher import open_study, ran_to_the_end  # noqa: E402
from gopc.sweep.settings import Settings  # noqa: E402
from gopc.sweep.space import apply  # noqa: E402
from gopc.sweep.parent_run import finish_parent  # noqa: E402


def trial_rows(s: Settings, results) -> list[dict]:
    steps = C.from_dict(s.base).train.steps
    rows = []
    for r in results:
        m = r.metrics or {}
        status = O.of_trial(m, r.error is not None, steps)
        row = {"trial_id": m.get("trial_id") or os.path.basename(r.path or ""), "status": status,
               "objective": "" if status == O.DIVERGED else m.get("objective", float("nan")),  # not the penalty
               "step": m.get("step", 0),
               "diverged_step": m.get("diverged_step", ""), "diverged_quantity": m.get("diverged_quantity", ""),
               "error": str(r.error).strip().splitlines()[0][:200] if r.error else ""}
        row.update({p.name: r.config.get(p.name, "") for p in s.space})
        row.update({k: v for k, v in m.items() if k.startswith("val/") and k.endswith(("mse", "bce", "ssim", "psnr", "peak_step"))
                    and not k.endswith("_std")})
        rows.append(row)
    return rows


def load_study(s: Settings) -> optuna.Study:
    """The sweep's Optuna study, from its storage (during and after the sweep)."""
    return open_study(s.name, s.study_storage)


def best_row(s: Settings, rows: list[dict]) -> dict | None:
    """The best learned trial by the objective; else the best degraded, then collapsed one (the caller says so)."""
    for status in O.TRAINED:
        done = [r for r in rows if r["status"] == status and math.isfinite(float(r["objective"]))]
        if done:
            return (min if s.mode == "min" else max)(done, key=lambda r: float(r["objective"]))
    return None


def _group_key(p, value, ran) -> str:
    if value == "":
        return "(off)"  # a conditional parameter that was not switched on
    if p.choices is not None:
        return str(value)
    edges = np.quantile([float(q[p.name]) for q in ran if q.get(p.name, "") != ""], [0, .25, .5, .75, 1])
    b = max(min(int(np.searchsorted(edges, float(value), side="right")) - 1, 3), 0)  # quartile bins
    return f"{edges[b]:.2g}-{edges[b + 1]:.2g}"


def outcome_plot(s: Settings, rows: list[dict], path: str) -> str:
    """Per parameter, per value: the share of trials that learned, degraded, collapsed, were stopped early or
    diverged, stacked; n above each bar. Answers "which stabilizers make GOPC-2 train *and learn*"."""
    ran = [r for r in rows if r["status"] != O.ERRORED]
    cols = min(4, len(s.space))
    bands = -(-len(s.space) // cols)
    fig, grid = plt.subplots(bands, cols, figsize=(3.4 * cols, 3.2 * bands), squeeze=False)
    for ax in grid.flat[len(s.space):]:
        ax.set_visible(False)
    for i, (p, ax) in enumerate(zip(s.space, grid.flat)):
        groups = defaultdict(list)
        for r in ran:
            groups[_group_key(p, r.get(p.name, ""), ran)].append(r["status"])
        keys = sorted(groups)
        bottom = np.zeros(len(keys))
        for status, color in O.COLOUR.items():
            share = np.array([groups[k].count(status) / len(groups[k]) for k in keys])
            ax.bar(keys, share, bottom=bottom, color=color, label=status)
            bottom += share
        for x, k in enumerate(keys):
            ax.text(x, 1.01, f"n={len(groups[k])}", ha="center", va="bottom", fontsize=7)
        ax.set(title=p.name, ylim=(0, 1.15), ylabel="share of trials" if i % cols == 0 else None)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    grid.flat[0].legend(fontsize=7, loc="lower left", framealpha=0.8)
    fig.suptitle(f"{s.name}: which stabilizers keep GOPC-2 finite and learning ({len(ran)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def optuna_plots(study: optuna.Study, folder: str) -> dict[str, str]:
    """Optuna's own views of the study. All but the history leave diverged trials out: their value is a
    validation from before the blow-up, not what their config trains to (Optuna leaves out NaN targets)."""
    def objective(t):
        return t.value if ran_to_the_end(t) else float("nan")

    def diverged(t):
        return t.user_attrs.get(O.DIVERGED, 0.0)

    fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        top = list(optuna.importance.get_param_importances(study, evaluator=fanova, target=objective))[:3]
    except (RuntimeError, ValueError, ZeroDivisionError):  # too few or too uniform trials
        top = None
    not_diverged = {"target": objective, "target_name": "objective (trials that did not diverge)"}
    views = {"history": ("optimisation_history.png", lambda: _history(study)),
             "importance": ("param_importances.png",
                            lambda: ovm.plot_param_importances(study, evaluator=fanova, **not_diverged)),
             "divergence_importance": ("divergence_importances.png", lambda: ovm.plot_param_importances(
                 study, evaluator=fanova, target=diverged, target_name="divergence")),
             "parallel": ("parallel_coordinate.png", lambda: ovm.plot_parallel_coordinate(study, **not_diverged)),
             "slice": ("slice.png", lambda: ovm.plot_slice(study, **not_diverged)),
             "contour": ("contour.png", lambda: ovm.plot_contour(study, params=top, **not_diverged))}
    files = {}
    verbosity = optuna.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API and degenerate-axis warnings of a small study
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # one "omitted" warning per infeasible trial
        for key, (name, draw) in views.items():
            try:
                axes = draw()
            except (RuntimeError, ValueError, ZeroDivisionError) as e:  # too few or too uniform trials
                print(f"{name}: not drawn ({str(e)[:80]})")
                continue
            fig = np.ravel(axes)[0].figure
            fig.savefig(files.setdefault(key, os.path.join(folder, name)), dpi=90, bbox_inches="tight")
            plt.close(fig)
        optuna.logging.set_verbosity(verbosity)  # --verbose's level again
    return files


def _history(study: optuna.Study):
    """Optuna's history (infeasible trials grey), its value axis fitted to the trials that did not diverge."""
    ax = ovm.plot_optimization_history(study)
    if values := [t.value for t in study.trials if ran_to_the_end(t)]:
        pad = (max(values) - min(values)) * 0.1 or abs(values[0]) * 0.1 or 1.0
        ax.set_ylim(min(values) - pad, max(values) + pad)
    off = sum(t.state == optuna.trial.TrialState.COMPLETE and not ran_to_the_end(t) for t in study.trials)
    ax.set_title(f"optimisation history ({off} diverged trials at their last validation, infeasible)")
    return ax


def summarise_sweep(s: Settings, results, parent_run_id: str) -> str | None:
    rows = trial_rows(s, results)
    study = load_study(s)
    Notes(s.metric, s.mode, C.from_dict(s.base).train.learned_margin).study(study)  # its last trials' counts
    states = Counter(t.state.name for t in study.trials)
    # A local copy beside the experiment first: nothing is lost if MLflow is away at the end.
    local = "://" not in s.experiment_path
    folder = os.path.join(s.experiment_path, "summary") if local else tempfile.mkdtemp(prefix="gopc-sweep-")
    os.makedirs(folder, exist_ok=True)
    files = {"trials": os.path.join(folder, "trials.csv")}
    with open(files["trials"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=_column_order))
        writer.writeheader()
        writer.writerows(rows)
    files["outcomes"] = outcome_plot(s, rows, os.path.join(folder, "outcome_by_stabilizer.png"))
    files.update(optuna_plots(study, folder))
    best = best_row(s, rows)
    best_path = None
    if best is not None:
        best_path = os.path.abspath(os.path.join("best", f"{s.name}.yaml"))
        os.makedirs(os.path.dirname(best_path), exist_ok=True)
        cfg = apply(s.base, {p.name: best[p.name] for p in s.space if best[p.name] != ""})
        with open(best_path, "w") as f:
            f.write(f"# sweep {s.name}, trial {best['trial_id']}, {best['status']}: validation {scored_line(best, 'val/')}\n{C.dump(cfg)}")
        files["best_config"] = shutil.copyfile(best_path, os.path.join(folder, "best_config.yaml"))
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    metrics = {"n_trials": len(rows), "divergence_rate": counts[O.DIVERGED] / max(len(rows), 1),
               "learned_rate": counts[O.LEARNED] / max(len(rows), 1),
               **{f"n_{k.replace(' ', '_')}": v for k, v in counts.items()},
               **{f"optuna_{k.lower()}": v for k, v in states.items()},
               "best_objective": float(best["objective"]) if best else float("nan")}
    tally = f"{len(rows)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if not finish_parent(s.mlflow_uri, parent_run_id, files, metrics, f"{tally}. {verdict_line(best)}",
                         best["trial_id"] if best else "", rows):
        print(f"the summary is kept in {folder}; run with --resume to log it once MLflow is back")
    print(f"\n{tally}; Optuna study states: {dict(states)}")
    print(verdict_line(best))
    return best_path


def verdict_line(best: dict | None) -> str:
    """The sweep's answer in one line: whether any trial learned, and what the best one scored."""
    if best is None:
        return "No trial trained to the end: every trial diverged, errored or was stopped early. No config to export."
    if best["status"] == O.DEGRADED:
        return (f"No trial learned to its end: the best one learned, then unlearned (degraded: its prior skill peaked at "
                f"{float(best.get('val/prior/peak_skill_mse', 'nan')):+.2f} at step {best.get('val/prior/peak_step', '?')}); "
                f"at its end: validation {scored_line(best, 'val/')}. The exported config is the least bad, not a trained model.")
    if best["status"] != O.LEARNED:
        return ("No trial learned: every finished trial's one-step prior is no better than a blank or the last frame "
                f"(best {best['status']}: validation {scored_line(best, 'val/')}). The exported config is the least bad, not a trained model.")
    return f"best trial {best['trial_id']}: {best['status']}: validation {scored_line(best, 'val/')}"


def _column_order(key: str) -> tuple:
    first = ["trial_id", "status", "objective", "step", "diverged_step", "diverged_quantity", "error"]
    return (first.index(key), "") if key in first else (len(first) + key.startswith("val/"), key)
