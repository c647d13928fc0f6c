"""Packing: 1, 2, 4 and 8 trials sharing one GPU through the sweep's fractional `resources.gpu`, run by
the service itself (validation, checkpoints, MLflow); total sequences/s and each trial's peak memory.

    python bench/packing.py                          # on a GPU: GOPC-2* at batch 50, 20 frames, 64x64
    python bench/packing.py --model gopc1 --packs 1,8
    python bench/packing.py --smoke                  # packs of 1 and 2, tiny, on the CPU (the tests)

Each pack of k trials is one sweep of k trials (train.seed 0..k-1 as start points, FIFO, all k at once),
each trial asking for 1/k of the GPU and of the cores (on a machine without a GPU, 1/k of the cores).
`seq/s total` is the steady rate: each trial's sequences between its first and its last report over
the time between them (Tune's time_total_s, so worker start, data and CUDA set-up are left out), summed
over the trials. `peak MB`: the largest `train/peak_mem_mb` a trial reported (gopc/train.py
peak_memory_mb: on a GPU torch's peak reserved memory; add ~500 MB of CUDA context per process), from
which `resources.gpu` is chosen: k trials fit when k x (peak + context) is below the GPU's memory.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import torch  # noqa: E402

from gopc.sweep import settings as S  # noqa: E402

from common import (LABELS, MODELS, device_name, pick_device, service_tuner, start_ray, sweep_folder,  # noqa: E402
                    sweep_settings)  # noqa: E402

TARGET = 1500  # sequences/s in total on a packed H100 (issue 12)
SMOKE = ["base.data.n_val=4", "base.train.eval_size=4", "base.model.r_dim=8", "base.model.ngf=4"]


def settings(a, k: int, folder: str) -> S.Settings:
    gpu = 1 / k if torch.cuda.is_available() else 0
    return sweep_settings(folder, f"packing_{k}", None, [
        f"num_samples={k}", f"max_concurrent={k}", f"report_every={a.report_every}",
        f"resources.gpu={gpu}", f"resources.cpu={a.cpus / k}", f"base.model.kind={a.model}",
        f"base.data.frame_size={a.frame}", f"base.data.seq_len={a.seq}", f"base.train.batch_size={a.batch}",
        f"base.train.steps={a.steps}", f"base.data.n_train={a.n_train}", "base.data.n_val=100",
        *(f"base.{kv}" for kv in MODELS[a.model]), *(SMOKE if a.smoke else []), *a.set], seeds=k)


def steady_rate(result, batch: int) -> float:
    """Sequences/s of one trial between its first and its last report (validations included)."""
    df = result.metrics_dataframe
    steps, secs = df["step"].to_numpy(), df["time_total_s"].to_numpy()
    if len(steps) < 2 or secs[-1] <= secs[0]:
        return float("nan")
    return (steps[-1] - steps[0]) * batch / (secs[-1] - secs[0])


def measure(a, k: int) -> dict:
    with sweep_folder("gopc_packing_") as folder:
        s = settings(a, k, folder)
        tuner = service_tuner(s)
        with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables; this script's table is stdout
            results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{k} trials: {results.errors[0]}")
    diverged = sum(bool(r.metrics.get("diverged")) for r in results)
    return {"rates": [steady_rate(r, a.batch) for r in results], "diverged": diverged,
            "peak": max(float(r.metrics_dataframe["train/peak_mem_mb"].max()) for r in results)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gopc2", choices=list(MODELS))
    p.add_argument("--packs", default="1,2,4,8", help="trials sharing the GPU, per run (default: %(default)s)")
    p.add_argument("--frame", type=int, default=64)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--n-train", type=int, default=2000, help="sequences generated per trial")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores for the trials (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another sweep setting")
    p.add_argument("--smoke", action="store_true", help="packs of 1 and 2, tiny, a few seconds each")
    a = p.parse_args(argv)
    if a.smoke:
        a.packs, a.frame, a.seq, a.batch, a.steps, a.report_every, a.n_train, a.cpus = "1,2", 32, 4, 4, 6, 2, 16, 2
    import ray
    start_ray(a.cpus, torch.cuda.device_count())
    try:
        rows = [(k, measure(a, k)) for k in map(int, a.packs.split(","))]
    finally:
        ray.shutdown()
    device = pick_device()
    print(f"date: {datetime.date.today()}   device: {device_name(device)}   load average: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{LABELS[a.model]}, batch {a.batch}, {a.seq} frames, {a.frame}x{a.frame}; {a.steps} steps a trial, "
          f"validation every {a.report_every}; {a.cpus} cores shared")
    print(f"{'trials':>6} {'gpu each':>8} {'seq/s total':>11} {'seq/s a trial':>13} {'vs 1 trial':>10} "
          f"{'peak MB a trial':>15} {'diverged':>8}")
    one = None
    for k, m in rows:
        total = sum(m["rates"])
        one = one or total / k
        gpu = f"{1 / k:.3f}" if device.type == "cuda" else "-"
        print(f"{k:>6} {gpu:>8} {total:>11.1f} {total / k:>13.1f} {total / one:>10.2f} {m['peak']:>15.0f} "
              f"{m['diverged']:>8}")
    best_k, best = max(((k, sum(m["rates"])) for k, m in rows), key=lambda kv: kv[1])
    verdict = (f"{'meets' if best >= TARGET else 'misses'} the target of {TARGET:,}" if device.type == "cuda"
               else f"the target of {TARGET:,} is for an H100")
    print(f"best: {best:.1f} sequences/s in total with {best_k} trial(s) ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
