"""Smooth Moving MNIST generation throughput on one core, against "thousands of sequences per second".

    python bench/data_gen.py             # 64x64, 20 frames, 1 digit, 2,000 sequences a call, 5 repeats
    python bench/data_gen.py --smoke     # 100 sequences a call, 3 repeats (what the tests run)

Times gopc.data.make_sequences (draws, trajectories, rendering to uint8) per trajectory law, with
torch and numpy kept to one thread; the digits are loaded once, outside the timing.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch load their thread pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import device_name, median, timed  # noqa: E402
from gopc import config as C  # noqa: E402
from gopc.data import load_digits, make_sequences  # noqa: E402

REQUIRED = 1000.0  # "thousands per second": at least 1,000 sequences/s on one core


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="sequences per call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frame", type=int, default=64)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--digits", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.repeats = 100, 3
    torch.set_num_threads(1)
    images, _ = load_digits("embedded")
    cpu = torch.device("cpu")
    print(f"device: {device_name(cpu)}, one core")
    print(f"setting: {a.frame}x{a.frame} px, {a.seq} frames, {a.digits} digit(s), {a.n} sequences a call, "
          f"median of {a.repeats}")
    head = f"{'law':<11} {'s/call':>8} {'seq/s':>9} {'vs 1,000/s':>10}"
    print(head)
    print("-" * len(head))
    for law in ("bounce", "smooth", "stochastic"):
        cfg = C.load(None, [f"data.trajectory={law}", f"data.frame_size={a.frame}", f"data.seq_len={a.seq}",
                            f"data.num_digits={a.digits}"]).data
        rng = np.random.default_rng(0)
        make_sequences(images, 10, cfg, rng)  # warm-up
        s = median([timed(lambda: make_sequences(images, a.n, cfg, rng), cpu) for _ in range(a.repeats)])
        print(f"{law:<11} {s:>8.3f} {a.n / s:>9.0f} {a.n / s / REQUIRED:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
