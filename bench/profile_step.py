"""Where a training step's time goes: torch.profiler's top operators by self time.

    python bench/profile_step.py                 # GOPC-1, 32x32, 10 frames, batch 16, 5 profiled steps
    python bench/profile_step.py --model vae1 --frame 64 --seq 20 --batch 50

Self CPU time on the CPU; on a GPU the table is sorted by self device (CUDA) time instead.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from common import add_setup_args, device_name, setup, sync, train_step
from gopc.guard import Guard


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_args(p)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args(argv)
    device, cfg, model, opt, x = setup(a)
    guard = Guard()
    for i in range(2):  # warm-up
        train_step(model, opt, x, guard, i)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for i in range(a.steps):
            train_step(model, opt, x, guard, 2 + i)
        sync(device)
    print(f"device: {device_name(device)}   torch {torch.__version__}")
    print(f"setting: {cfg.model.kind} {a.frame}x{a.frame} px, {a.seq} frames, batch {a.batch}, {a.steps} steps")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
