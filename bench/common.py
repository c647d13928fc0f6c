"""What the benchmarks share: the training step, a batch of real data, the device's name, a timer.

`train_step` is gopc/train.py's `step` (forward, backward, gradient norm, divergence guard, Adam step),
plus the schedule's step when one is given, as the loop takes it.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from gopc import config as C
from gopc.data import load_digits, make_sequences, to_float
from gopc.guard import Guard
from gopc.stabilizers import STAYS_FINITE
from gopc.train import step

SWEEP_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sweeps", "gopc2_stability.yaml")

# The stabilizers that keep GOPC-2 finite for timing: at the defaults it diverges in its first step.
GOPC2_STABLE = [f"{k}={v}" for k, v in STAYS_FINITE.items()]
MODELS = {"gopc1": [], "vae1": [], "gopc2": GOPC2_STABLE}
LABELS = {"gopc1": "GOPC-1", "vae1": "VAE-1", "gopc2": "GOPC-2*"}


def make_config(kind: str, frame: int, seq: int, batch: int, extra=()) -> C.Config:
    return C.load(None, [f"model.kind={kind}", f"data.frame_size={frame}", f"data.seq_len={seq}",
                         f"train.batch_size={batch}", *MODELS[kind], *extra])


def add_setup_args(p, threads_help: str = "torch CPU threads (default: all cores)") -> None:
    """The arguments `setup` reads, for the single-model benches."""
    p.add_argument("--model", default="gopc1", choices=list(MODELS))
    p.add_argument("--frame", type=int, default=32)
    p.add_argument("--seq", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--threads", type=int, default=0, help=threads_help)


def setup(a):
    """What the single-model benches share, from the arguments of `add_setup_args`:
    (device, cfg, model, optimizer, batch)."""
    from gopc.models import build_model
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device()
    cfg = make_config(a.model, a.frame, a.seq, a.batch, a.set)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    return device, cfg, model, opt, make_batch(cfg, a.batch, device)


def make_batch(cfg: C.Config, n: int, device) -> torch.Tensor:
    """n real Smooth Moving MNIST sequences as float (n, T, 1, S, S) on `device`."""
    images, _ = load_digits(cfg.data.source)
    seqs = make_sequences(images, n, cfg.data, np.random.default_rng(cfg.data.seed))
    return to_float(torch.from_numpy(seqs)).to(device)


def train_step(model, opt, x, guard: Guard | None, at: int = 0, sched=None):
    """One step of gopc/train.py's loop at beta 1, no clipping. guard=None skips Guard.check (and with it
    the step's sync). Returns the Divergence record, or None when the step was finite and Adam stepped."""
    record, *_ = step(model, opt, x, 1.0, 0.0, guard, at)
    if record is None and sched is not None:
        sched.step()
    return record


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds for one call of fn, with the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------------
# The sweep benches (overhead, search_efficiency, packing): the service's own settings and Tuner.

@contextlib.contextmanager
def sweep_folder(prefix: str):
    """A temporary folder for one sweep's results and databases, made the working directory while it
    runs: MLflow puts a SQLite store's artifacts in ./mlruns, which would otherwise outlive the folder."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder, contextlib.chdir(folder):
        yield folder


def sweep_settings(folder: str, name: str, preset: str | None, sets: list[str], seeds: int | None = None):
    """sweeps/gopc2_stability.yaml with its results and databases in `folder`, FIFO. seeds=k: k trials
    that differ only by train.seed (0..k-1, as start points); None: the sweep's space, no start points."""
    from gopc.sweep import settings as S
    raw = C.load_yaml(SWEEP_YAML)
    raw["start_points"] = [{"train.seed": i} for i in range(seeds or 0)]
    if seeds is not None:
        raw["space"] = {"train.seed": {"choices": list(range(seeds))}}
    return S.parse(raw, preset, [f"name={name}", f"storage={folder}/sweep_results",
                                 f"tracking_uri=sqlite:///{folder}/mlflow.db", "scheduler.type=fifo", *sets])


def service_tuner(s, hooks_class=None, tracked: bool = True):
    """The sweep's own Tuner, with its MLflow parent run when tracked, as gopc/sweep/run.py builds it."""
    from gopc.sweep import run as R
    from gopc.sweep import search
    from gopc.sweep.parent_run import start_parent
    parent = start_parent(s.mlflow_uri, s.mlflow_experiment, s.name, False, search.parent_params(s), "") if tracked else ""
    return R.build_tuner(s, parent, search.SWEEP, hooks_class=hooks_class, tracked=tracked)


def start_ray(num_cpus: int, num_gpus: int = 0) -> None:
    import ray
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=False)  # a Ray of its own: never another's
