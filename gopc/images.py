"""Small PNG figures in the style of the thesis: inference grid (fig. 3.3), rollout grid (fig. 3.4), metric curves.

Each is logged to MLflow for every trial, so they are kept small (DPI 80, ~48 px per frame) and every figure is
closed after saving. Layout is placed by hand in inches (no tight bbox), so the PNG size is predictable."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless workers: must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 80
CELL = 0.6  # inches per frame (48 px at DPI 80)
PAD = 0.03  # gap between neighbouring frames
SEQ_GAP = 0.2  # extra gap between sequences
CONTEXT_GAP = 0.1  # extra gap at the context boundary, where the red line goes
LEFT, RIGHT, TOP, BOTTOM = 0.8, 0.05, 0.25, 0.05  # margins: row labels on the left, t indices on top
FONT = 9


def _frames(x, n: int) -> np.ndarray:
    """(B, T, 1, H, W) tensor or array -> (min(n, B), T, H, W) float numpy on the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 5 or x.shape[2] != 1:
        raise ValueError(f"expected frames of shape (B, T, 1, H, W); got {x.shape}")
    return x[:n, :, 0]


def _grid(n_seq: int, labels: list[str], T: int, context_gap_before: int | None = None):
    """Figure with one cell per (sequence, row, t), all drawn into a single axes that spans the figure and whose data
    coordinates are inches. Why not one Axes per frame: creating an Axes costs ~8 ms, and a grid has 60-120 of them;
    that was ~1 s of every validation of a sweep trial (docs/performance.md, Service overhead), while an image in a
    shared axes costs well under a millisecond. Same pixels.

    Returns (fig, canvas, cells[seq][row][t] = (left, bottom) in inches, column left edges, width, height)."""
    col_x, x = [], LEFT
    for t in range(T):
        if t == context_gap_before:
            x += CONTEXT_GAP
        col_x.append(x)
        x += CELL + PAD
    width = x - PAD + RIGHT
    rows = n_seq * len(labels)
    height = TOP + rows * CELL + (rows - n_seq) * PAD + (n_seq - 1) * SEQ_GAP + BOTTOM
    fig = plt.figure(figsize=(width, height), dpi=DPI, facecolor="white")
    canvas = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    canvas.set_axis_off()
    canvas.set(xlim=(0, width), ylim=(0, height))
    canvas.set_autoscale_on(False)  # imshow must not move the limits: each frame has its own extent
    cells = []
    y = height - TOP  # top edge of the current row, measured from the bottom
    for s in range(n_seq):
        seq_cells = []
        for r, label in enumerate(labels):
            bottom = y - CELL
            seq_cells.append([(cx, bottom) for cx in col_x])
            fig.text((LEFT - 0.08) / width, (bottom + CELL / 2) / height, label, ha="right", va="center", fontsize=FONT)
            if s == 0 and r == 0:
                for t, cx in enumerate(col_x):  # t indices above the first row only
                    x_mid, y_top = (cx + CELL / 2) / width, (y + 0.05) / height
                    fig.text(x_mid, y_top, str(t), ha="center", va="bottom", fontsize=FONT)
            y = bottom - PAD
        cells.append(seq_cells)
        y += PAD - SEQ_GAP
    return fig, canvas, cells, col_x, width, height


def _show(canvas, cell: tuple[float, float], frame: np.ndarray) -> None:
    # a frame with no value at all (the prior at t=0) stays blank instead of being drawn as black
    if np.isnan(frame).all():
        return
    x, y = cell
    canvas.imshow(np.clip(frame, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, extent=(x, x + CELL, y, y + CELL),
                  aspect="auto")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, facecolor="white")
    finally:
        plt.close(fig)
    return path


def inference_grid(truth, prior, posterior, path, n: int = 3) -> Path:
    """Thesis fig. 3.3: per sequence, rows truth / prior / |prior - truth| / posterior. Returns the PNG path."""
    truth, prior, posterior = _frames(truth, n), _frames(prior, n), _frames(posterior, n)
    error = np.abs(prior - truth)  # NaN where the prior is NaN, so those cells stay blank too
    fig, canvas, cells, *_ = _grid(len(truth), ["truth", "prior", "error", "posterior"], truth.shape[1])
    for s, seq_cells in enumerate(cells):
        for rows, data in zip(seq_cells, (truth, prior, error, posterior)):
            for t, cell in enumerate(rows):
                _show(canvas, cell, data[s, t])
    return _save(fig, path)


def rollout_grid(truth, prediction, path, context: int = 5, n: int = 3) -> Path:
    """Thesis fig. 3.4: per sequence, rows truth / prediction; a red line after frame `context - 1`. A prediction with
    fewer frames than the truth is right-aligned, so its frames sit under the truth frames they predict."""
    truth, prediction = _frames(truth, n), _frames(prediction, n)
    T, Tp = truth.shape[1], prediction.shape[1]
    if Tp > T:
        raise ValueError(f"prediction has {Tp} frames but truth only {T}")
    show_line = 0 < context < T
    fig, canvas, cells, col_x, width, height = _grid(len(truth), ["truth", "prediction"], T, context if show_line else None)
    for s, (truth_row, pred_row) in enumerate(cells):
        for t in range(T):
            _show(canvas, truth_row[t], truth[s, t])
            if t >= T - Tp:
                _show(canvas, pred_row[t], prediction[s, t - (T - Tp)])
    if show_line:
        # centred in the widened gap between frame context-1 and frame context, spanning all rows
        x = (col_x[context] - (CONTEXT_GAP + PAD) / 2) / width
        fig.add_artist(Line2D([x, x], [BOTTOM / height, 1 - TOP / height], color="red", linewidth=2.5))
    return _save(fig, path)


def curves_plot(curves: dict[str, list[float]], path, title: str) -> Path:
    """Small line plot of per-step curves; key "blank" (list or scalar) is drawn as a dashed grey baseline."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=DPI)
    try:
        for name, values in curves.items():
            if name != "blank":
                ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
        if "blank" in curves:
            blank = curves["blank"]
            if np.ndim(blank) == 0:
                ax.axhline(float(blank), color="grey", linestyle="--", label="blank frame")
            else:
                ax.plot(range(len(blank)), blank, color="grey", linestyle="--", label="blank frame")
        ax.set_xlabel("t")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, framealpha=0.7)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)
