"""Fault injection for tests (`train.inject=SITE@STEP[:VALUE][,seed=N]`): the loop's one hook, a `Fault` that at one
step forces a value into one guarded quantity, fails the step, or stands still before it until a signal arrives."""
from __future__ import annotations

import re
import time

import torch

from gopc.errors import ConfigError

SITES = ("loss", "param_grad", "z0_grad", "rh_grad", "overflow", "raise", "oom", "wait")
_SPEC = re.compile(r"^(\w+)@(\d+)(?::(nan|inf|-inf))?(?:,seed=(\d+))?$")


def parse(spec: str, seed: int | None = None) -> tuple[str, int, float] | None:
    """(site, step, value), or None when nothing is injected into this seed's run (",seed=N": one seed of a study)."""
    if not spec:
        return None
    m = _SPEC.match(spec)
    if not m or m.group(1) not in SITES:
        raise ConfigError(f"train.inject: {spec!r} is not SITE@STEP[:nan|inf|-inf][,seed=N] with SITE in {SITES}")
    if m.group(4) is not None and seed is not None and int(m.group(4)) != seed:
        return None
    return m.group(1), int(m.group(2)), float(m.group(3) or "nan")


class Fault:
    def __init__(self, spec: str = "", seed: int = 0):
        self.site, self.step, self.value = parse(spec, seed) or ("", -1, 0.0)

    def before(self, at: int, model, stop, settle) -> None:
        """Before step `at`'s batch: wait for a signal (with everything before logged: settle), fail, or
        poison the first inner gradient of a site (an overflow: finite, but the next computation overflows)."""
        if at != self.step:
            return
        if self.site == "wait":
            settle()
            if not stop.active:
                raise ConfigError("train.inject: wait@STEP needs a run in the main thread, where signals arrive")
            print(f"train.inject: waiting before step {at} for SIGINT or SIGTERM", flush=True)
            while not stop.signum:
                time.sleep(0.05)  # the handler sets stop.signum; this only bounds how soon the loop sees it
        elif self.site == "raise":
            raise RuntimeError("train.inject: injected failure")
        elif self.site == "oom":
            raise torch.OutOfMemoryError("train.inject: injected out-of-memory")
        elif self.site in ("z0_grad", "rh_grad"):
            model.poison[self.site] = self.value
        elif self.site == "overflow":
            model.poison["z0_grad"] = 1e30

    def loss(self, at: int, loss):
        return loss + self.value if (at, self.site) == (self.step, "loss") else loss

    def grads(self, at: int, model) -> None:
        if (at, self.site) == (self.step, "param_grad"):
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] += self.value
