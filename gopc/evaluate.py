"""Evaluation after the thesis: posterior error over full sequences (table 3.1), one-step prior error
decoded before the inference step (table 3.2), and the 5-context rollout from the prior alone
(figure 3.4); each beside the blank-frame score, so a model that predicts nothing cannot look good."""
from __future__ import annotations

import json
import os

import torch

from gopc.config import Config
from gopc.data import to_float
from gopc.images import curves_plot, inference_grid, rollout_grid
from gopc.metrics import blank_frame_scores, curve, frame_metrics, summarise

SECTIONS = ("posterior", "prior", "rollout")


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


def evaluate(model, sequences, cfg: Config, out_dir: str | None) -> tuple[dict, dict[str, str]]:
    """Returns flat metrics (`posterior/mse`, `prior/mse_std`, `rollout/blank_mse`, ...) and the files
    written to out_dir: PNG grids and curves.json (none when out_dir is None: a quick validation)."""
    x, pred = predict_all(model, sequences, cfg)
    ctx = context_frames(cfg)
    frames = {"posterior": slice(0, None), "prior": slice(1, None), "rollout": slice(ctx, None)}
    metrics, curves = {}, {}
    for name, sel in frames.items():
        per = frame_metrics(pred[name][:, sel], x[:, sel])
        metrics.update({f"{name}/{k}": v for k, v in summarise(per).items()})
        metrics.update({f"{name}/blank_{k}": v for k, v in blank_frame_scores(x[:, sel]).items()})
        curves[name] = curve(per)  # per-step means of every metric
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
            {"rollout mse": curves["rollout"]["mse"], "blank": [metrics["rollout/blank_mse"]] * len(curves["rollout"]["mse"])},
            os.path.join(out_dir, "rollout_curve.png"), f"per-pixel MSE by step after {ctx} context frames"),
    }
    return metrics, images


def table(metrics: dict) -> str:
    """The thesis tables as text: each error beside the blank-frame score."""
    rows = [f"{'':10} {'MSE':>8} {'blank':>8} {'BCE':>8} {'blank':>8} {'PSNR':>6} {'SSIM':>6}"]
    for name in SECTIONS:
        m = lambda k: metrics.get(f"{name}/{k}", float("nan"))  # noqa: E731
        rows.append(f"{name:10} {m('mse'):8.4f} {m('blank_mse'):8.4f} {m('bce'):8.4f} {m('blank_bce'):8.4f} "
                    f"{m('psnr'):6.2f} {m('ssim'):6.3f}")
    return "\n".join(rows)
