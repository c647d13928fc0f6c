"""Training-step speed of GOPC-1, VAE-1 and GOPC-2, against the thesis' GTX 1080 Ti and the targets.

    python bench/step.py                      # batch 50, 20 frames of 64x64: the thesis setting
    python bench/step.py --batch 16,50,200    # other batch sizes
    python bench/step.py --smoke              # tiny sizes, seconds on a CPU (what the tests run)

One step = forward + backward + gradient norm + divergence guard + Adam step, as in gopc/train.py's loop,
on one fixed batch of real sequences already on the device. On the GPU when there is one, else the CPU.
Each row: a fresh model, `--warmup` untimed steps, then `--repeats` timed steps (device synchronized
around each); the median. Only the eager path exists: gopc has no fast path (CUDA graphs, compile) yet.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from common import LABELS, GOPC2_STABLE, device_name, make_batch, make_config, median, pick_device, timed, train_step
from gopc.guard import Guard
from gopc.models import build_model

THESIS_1080TI = {"gopc1": 1.7, "vae1": 2.5}  # batches/s at batch 50 (thesis); sequences/s = 50x
THESIS_BATCH = 50
TARGET = {"gopc1": 25.0}  # batches/s at batch 50 on one H100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gopc1,vae1,gopc2")
    p.add_argument("--batch", default="50", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--frame", type=int, default=64)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every model, e.g. model.r_dim=128")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: all cores; --smoke: 1, steadier on a shared machine)")
    p.add_argument("--smoke", action="store_true", help="frame 32, r_dim 16, seq 4, batch 4, 3 repeats, 1 thread")
    a = p.parse_args(argv)
    if a.smoke:
        a.frame, a.seq, a.batch, a.warmup, a.repeats = 32, 4, "4", 1, 3
        a.threads = a.threads or 1
        a.set = ["model.r_dim=16", *a.set]
    a.models = a.models.split(",")
    a.batch = [int(b) for b in a.batch.split(",")]
    return a


def measure(kind, batch, a, device):
    """Median seconds per step, or a string saying why there is none."""
    cfg = make_config(kind, a.frame, a.seq, batch, a.set)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    x = make_batch(cfg, batch, device)
    guard, times = Guard(), []
    for i in range(a.warmup + a.repeats):
        out = []
        t = timed(lambda: out.append(train_step(model, opt, x, guard, at=i)), device)
        if out[0] is not None:
            return f"diverged at step {i} ({out[0].quantity})"
        if i >= a.warmup:
            times.append(t)
    return median(times)


def ratio(value, ref):
    return f"{value / ref:.3f}" if ref else "-"


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device()
    print(f"device: {device_name(device)}   torch {torch.__version__}   {datetime.date.today()}")
    print(f"setting: {a.frame}x{a.frame} px, {a.seq} frames, warm-up {a.warmup}, median of {a.repeats} steps"
          + (f", overrides {' '.join(a.set)}" if a.set else ""))
    head = f"{'model':<8} {'batch':>5} {'s/step':>8} {'batches/s':>9} {'seq/s':>8} {'vs 1080Ti':>9} {'vs target':>9}"
    print(head)
    print("-" * len(head))
    for kind in a.models:
        for batch in a.batch:
            try:
                s = measure(kind, batch, a, device)
            except torch.cuda.OutOfMemoryError:
                s = "out of memory"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if isinstance(s, str):
                print(f"{LABELS[kind]:<8} {batch:>5} {s}")
                continue
            # at another batch size the references are compared in sequences/s (ref batches/s x 50)
            seq_s = batch / s
            thesis = THESIS_1080TI.get(kind, 0) * THESIS_BATCH
            target = TARGET.get(kind, 0) * THESIS_BATCH
            print(f"{LABELS[kind]:<8} {batch:>5} {s:>8.3f} {1 / s:>9.2f} {seq_s:>8.1f} "
                  f"{ratio(seq_s, thesis):>9} {ratio(seq_s, target):>9}")
    print("vs 1080Ti: sequences/s over the thesis' (GOPC-1 1.7, VAE-1 2.5 batches/s at batch 50);"
          " vs target: over GOPC-1's 25 batches/s at batch 50 on one H100 (= batches/s ratio at batch 50)")
    if "gopc2" in a.models:
        print(f"GOPC-2*: stabilized ({' '.join(GOPC2_STABLE)}); at the defaults it diverges in its first step")
    print("fast vs eager: not available (gopc has no fast path yet; every figure above is the eager step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
