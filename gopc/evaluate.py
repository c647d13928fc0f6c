"""Evaluation after the thesis: posterior error over full sequences (table 3.1), one-step prior error decoded before the
inference step (table 3.2), and the 5-context rollout from the prior alone (figure 3.4). Each stands beside the trivial
predictions (a blank frame; for the prior and the rollout, the last frame too) with a skill score over the better of
them, so a model that predicts nothing cannot look good: gopc/outcome.py judges a run by its one-step prior's skill."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from gopc import outcome as O
from gopc.checkpoint import load_checkpoint
from gopc.config import Config, load
from gopc.data import build_datasets, to_float
from gopc.images import curves_plot, inference_grid, rollout_grid
from gopc.metrics import SKILL_METRICS, curve, frame_metrics, last_frame_prediction, mean_and_std, skill
from gopc.models import build_model

SECTIONS = ("posterior", "prior", "rollout")
METRIC_NAMES = ("mse", "bce", "psnr", "ssim")  # the summaries, without their _std


def context_frames(cfg: Config) -> int:
    return min(5, cfg.data.seq_len - 1)


@torch.no_grad()
def predict_all(model, sequences, cfg: Config, chunk: int = 50) -> tuple[torch.Tensor, dict]:
    device = next(model.parameters()).device
    xs, outs = [], {k: [] for k in SECTIONS}
    for i in range(0, len(sequences), chunk):
        x = to_float(sequences[i:i + chunk]).to(device)
        for k, v in model.predict(x, context_frames(cfg)).items():
            outs[k].append(v.cpu())
        xs.append(x.cpu())
    return torch.cat(xs), {k: torch.cat(v) for k, v in outs.items()}


def scored_frames(cfg: Config) -> dict[str, slice]:
    """The frames each section is scored on: all (posterior), from the second (prior), after the context (rollout)."""
    return {"posterior": slice(0, None), "prior": slice(1, None), "rollout": slice(context_frames(cfg), None)}


def blank_scores(sequences, cfg: Config) -> dict:
    """`{section}/blank_{metric}` as evaluate() reports them, without a model: what a run that diverged
    before its first validation is measured against (the sweep tells Optuna this, not a penalty)."""
    x = to_float(sequences)
    out = {}
    for name, sel in scored_frames(cfg).items():
        target = x[:, sel]
        out.update({f"{name}/blank_{k}": v for k, v in mean_and_std(frame_metrics(torch.zeros_like(target), target)).items()
                    if k in METRIC_NAMES})
    return out


def evaluate(model, sequences, cfg: Config, out_dir: str | None) -> tuple[dict, dict[str, str]]:
    """Returns flat metrics (`posterior/mse`, `prior/mse_std`, `rollout/blank_mse`, ...) and the files
    written to out_dir: PNG grids and curves.json (none when out_dir is None: a quick validation)."""
    x, pred = predict_all(model, sequences, cfg)
    ctx = context_frames(cfg)
    frames = scored_frames(cfg)
    metrics, curves = {}, {}
    for name, sel in frames.items():
        target = x[:, sel]
        per = frame_metrics(pred[name][:, sel], target)
        blank = frame_metrics(torch.zeros_like(target), target)
        metrics.update({f"{name}/{k}": v for k, v in mean_and_std(per).items()})
        metrics.update({f"{name}/blank_{k}": v for k, v in mean_and_std(blank).items() if k in METRIC_NAMES})
        curves[name] = {**curve(per), "blank_mse": curve(blank)["mse"]}  # per-step means of every metric
        refs = ["blank"]
        if name != "posterior":  # the posterior sees its frame: only the blank frame is trivial for it
            last = frame_metrics(last_frame_prediction(x, sel.start, ctx if name == "rollout" else None), target)
            metrics.update({f"{name}/last_{k}": v for k, v in mean_and_std(last).items() if k in METRIC_NAMES})
            curves[name]["last_mse"] = curve(last)["mse"]
            refs.append("last")
        for k in SKILL_METRICS:
            metrics[f"{name}/skill_{k}"] = skill(k, metrics[f"{name}/{k}"], *(metrics[f"{name}/{r}_{k}"] for r in refs))
    if out_dir is None:
        return metrics, {}
    os.makedirs(out_dir, exist_ok=True)
    with open(curves_path := os.path.join(out_dir, "curves.json"), "w") as f:  # per-step, from first_frame on
        json.dump({name: {"first_frame": frames[name].start, **c} for name, c in curves.items()}, f, indent=1)
    images = {
        "curves": curves_path,
        "inference": inference_grid(x, pred["prior"], pred["posterior"], os.path.join(out_dir, "inference.png")),
        "rollout": rollout_grid(x, pred["rollout"], os.path.join(out_dir, "rollout.png"), context=ctx),
        "rollout_curve": curves_plot(
            {"rollout mse": curves["rollout"]["mse"], "blank": curves["rollout"]["blank_mse"],
             "last frame": curves["rollout"]["last_mse"]},
            os.path.join(out_dir, "rollout_curve.png"), f"per-pixel MSE by step after {ctx} context frames"),
    }
    return metrics, images


TEST_DIR = "test"  # a run folder's test-split evaluation (a study's trials), beside eval/ (validation)
SHOWN = 3  # test sequences whose predictions are kept, for pictures that put models side by side


def load_trained(run_dir: str, device: str = "cpu"):
    """The run's config and its model with the checkpoint's weights (checked by load_checkpoint)."""
    cfg = load(os.path.join(run_dir, "config.yaml"))
    model = build_model(cfg).to(device)
    load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), model, cfg, field="run")
    return cfg, model


def evaluate_saved(run_dir: str, split: str, out_dir: str, n: int | None = None) -> dict:
    """Evaluates a finished run on a split (all of it unless n): the metrics, and in out_dir the grids,
    curves.json, metrics.json and predictions.npz (truth and rollout of the first SHOWN sequences, uint8)."""
    cfg, model = load_trained(run_dir)
    sequences = build_datasets(cfg.data)[split][:n]
    metrics, _ = evaluate(model, sequences, cfg, out_dir)
    x, pred = predict_all(model, sequences[:SHOWN], cfg)
    as_bytes = lambda t: (t.clamp(0, 1).nan_to_num(0) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    np.savez_compressed(os.path.join(out_dir, "predictions.npz"), truth=as_bytes(x), rollout=as_bytes(pred["rollout"]),
                        context=context_frames(cfg))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


VALIDATIONS_FILE = "validations.json"  # in a run folder: every validation's metrics, with its step


def validations(run_dir: str, upto: int) -> list[dict]:
    """The validations a run made up to step `upto` (a resumed run goes on from its checkpoint's step)."""
    try:
        with open(os.path.join(run_dir, VALIDATIONS_FILE)) as f:
            return [v for v in json.load(f) if v["step"] <= upto]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def add_validation(run_dir: str, history: list[dict], step: int, metrics: dict) -> None:
    """Appends this validation to `history` and its file, and adds the peak so far to `metrics`:
    `prior/peak_skill_mse` and `prior/peak_step`, which O.classify reads to tell a run that degraded."""
    history.append({"step": step, **{k: float(v) for k, v in metrics.items() if not k.startswith("prior/peak_")}})
    tmp = os.path.join(run_dir, VALIDATIONS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(history, f)
    os.replace(tmp, os.path.join(run_dir, VALIDATIONS_FILE))
    skills = [(v["step"], v.get("prior/skill_mse", float("nan"))) for v in history]
    finite = [(step, s) for step, s in skills if s == s and abs(s) != float("inf")]
    if finite:
        metrics["prior/peak_step"], metrics["prior/peak_skill_mse"] = max(finite, key=lambda v: v[1])


def outcome_line(metrics: dict, margin: float) -> str:
    s = metrics.get("prior/skill_mse", float("nan"))
    word = O.classify(metrics, margin)
    if word == O.LEARNED:
        return (f"outcome: {word}: the one-step prior's MSE is {s:.0%} below the better trivial prediction "
                f"(blank or last frame; margin {margin:.0%})")
    if word == O.DEGRADED:
        return (f"outcome: {word}: the one-step prior's MSE skill peaked at {metrics['prior/peak_skill_mse']:+.0%} "
                f"at step {metrics['prior/peak_step']:.0f}, then fell to {s:+.0%} (margin {margin:.0%}, or half the "
                f"peak): it learned, then unlearned")
    return (f"outcome: {word}: the one-step prior's MSE is {s:+.0%} against the better trivial prediction "
            f"(blank or last frame; margin {margin:.0%}); this model has learned nothing useful")


def scored_line(metrics: dict, prefix: str = "") -> str:
    """The one-step prior against the trivial predictions in one line; `prefix` as the keys have it ("val/")."""
    v = lambda k: float(metrics.get(f"{prefix}prior/{k}", "nan") or "nan")  # noqa: E731
    return (f"prior MSE {v('mse'):.4f} against blank {v('blank_mse'):.4f} and last frame {v('last_mse'):.4f} "
            f"(skill {v('skill_mse'):+.2f}); SSIM {v('ssim'):.3f} against {v('blank_ssim'):.3f} / "
            f"{v('last_ssim'):.3f} (skill {v('skill_ssim'):+.2f})")


def table(metrics: dict, margin: float | None = None) -> str:
    """The thesis tables as text: each error beside the blank-frame and last-frame scores and the skill
    over the better of them (above 0: beats both), then the outcome line when a margin is given."""
    head = "".join(f" | {k.upper():>6} {'blank':>6} {'last':>6} {'skill':>6}" for k in SKILL_METRICS)
    rows = [f"{'':9}{head}"]
    for name in SECTIONS:
        m = lambda k: metrics.get(f"{name}/{k}", float("nan"))  # noqa: E731
        rows.append(f"{name:9}" + "".join(f" | {m(k):6.4f} {m('blank_' + k):6.4f} {m('last_' + k):6.4f} "
                                          f"{m('skill_' + k):+6.2f}" for k in SKILL_METRICS)
                    .replace("   nan", "     -"))
    if margin is not None:
        rows.append(outcome_line(metrics, margin))
    return "\n".join(rows)
