"""What the divergence guard costs per training step, as a ratio of the step (target: <= 3%).

    python bench/guard_cost.py            # GOPC-1, 32x32, 10 frames, batch 16, 30 rounds
    python bench/guard_cost.py --smoke    # tiny sizes, seconds (what the tests run)

One model, one batch, three variants of the same step, interleaved round by round (the order rotates)
so that load from other processes falls on all three alike:
  guard     the step of gopc/train.py: Guard.check stacks the watched norms and syncs once
  no check  Guard.check skipped (so no sync); the model still computes the watched norms
  no guard  Guard.check skipped and no watched norms (the inner gradient steps without their norm)
The cost is the median over rounds of (guard - variant) per round, over the guard step's median.
The check alone is also timed on its own, on a real step's watch list (many calls: a precise figure).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import add_setup_args, device_name, median, setup, sync, timed, train_step
from gopc.guard import Guard

TARGET = 0.03


def unwatched_gradient_step(model):
    """SeqModel.gradient_step without the norm it appends to model.watch (bench only; same step)."""
    def gradient_step(site, t, inner_loss, origin, lr, second_order):
        create = second_order and torch.is_grad_enabled() and model.training
        (g,) = torch.autograd.grad(inner_loss, origin, create_graph=create, retain_graph=True)
        return g
    return gradient_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_args(p, "torch CPU threads (default: all cores; --smoke: 1, steadier on a shared machine)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="frame 32, r_dim 16, seq 4, batch 4, 3 rounds, 1 thread")
    a = p.parse_args(argv)
    if a.smoke:
        a.frame, a.seq, a.batch, a.warmup, a.rounds = 32, 4, 4, 1, 3
        a.threads = a.threads or 1
        a.set = ["model.r_dim=16", *a.set]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    device, cfg, model, opt, x = setup(a)
    guard, unwatched = Guard(), unwatched_gradient_step(model)

    def run(variant, step):
        if variant == "no guard":
            model.gradient_step = unwatched  # instance attribute: shadows the method for this step
        try:
            record = train_step(model, opt, x, guard if variant == "guard" else None, step)
        finally:
            model.__dict__.pop("gradient_step", None)
        if record is not None:
            raise SystemExit(f"the model diverged at step {step} ({record.quantity}); stabilize it with --set")

    variants = ["guard", "no check", "no guard"]
    times = {v: [] for v in variants}
    for r in range(a.warmup + a.rounds):
        for v in variants[r % 3:] + variants[:r % 3]:
            t = timed(lambda: run(v, r), device)
            if r >= a.warmup:
                times[v].append(t)

    # the check alone, on the watch list and norms of a real step
    loss, _ = model(x, 1.0)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
        [p.grad for p in model.parameters() if p.grad is not None])))
    n_calls, check = 200, []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for i in range(n_calls):
            guard.check(i, loss, grad_norm, model.watch, None)
        check.append((time.perf_counter() - t0) / n_calls)
    opt.zero_grad(set_to_none=True)

    step = median(times["guard"])
    print(f"device: {device_name(device)}   torch {torch.__version__}")
    print(f"setting: {cfg.model.kind} {a.frame}x{a.frame} px, {a.seq} frames, batch {a.batch}, "
          f"{len(model.watch)} watched norms, median of {a.rounds} interleaved rounds"
          + (f", overrides {' '.join(a.set)}" if a.set else ""))
    head = f"{'variant':<10} {'ms/step':>9} {'guard - this, ms':>16} {'of a step':>9}"
    print(head)
    print("-" * len(head))
    cost = {}
    for v in variants:
        cost[v] = median([g - o for g, o in zip(times["guard"], times[v])])
        print(f"{v:<10} {median(times[v]) * 1e3:>9.2f} {cost[v] * 1e3:>16.3f} {cost[v] / step:>9.2%}")
    print(f"check alone: {median(check) * 1e3:.4f} ms per call = {median(check) / step:.3%} of a step "
          f"(median of 5 x {n_calls} calls)")
    for what, v in (("Guard.check", "no check"), ("Guard.check + watched norms", "no guard")):
        verdict = "within" if cost[v] <= TARGET * step else "over"
        print(f"guard cost ratio ({what}): {cost[v] / step:.2%} of a step, {cost[v] * 1e3:.3f} ms "
              f"(target <= {TARGET:.0%}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
